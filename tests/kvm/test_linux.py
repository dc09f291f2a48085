"""Debian's cloud kernel on our VMM (docs/images.md).

Under PVM (no vmx/svm) guest ring 0 is emulated, so Linux only gets as far as its early boot
messages: the vmlinux test checks those and stops the guest. A full boot to the initramfs needs
hardware virtualization: it is marked `hwvirt` and runs in the nested L1 on hosts without
vmx/svm (tests/hwvirt/, docs/testing.md).
"""

from __future__ import annotations

import re
import struct
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

import native
from native.images import ImageError, LinuxImages, fetch_images
from native.machine import Event, EventKind, ImageKind
from tests.kvm.harness import Console

MIB = 1 << 20
MEMORY_MIB = 256
EARLY_TIMEOUT = 180.0  # ~23 s of wall time on an idle PVM host; leave room for a busy one
FULL_BOOT_TIMEOUT = 900.0  # minutes in the nested L1 on a busy host (docs/testing.md)


def images(*, initramfs: bool) -> LinuxImages:
    """The cached kernel, fetched if needed; a failure to fetch fails the test."""
    try:
        return fetch_images(initramfs=initramfs)
    except ImageError as exc:
        why = str(exc)
    pytest.fail(f"cannot fetch the Linux guest images: {why}", pytrace=False)


def expected_e820(kind: ImageKind, memory_mib: int) -> list[str]:
    """The BIOS-e820 lines Linux prints for docs/machine.md's map (RAM below 3 GiB)."""
    top = memory_mib * MIB - 1
    if kind is ImageKind.PVH:
        # Linux's PVH entry adds the ISA hole 0xA0000-0xFFFFF as reserved itself, and
        # merging it with the EBDA and ACPI ranges leaves one reserved range.
        ranges = [(0, 0x9FBFF, "usable"), (0x9FC00, 0xFFFFF, "reserved")]
    else:
        ranges = [
            (0, 0x9FBFF, "usable"),
            (0x9FC00, 0x9FFFF, "reserved"),
            (0xE0000, 0xFFFFF, "reserved"),
        ]
    ranges.append((0x100000, top, "usable"))
    return [f"BIOS-e820: [mem 0x{a:016x}-0x{b:016x}] {t}" for a, b, t in ranges]


class LinuxConsole:
    """A started machine and its console, waited on together: a machine-ending event while
    waiting for output fails the test at once with the console so far."""

    def __init__(self, machine: native.Machine, console: Console) -> None:
        self.machine = machine
        self.console = console
        self.started = time.monotonic()
        self.event: Event | None = None

    def lines(self) -> list[str]:
        # Only complete lines; kernel messages are stripped of their timestamps.
        text = self.console.text.replace("\r", "")
        complete = text[: text.rfind("\n") + 1]
        return [re.sub(r"^\[\s*\d+\.\d+\] ", "", ln) for ln in complete.splitlines()]

    def wait_until(self, what: str, done: Callable[[list[str]], bool], timeout: float) -> float:
        """Polls `done(lines)` until true; returns the seconds since start."""
        deadline = time.monotonic() + timeout
        while not done(self.lines()):
            if self.event is None:
                self.event = self.machine.wait_event(0.2)
            else:
                time.sleep(0.2)
            if self.event is not None and self.event.kind is not EventKind.CRASHED:
                time.sleep(0.5)  # output written before the event may still be in the pipe
                if done(self.lines()):
                    break
                pytest.fail(
                    f"the guest ended ({self.event}) before {what}; console:\n{self.console.text}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout:.0f} s; console:\n{self.console.text}")
        return time.monotonic() - self.started


def boot(kernel: Path, cmdline: str, initrd: Path | None = None) -> tuple[LinuxConsole, Console]:
    console = Console()
    try:
        machine = native.Machine(
            kernel,
            initrd=initrd,
            cmdline=cmdline,
            memory_mib=MEMORY_MIB,
            console_out=console.write_fd,
            console_in=console.input_fd,
        )
    except BaseException:
        console.close()
        raise
    linux = LinuxConsole(machine, console)
    machine.start()
    linux.started = time.monotonic()
    return linux, console


