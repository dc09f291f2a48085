"""The VMM's IOAPIC (split irqchip): the test guest's `ioapic` and `irqwait` actions and
interrupts raised through an eventfd (docs/machine.md)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from native import EventKind
from tests.kvm.harness import Booted

Boot = Callable[..., Booted]
PREFIX = "flotilla-guest: "


def poweroff_reason(guest: Booted) -> str:
    return str(guest.wait_end(EventKind.POWEROFF).reason)


def test_guest_reprograms_masks_and_retires_level_interrupts(test_guest: Path, boot: Boot) -> None:
    # Registers, masks, edge and level pins, Remote IRR through KVM's EOI exit and the EOI
    # register; then garbage from `hostile` and the same checks again.
    guest = boot(test_guest, "ioapic hostile ioapic poweroff", vcpus=2)
    assert poweroff_reason(guest) == "acpi_s5"
    text = guest.console.text
    assert text.count(f"{PREFIX}IOAPIC ok version=0x20 pins=24") == 2, text
    assert "FAILED" not in text
    assert guest.machine.counters().devices["ioapic"].writes > 0


def test_input_interrupts_still_work_after_the_ioapic_test(test_guest: Path, boot: Boot) -> None:
    guest = boot(test_guest, "ioapic ready")
    guest.console.wait_for(f"{PREFIX}READY")
    guest.machine.shutdown()
    assert poweroff_reason(guest) == "acpi_s5"
    guest.console.wait_for(f"{PREFIX}CTRL-ALT-DEL")


def test_eventfd_edges_reach_an_unmasked_pin_and_are_dropped_while_masked(
    test_guest: Path, boot: Boot
) -> None:
    guest = boot(test_guest, "irqwait=9 poweroff", start=False)
    fd = os.eventfd(0)
    try:
        guest.machine.bind_irq_eventfd(9, fd)
        # Pin 9 is masked until the guest routes it. KVM has no route for a masked pin, so
        # it hands the edge to a kernel worker (irqfd_inject), which looks the route up when
        # it runs: normally at once, and the edge is dropped; on a loaded host that worker
        # may run only after the guest has unmasked the pin, and the edge is delivered then,
        # as an edge arriving at the unmask would be. Either is right; never more than one.
        os.eventfd_write(fd, 1)
        guest.machine.start()
        armed = guest.console.wait_for(f"{PREFIX}IRQWAIT pin=9 armed pending=(\\d+)")
        assert armed.group(1) in ("0", "1"), armed.group(0)
        if armed.group(1) == "1":  # the late edge was taken at the unmask
            guest.console.wait_for(f"{PREFIX}IRQWAIT pin=9 taken")
            assert poweroff_reason(guest) == "acpi_s5"
            return
        os.eventfd_write(fd, 1)
        guest.console.wait_for(f"{PREFIX}IRQWAIT pin=9 taken")
        assert poweroff_reason(guest) == "acpi_s5"
    finally:
        os.close(fd)


def test_eventfd_binding_checks_the_pin(test_guest: Path, boot: Boot) -> None:
    guest = boot(test_guest, "poweroff", start=False)
    fd = os.eventfd(0)
    try:
        with pytest.raises(ValueError, match="GSI"):
            guest.machine.bind_irq_eventfd(24, fd)
    finally:
        os.close(fd)
