"""The ACPI tables the VMM writes (docs/machine.md), read back from guest memory.

The devices Linux must find through the DSDT are checked byte for byte against an encoding
written here by hand (ACPI 6.4 chapter 20), independent of the C writer.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

from tests.kvm.harness import Booted
from tests.kvm.tinyguest import write_tiny_guest

ACPI_BASE = 0xE0000
ACPI_SIZE = 0x20000


def pkg_length(data: bytes, at: int) -> tuple[int, int]:
    """(PkgLength value, bytes it took) at data[at]."""
    lead = data[at]
    follow = lead >> 6
    if follow == 0:
        return lead & 0x3F, 1
    value = lead & 0x0F
    for i in range(follow):
        value |= data[at + 1 + i] << (4 + 8 * i)
    return value, follow + 1


def dsdt_of(read: Callable[[int, int], bytes]) -> bytes:
    area = read(ACPI_BASE, ACPI_SIZE)
    assert area[:8] == b"RSD PTR "
    xsdt = struct.unpack_from("<Q", area, 24)[0] - ACPI_BASE
    fadt = struct.unpack_from("<Q", area, xsdt + 36)[0] - ACPI_BASE
    assert area[fadt : fadt + 4] == b"FACP"
    dsdt = struct.unpack_from("<Q", area, fadt + 140)[0] - ACPI_BASE
    length = struct.unpack_from("<I", area, dsdt + 4)[0]
    table = area[dsdt : dsdt + length]
    assert table[:4] == b"DSDT"
    assert sum(table) % 256 == 0, "DSDT checksum"
    return table


def system_bus_devices(dsdt: bytes) -> dict[str, bytes]:
    """Device name -> body (after the name) of each Device directly in Scope (\\_SB)."""
    aml = dsdt[36:]
    at = aml.index(b"\x10")  # ScopeOp, after Name (_S5, ...)
    length, n = pkg_length(aml, at + 1)
    scope = aml[at + 1 : at + 1 + length]
    assert scope[n : n + 5] == b"\\_SB_"
    pos, devices = n + 5, {}
    while pos < len(scope):
        assert scope[pos : pos + 2] == b"\x5b\x82", f"not a Device at {pos}: {scope[pos:]!r}"
        length, n = pkg_length(scope, pos + 2)
        body = scope[pos + 2 : pos + 2 + length]
        devices[body[n : n + 4].decode()] = body[n + 4 :]
        pos += 2 + length
    return devices


def name_string(name: bytes, text: bytes) -> bytes:
    return b"\x08" + name + b"\x0d" + text + b"\x00"


def name_byte(name: bytes, value: int) -> bytes:
    return b"\x08" + name + b"\x0a" + bytes([value])


def crs(*descriptors: bytes) -> bytes:
    body = b"".join(descriptors) + b"\x79\x00"
    size = bytes([0x0A, len(body)])
    return b"\x08_CRS\x11" + bytes([len(size) + len(body) + 1]) + size + body


def io(port: int, length: int) -> bytes:
    return struct.pack("<BBHHBB", 0x47, 1, port, port, 1, length)


def irq(line: int) -> bytes:
    return struct.pack("<BH", 0x22, 1 << line)


def test_dsdt_names_com1_with_its_port_and_isa_irq(
    tmp_path: Path, boot: Callable[..., Booted]
) -> None:
    # Without 8259s Linux maps no ISA IRQ by itself: the 8250 gets its interrupt (and tty
    # output, which waits for THRE interrupts, works) only through this PNP0501 device.
    guest = boot(write_tiny_guest(tmp_path / "g.elf"), start=False)
    devices = system_bus_devices(dsdt_of(guest.machine.read_memory))
    assert devices["COM1"] == (
        name_string(b"_HID", b"PNP0501") + name_byte(b"_UID", 1) + crs(io(0x3F8, 8), irq(4))
    )


def test_dsdt_names_the_i8042_keyboard_with_its_ports_and_irq(
    tmp_path: Path, boot: Callable[..., Booted]
) -> None:
    # Linux's i8042 requests IRQ 1 by number when no PNP0303 is found, which fails without
    # 8259s ("probe of i8042 failed with error -22").
    guest = boot(write_tiny_guest(tmp_path / "g.elf"), start=False)
    devices = system_bus_devices(dsdt_of(guest.machine.read_memory))
    assert devices["PS2K"] == (
        name_string(b"_HID", b"PNP0303") + crs(io(0x60, 1), io(0x64, 1), irq(1))
    )


def test_dsdt_has_a_ged_power_button_and_pvpanic(
    tmp_path: Path, boot: Callable[..., Booted]
) -> None:
    # Hardware-reduced ACPI has no fixed-feature power button: a GED's interrupt (GSI 5) runs
    # _EVT, which notifies PWRB with 0x80 ("pressed"); pvpanic is QEMU0001 at port 0x505.
    guest = boot(write_tiny_guest(tmp_path / "g.elf"), start=False)
    devices = system_bus_devices(dsdt_of(guest.machine.read_memory))
    assert devices["PWRB"] == name_string(b"_HID", b"PNP0C0C")
    interrupt = struct.pack("<BHBBI", 0x89, 6, 0x03, 1, 5)  # consumer, edge, high, exclusive
    notify = b"\x86PWRB\x0a\x80"
    evt = b"\x14" + bytes([1 + 4 + 1 + len(notify)]) + b"_EVT\x01" + notify
    assert devices["GED0"] == name_string(b"_HID", b"ACPI0013") + crs(interrupt) + evt
    assert devices["PEVT"] == name_string(b"_HID", b"QEMU0001") + crs(io(0x505, 1))
