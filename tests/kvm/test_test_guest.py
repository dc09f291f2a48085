"""The VMM booting the test guest (native/guest/): each action of docs/machine.md."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import native
from native import EventKind, MachineState
from tests.guest_initrd import initrd_line
from tests.kvm.harness import Booted

Boot = Callable[..., Booted]
PREFIX = "flotilla-guest: "


def wait_end(guest: Booted, kind: EventKind, timeout: float = 10.0) -> str:
    return str(guest.wait_end(kind, timeout).reason)


@pytest.mark.parametrize(("vcpus", "memory_mib"), [(1, 64), (2, 200)])
def test_ready_reports_vcpus_and_memory(
    test_guest: Path, boot: Boot, vcpus: int, memory_mib: int
) -> None:
    guest = boot(test_guest, "ready poweroff", vcpus=vcpus, memory_mib=memory_mib)
    guest.console.wait_for(rf"^{PREFIX}READY vcpus={vcpus} memory_mib={memory_mib}$")
    assert wait_end(guest, EventKind.POWEROFF) == "acpi_s5"


def test_the_guest_takes_its_clock_rates_from_the_timing_leaf(test_guest: Path, boot: Boot) -> None:
    # CPUID 0x40000010 (fl_cpuid_apply): the TSC's rate as KVM knows it and the local APIC
    # timer's 1 GHz, so the guest runs no calibration loop; its timer still paces sleeps.
    guest = boot(test_guest, "clock ready sleep=300 poweroff")
    m = guest.console.wait_for(
        rf"^{PREFIX}CLOCK tsc_hz=(\d+) tsc_from=(\S+) apic_hz=(\d+) apic_from=(\S+)\r?\n"
    )
    assert (m[2], m[4]) == ("cpuid-0x40000010", "cpuid-0x40000010"), m[0]
    assert int(m[3]) == 1_000_000_000
    assert int(m[1]) > 100_000_000, m[0]
    guest.console.wait_for(f"^{PREFIX}READY")
    ready = time.monotonic()
    guest.console.wait_for(f"^{PREFIX}SLEPT ms=300$")
    assert 0.28 < time.monotonic() - ready < 0.6  # neither early nor held by a slow timer
    assert wait_end(guest, EventKind.POWEROFF) == "acpi_s5"


def test_poweroff_through_acpi(test_guest: Path, boot: Boot) -> None:
    guest = boot(test_guest, "poweroff")
    assert wait_end(guest, EventKind.POWEROFF) == "acpi_s5"
    guest.console.wait_for(f"^{PREFIX}POWEROFF")
    assert guest.machine.state() == MachineState.STOPPED


def test_reboot_through_the_i8042(test_guest: Path, boot: Boot) -> None:
    guest = boot(test_guest, "reboot")
    assert wait_end(guest, EventKind.REBOOT) == "i8042_reset"
    guest.console.wait_for(f"^{PREFIX}REBOOT")


def test_panic_is_reported_and_the_machine_lives_on(test_guest: Path, boot: Boot) -> None:
    guest = boot(test_guest, "panic")
    assert wait_end(guest, EventKind.CRASHED) == "pvpanic"
    guest.console.wait_for(f"^{PREFIX}PANIC")
    assert guest.machine.state() == MachineState.RUNNING
    guest.machine.stop()
    assert guest.machine.state() == MachineState.STOPPED


def test_triple_fault_is_a_reboot(test_guest: Path, boot: Boot) -> None:
    guest = boot(test_guest, "triplefault")
    assert wait_end(guest, EventKind.REBOOT) == "triple_fault"


def test_debug_exit_status(test_guest: Path, boot: Boot) -> None:
    guest = boot(test_guest, "debugexit=5")
    event = guest.machine.wait_event(10)
    assert event is not None
    assert (event.kind, event.reason, event.code) == (EventKind.POWEROFF, "debug_exit", 11)


def counter_values(text: str) -> list[int]:
    return [int(line.split()[-1]) for line in text.splitlines() if "COUNTER " in line]


def test_pause_stops_the_counter_and_resume_continues_it(test_guest: Path, boot: Boot) -> None:
    guest = boot(test_guest, "counter")
    guest.console.wait_for(r"COUNTER 3$")
    guest.machine.pause()
    assert guest.machine.state() == MachineState.PAUSED
    time.sleep(0.05)  # let the console pipe drain what was written before the pause
    frozen = counter_values(guest.console.text)
    time.sleep(0.3)
    assert counter_values(guest.console.text) == frozen
    guest.machine.resume()
    guest.console.wait_for(rf"COUNTER {frozen[-1] + 3}$")
    assert counter_values(guest.console.text)[: len(frozen)] == frozen


def test_graceful_shutdown_through_ctrl_alt_del(test_guest: Path, boot: Boot) -> None:
    guest = boot(test_guest, "ready")
    guest.console.wait_for(f"{PREFIX}READY")
    guest.machine.shutdown()
    assert wait_end(guest, EventKind.POWEROFF) == "acpi_s5"
    guest.console.wait_for(f"{PREFIX}CTRL-ALT-DEL")


def test_memtest_checksum_matches_guest_memory(test_guest: Path, boot: Boot) -> None:
    guest = boot(test_guest, "memtest=16 poweroff", memory_mib=64)
    m = guest.console.wait_for(r"MEMTEST mib=(\d+) base=0x([0-9a-f]+) checksum=0x([0-9a-f]{16})")
    wait_end(guest, EventKind.POWEROFF)
    mib, base, checksum = int(m[1]), int(m[2], 16), int(m[3], 16)
    assert mib == 16
    data = guest.machine.read_memory(base, mib << 20)
    words = struct.unpack(f"<{len(data) // 8}Q", data)
    assert sum(words) % 2**64 == checksum


def test_counter_reads_the_memtest_region_back_every_k_lines(test_guest: Path, boot: Boot) -> None:
    guest = boot(test_guest, "memtest=8 counter=5", memory_mib=64)
    m = guest.console.wait_for(r"MEMTEST mib=8 base=0x[0-9a-f]+ checksum=0x([0-9a-f]{16})")
    guest.console.wait_for(r"MEMCHECK n=1 ok checksum=0x[0-9a-f]{16}")
    lines = guest.console.text.splitlines()
    checks = [i for i, line in enumerate(lines) if "MEMCHECK" in line][:2]
    assert [lines[i].split("MEMCHECK ")[1] for i in checks] == [
        f"n={n} ok checksum=0x{m[1]}" for n in (0, 1)
    ]
    # After COUNTER 4 and COUNTER 9: every fifth line.
    assert lines[checks[0] - 1].endswith("COUNTER 4")
    assert lines[checks[1] - 1].endswith("COUNTER 9")


def test_counter_check_without_a_memtest_says_so(test_guest: Path, boot: Boot) -> None:
    guest = boot(test_guest, "counter=2")
    guest.console.wait_for(r"MEMCHECK n=0 error=no-memtest")


def test_console_input_is_echoed(test_guest: Path, boot: Boot) -> None:
    guest = boot(test_guest, "ready echo")
    guest.console.wait_for(f"{PREFIX}READY")
    # More than the 64-byte UART FIFO, so the input path must wait for the guest.
    line = b"the quick brown fox jumps over the lazy dog " * 4
    guest.console.send(line + b"\n")
    guest.console.wait_for(line.decode().strip())
    assert guest.machine.counters().console_in_bytes == len(line) + 1


def test_no_console_input_reaches_a_paused_machine(test_guest: Path, boot: Boot) -> None:
    """Input typed without pause: once `pause` returns, the UART takes none of it (a save
    captures the UART then, and what it took later would be lost with the machine) until
    `resume`, and then all of it, in order. The console thread reads and feeds under the gate
    a pause takes around its state change (docs/machine.md, Console)."""
    guest = boot(test_guest, "ready echo")
    guest.console.wait_for(f"{PREFIX}READY")
    stop = threading.Event()
    sent = bytearray()

    def type_on() -> None:  # lines of digits, as fast as the pipe takes them
        n = 0
        while not stop.is_set() and len(sent) < 20_000:
            line = f"{n:06d}\n".encode()
            guest.console.send(line)
            sent.extend(line)
            n += 1

    typist = threading.Thread(target=type_on, daemon=True)
    typist.start()
    try:
        for _ in range(40):
            time.sleep(0.005)
            guest.machine.pause()
            before = guest.machine.counters().console_in_bytes
            time.sleep(0.01)
            after = guest.machine.counters().console_in_bytes
            assert after == before, (before, after, guest.machine.state)
            guest.machine.resume()
    finally:
        stop.set()
        typist.join(10)
    last = sent[-7:-1].decode()
    guest.console.wait_for(f"^{PREFIX}{last}$", timeout=30)
    lines = guest.console.drain().splitlines()
    echoed = [ln.removeprefix(PREFIX) for ln in lines if ln.removeprefix(PREFIX).isdigit()]
    assert echoed == [f"{n:06d}" for n in range(int(last) + 1)]  # none lost, none twice


def test_smp_brings_up_every_vcpu(test_guest: Path, boot: Boot) -> None:
    guest = boot(test_guest, "smp poweroff", vcpus=4)
    guest.console.wait_for(f"{PREFIX}SMP 4 ok")
    for cpu in range(4):
        assert f"{PREFIX}CPU {cpu} online" in guest.console.text
    wait_end(guest, EventKind.POWEROFF)


def test_vmm_survives_a_hostile_guest(test_guest: Path, boot: Boot) -> None:
    guest = boot(test_guest, "hostile ready poweroff", vcpus=2)
    guest.console.wait_for(f"{PREFIX}HOSTILE done")
    guest.console.wait_for(f"{PREFIX}READY vcpus=2")
    assert wait_end(guest, EventKind.POWEROFF) == "acpi_s5"
    counters = guest.machine.counters()
    assert counters.unhandled_io + counters.unhandled_mmio > 0


def test_vcpu_state_round_trips_while_paused(test_guest: Path, boot: Boot) -> None:
    guest = boot(test_guest, "smp counter", vcpus=2)
    guest.console.wait_for(r"COUNTER 2$")
    m = guest.machine
    with pytest.raises(native.MachineStateError, match="paused"):
        m.save_vcpu(0)
    m.pause()
    blobs = [m.save_vcpu(i) for i in range(2)]
    assert blobs[0] != blobs[1]
    for i, blob in enumerate(blobs):
        m.restore_vcpu(i, blob)
    with pytest.raises(native.MachineStateError, match="not a vCPU state"):
        m.restore_vcpu(0, bytes(len(blobs[0])))
    with pytest.raises(native.MachineStateError, match="no vCPU"):
        m.save_vcpu(2)
    m.resume()
    frozen = counter_values(guest.console.text)[-1]
    guest.console.wait_for(rf"COUNTER {frozen + 3}$")


def test_the_initrd_reaches_the_guest(test_guest: Path, boot: Boot, tmp_path: Path) -> None:
    """The VMM loads the initrd file and names it as the first hvm_start_info module; the
    guest hashes the module's bytes."""
    data = bytes(range(256)) * 257 + b"tail"
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(data)
    guest = boot(test_guest, "initrd poweroff", initrd=initrd)
    guest.console.wait_for(f"^{PREFIX}{initrd_line(data)}$")
    assert wait_end(guest, EventKind.POWEROFF) == "acpi_s5"
    bare = boot(test_guest, "initrd poweroff")
    bare.console.wait_for(f"^{PREFIX}INITRD none$")