def e820_block(lines: list[str]) -> list[str] | None:
    """The BIOS-e820 lines once a complete line follows them (the table is printed whole)."""
    idx = [i for i, ln in enumerate(lines) if ln.startswith("BIOS-e820:")]
    if not idx or idx[-1] + 1 >= len(lines):
        return None
    return [lines[i] for i in idx]


def without_pvh_note(vmlinux: Path, out: Path) -> Path:
    """A copy of an ELF64 vmlinux whose XEN_ELFNOTE_PHYS32_ENTRY note has another type, so the
    VMM takes the 64-bit boot protocol (zero page, long-mode entry at e_entry)."""
    data = bytearray(vmlinux.read_bytes())
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    (phnum,) = struct.unpack_from("<H", data, 0x38)
    for i in range(phnum):
        kind, _, offset, _, _, size = struct.unpack_from("<IIQQQQ", data, phoff + 56 * i)
        at = offset
        while kind == 4 and at + 12 <= offset + size:  # PT_NOTE
            namesz, descsz, note = struct.unpack_from("<III", data, at)
            if note == 18 and data[at + 12 : at + 16] == b"Xen\0":
                struct.pack_into("<I", data, at + 8, 0x7FFF_FFFF)
            at += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    out.write_bytes(data)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("entry", [ImageKind.PVH, ImageKind.VMLINUX], ids=["pvh", "linux64"])
def test_vmlinux_prints_version_command_line_and_memory_map(
    kvm: None, tmp_path: Path, entry: ImageKind
) -> None:
    kernel = images(initramfs=False).vmlinux
    if entry is ImageKind.VMLINUX:
        kernel = without_pvh_note(kernel, tmp_path / "vmlinux")
    assert native.parse_image(kernel.read_bytes()).kind is entry
    marker = f"flotilla.test={uuid.uuid4().hex[:12]}"
    cmdline = f"console=ttyS0 earlyprintk=serial,ttyS0 acpi=off {marker}"
    linux, console = boot(kernel, cmdline)
    try:
        t_version = linux.wait_until(
            "'Linux version'",
            lambda ls: any(ln.startswith("Linux version ") for ln in ls),
            EARLY_TIMEOUT,
        )
        t_cmdline = linux.wait_until(
            "'Command line:'",
            lambda ls: any(ln.startswith("Command line:") for ln in ls),
            EARLY_TIMEOUT,
        )
        t_e820 = linux.wait_until(
            "the BIOS-e820 map", lambda ls: e820_block(ls) is not None, EARLY_TIMEOUT
        )
    finally:
        linux.machine.stop()
        linux.machine.close()
        console.close()
    lines = linux.lines()
    assert f"Command line: {cmdline}" in lines
    assert e820_block(lines) == expected_e820(entry, MEMORY_MIB)
    print(  # shown with -s: how far the emulated boot got and when
        f"{entry.name}: Linux version at {t_version:.1f} s, command line at {t_cmdline:.1f} s, "
        f"e820 at {t_e820:.1f} s"
    )


# A full boot needs vmx/svm (under PVM guest ring 0 is emulated, ~1000x slower): where the
# host lacks them this runs in the nested L1 (tests/hwvirt/).
@pytest.mark.slow
@pytest.mark.hwvirt
@pytest.mark.timeout(2 * FULL_BOOT_TIMEOUT + 60)
def test_bzimage_boots_initramfs_to_ready_and_powers_off(kvm: None) -> None:
    found = images(initramfs=True)
    assert found.initramfs is not None
    cmdline = "console=ttyS0 panic=-1 flotilla.test=initramfs"
    linux, console = boot(found.vmlinuz, cmdline, initrd=found.initramfs)
    try:
        linux.wait_until(
            "'flotilla-linux: READY'",
            lambda ls: "flotilla-linux: READY" in ls,
            FULL_BOOT_TIMEOUT,
        )
        event = linux.event or linux.machine.wait_event(FULL_BOOT_TIMEOUT)
    finally:
        linux.machine.stop()
        linux.machine.close()
        console.close()
    text = console.text
    assert event is not None, f"no event after READY; console:\n{text}"
    assert event.kind is EventKind.POWEROFF, f"{event}; console:\n{text}"
    assert not re.search(r"flotilla-linux: (module \S+ absent|insmod \S+ failed)", text), text
