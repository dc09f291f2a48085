"""One line per vCPU from the state `Machine.save_vcpu` returns: where it stands (run state,
rip, interrupts enabled) and its local APIC (pending and in-service vectors, its timer), as
QEMU's `info registers` / `info lapic` would tell. `native.run` prints them on SIGUSR1; a test
whose guest stands still prints them with its failure.
"""

from __future__ import annotations

import struct

# struct vcpu_state (native/x86/vcpu_state.c): the KVM structures in order, each at its
# natural alignment on x86-64.
_HEADER = "<IIII"  # magic, version, size, nmsrs
_MP = 16
_REGS = 24  # struct kvm_regs: rax..r15, rip, rflags
_SREGS = _REGS + 144
_FPU = _SREGS + 312
_XSAVE = _FPU + 416
_XCRS = _XSAVE + 4096
_LAPIC = _XCRS + 392
_EVENTS = _LAPIC + 1024
_MSRS = _EVENTS + 64
_MAGIC = 0x464C5643
MP_STATES = {0: "runnable", 1: "uninitialized", 2: "init-received", 3: "halted", 4: "sipi"}
MSR_TSC, MSR_TSC_DEADLINE, MSR_LSTAR = 0x10, 0x6E0, 0xC0000082


def _apic(lapic: bytes, reg: int) -> int:
    return int(struct.unpack_from("<I", lapic, reg)[0])


def _bits(lapic: bytes, base: int) -> list[int]:
    """Vectors set in a 256-bit local APIC register group (ISR, TMR, IRR)."""
    out = []
    for i in range(8):
        word = _apic(lapic, base + 0x10 * i)
        out += [32 * i + b for b in range(32) if word >> b & 1]
    return out


def describe_vcpu(index: int, blob: bytes) -> str:
    if len(blob) < _MSRS:
        return f"vCPU {index}: a state of {len(blob)} bytes is too short"
    magic, _version, _size, nmsrs = struct.unpack_from(_HEADER, blob, 0)
    if magic != _MAGIC:
        return f"vCPU {index}: not a vCPU state blob"
    (mp,) = struct.unpack_from("<I", blob, _MP)
    rip, rflags = struct.unpack_from("<QQ", blob, _REGS + 16 * 8)
    msrs = {}
    for i in range(min(nmsrs, 32, (len(blob) - _MSRS) // 16)):
        idx, _, data = struct.unpack_from("<IIQ", blob, _MSRS + 16 * i)
        msrs[idx] = data
    lapic = blob[_LAPIC : _LAPIC + 1024]
    # KASLR moves the kernel as a whole: given against LSTAR (entry_SYSCALL_64), a kernel
    # place can be looked up in the kernel's real System.map (Debian's image carries only a
    # placeholder; the -dbg package has it).
    lstar = msrs.get(MSR_LSTAR, 0)
    where = f"entry_SYSCALL_64{rip - lstar:+#x}" if lstar and rip >> 47 else "?"
    lvtt = _apic(lapic, 0x320)
    mode = ("one-shot", "periodic", "tsc-deadline", "reserved")[lvtt >> 17 & 3]
    deadline = msrs.get(MSR_TSC_DEADLINE, 0)
    tsc = msrs.get(MSR_TSC, 0)
    return (
        f"vCPU {index}: {MP_STATES.get(mp, mp)} rip={rip:#x} ({where}) "
        f"if={rflags >> 9 & 1} apic_id={_apic(lapic, 0x20) >> 24} tpr={_apic(lapic, 0x80)} "
        f"irr={_bits(lapic, 0x200)} isr={_bits(lapic, 0x100)} "
        f"timer: lvtt={lvtt:#x} ({mode}{', masked' if lvtt >> 16 & 1 else ''}) "
        f"tmict={_apic(lapic, 0x380)} tmcct={_apic(lapic, 0x390)} "
        f"deadline={'tsc+' + str(deadline - tsc) if deadline else 0}"
    )
