"""The ways an x86 guest resets the machine, each one a REBOOT event (docs/machine.md).

Linux's default on hardware-reduced ACPI without EFI ends in a "BIOS" reboot: a jump to the
reset vector at 0xFFFF0; `reboot=acpi` writes the FADT's RESET_REG; `reboot=k` pulses the
i8042's reset line. A guest of a few instructions takes each path.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

from native import EventKind, MachineState
from tests.kvm.harness import Booted
from tests.kvm.test_acpi_tables import ACPI_BASE, ACPI_SIZE
from tests.kvm.tinyguest import build_pvh_elf, write_tiny_guest

FADT_RESET_REG_SUP = 1 << 10


def fadt_of(guest: Booted) -> bytes:
    area = guest.machine.read_memory(ACPI_BASE, ACPI_SIZE)
    xsdt = struct.unpack_from("<Q", area, 24)[0] - ACPI_BASE
    fadt = struct.unpack_from("<Q", area, xsdt + 36)[0] - ACPI_BASE
    length = struct.unpack_from("<I", area, fadt + 4)[0]
    table = area[fadt : fadt + length]
    assert table[:4] == b"FACP"
    assert sum(table) % 256 == 0, "FADT checksum"
    return table


def reset_event(guest: Booted) -> str:
    event = guest.machine.wait_event(10)
    assert event is not None
    assert event.kind is EventKind.REBOOT, event
    assert guest.machine.state() == MachineState.STOPPED
    return event.reason


def test_a_jump_to_the_reset_vector_resets(tmp_path: Path, boot: Callable[..., Booted]) -> None:
    # Where Linux's machine_real_restart lands (F000:FFF0): it used to find zero bytes there
    # and spin forever, so `reboot` inside Linux never reached the VMM.
    kernel = tmp_path / "jump.elf"
    kernel.write_bytes(build_pvh_elf(b"\xb8\xf0\xff\x0f\x00\xff\xe0"))  # mov eax, 0xffff0; jmp eax
    assert reset_event(boot(kernel)) == "i8042_reset"


def test_the_fadt_reset_register_resets(tmp_path: Path, boot: Callable[..., Booted]) -> None:
    # reboot=acpi: ACPI 2.0+ RESET_REG (offset 116, a GAS) and RESET_VALUE (offset 128),
    # valid when FADT flag RESET_REG_SUP is set. The guest writes what the FADT says.
    probe = boot(write_tiny_guest(tmp_path / "probe.elf"), start=False)
    fadt = fadt_of(probe)
    assert struct.unpack_from("<I", fadt, 112)[0] & FADT_RESET_REG_SUP
    space, width, offset, _access, port = struct.unpack_from("<BBBBQ", fadt, 116)
    assert (space, width, offset) == (1, 8, 0)  # SystemIO, one byte
    value = fadt[128]
    kernel = tmp_path / "acpi-reset.elf"
    # mov dx, port; mov al, value; out dx, al; hlt
    kernel.write_bytes(
        build_pvh_elf(b"\x66\xba" + struct.pack("<H", port) + bytes([0xB0, value, 0xEE, 0xF4]))
    )
    assert reset_event(boot(kernel)) == "reset_control"


def test_a_reset_control_write_without_rst_cpu_does_nothing(
    tmp_path: Path, boot: Callable[..., Booted]
) -> None:
    # Linux's CF9 path writes SYS_RST (0x02) first, then RST_CPU with it: only the second resets.
    kernel = tmp_path / "cf9.elf"
    # mov dx, 0xcf9; mov al, 2; out dx, al; in al, dx; mov dx, 0xf4; out dx, al (exit code)
    code = b"\x66\xba\xf9\x0c\xb0\x02\xee\xec\x66\xba\xf4\x00\xee\xf4"
    kernel.write_bytes(build_pvh_elf(code))
    guest = boot(kernel)
    event = guest.machine.wait_event(10)
    assert event is not None
    assert (event.kind, event.reason, event.code) == (EventKind.POWEROFF, "debug_exit", 1)
