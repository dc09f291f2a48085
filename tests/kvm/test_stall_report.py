"""The hwvirt tier's report of a guest that stands still (tests/hwvirt/stall.py) reads real
vCPU state: checked here on the test guest, where every value is known."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import native
from native.machine import MachineState
from tests.hwvirt import stall
from tests.kvm.harness import Booted, Console


def test_the_report_reads_each_vcpus_place_and_local_apic(
    test_guest: Path, boot: Callable[..., Booted]
) -> None:
    guest = boot(test_guest, "ready", vcpus=2)
    guest.console.wait_for("flotilla-guest: READY")
    report = stall.describe_machine(guest.machine)
    lines = report.splitlines()
    assert len(lines) >= 4, report
    assert lines[2].startswith("ioapic: lines="), report
    # The boot CPU is in the guest's code; the AP was never started by this guest.
    assert re.match(
        r"vCPU 0: (halted|runnable) rip=0x10[0-9a-f]{4} \(\?\) if=[01] apic_id=0 ", lines[0]
    )
    assert re.match(r"vCPU 1: uninitialized rip=0xfff0 .* apic_id=1 ", lines[1]), lines[1]
    assert "timer: lvtt=0x" in lines[0]
    # The machine runs on after the report.
    assert guest.machine.state() is MachineState.RUNNING
    threads = stall.describe_process(os.getpid())
    assert "kvm_vcpu_block" in threads or "kvm_arch_vcpu_ioctl_run" in threads, threads


def test_the_devices_report_gives_each_queues_indexes_ours_beside_the_guests(
    test_guest: Path, boot: Callable[..., Booted], tmp_path: Path
) -> None:
    """After a known number of requests, every index agrees: what a lost notification
    (guest's avail.idx ahead of our last_avail) or a lost interrupt (our used_idx ahead of
    what the driver took) would show as a difference."""
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(1 << 20)
    console = Console()
    machine = native.Machine(
        test_guest,
        cmdline="blkwrite=0,8,1 blkflush ready",
        memory_mib=32,
        console_out=console.write_fd,
        console_in=console.input_fd,
        disks=[native.Disk(str(image))],
    )
    try:
        machine.start()
        console.wait_for("flotilla-guest: READY")
        report = machine.describe_devices()
    finally:
        machine.close()
        console.close()
    assert re.search(r"^virtio 0 \(virtio_blk, pin 16\): status=0xf ", report, re.M), report
    m = re.search(
        r"queue 0: size \d+; ours: last_avail (\d+) used_idx (\d+); guest's: "
        r"avail.idx (\d+) avail.flags 0x[0-9a-f]+ used.idx (\d+)",
        report,
    )
    assert m is not None, report
    last_avail, used_idx, avail_idx, guest_used = (int(g) for g in m.groups())
    assert last_avail >= 2, report  # a write and a flush at least
    assert used_idx == avail_idx == guest_used == last_avail, report
    # The UART (pin 4) and the disk's pin are live entries with their vectors.
    assert re.search(r"^serial: ier=0x[0-9a-f]+ ", report, re.M), report
    assert re.search(r"^  pin 16: vector \d+ .*irqfd=yes", report, re.M), report