def _huge_kib_of_mapping(size: int) -> int | None:
    """AnonHugePages of this process's mapping exactly `size` bytes long (guest RAM)."""
    smaps = Path("/proc/self/smaps").read_text().split("\n")
    for i, line in enumerate(smaps):
        head = line.split()
        if not head or "-" not in head[0] or len(head[0].split("-")) != 2:
            continue
        try:
            start, end = (int(x, 16) for x in head[0].split("-"))
        except ValueError:
            continue
        if end - start != size:
            continue
        for field in smaps[i + 1 : i + 30]:
            if field.startswith("AnonHugePages:"):
                return int(field.split()[1])
    return None


def test_guest_ram_asks_for_huge_pages(test_guest: Path, boot: Boot) -> None:
    """Guest RAM is aligned for KVM's 2 MiB mappings (native/memory.c), which need huge host
    pages behind it: on a host whose THP policy gives them only on request (`madvise`, this
    one's), the runtime asks, as QEMU does for its RAM."""
    policy = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    if "[never]" in policy:
        pytest.skip(f"the host gives no transparent huge pages: {policy.strip()}")
    memory_mib = 72  # a size no other mapping here has
    g = boot(test_guest, "memtest=32 ready", memory_mib=memory_mib)
    g.console.wait_for("flotilla-guest: READY")
    assert "MEMTEST mib=32 base=" in g.console.text
    huge = _huge_kib_of_mapping(memory_mib << 20)
    assert huge is not None, "no mapping of the guest's RAM size in this process"
    # 32 MiB written through: most of it in 2 MiB pages (some may be split or not yet made).
    assert huge >= 8 * 1024, f"{huge} KiB of huge pages under {memory_mib} MiB of guest RAM"
