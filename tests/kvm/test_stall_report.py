"""The hwvirt tier's report of a guest that stands still (tests/hwvirt/stall.py) reads real
vCPU state: checked here on the test guest, where every value is known."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from native.machine import MachineState
from tests.hwvirt import stall
from tests.kvm.harness import Booted


def test_the_report_reads_each_vcpus_place_and_local_apic(
    test_guest: Path, boot: Callable[..., Booted]
) -> None:
    guest = boot(test_guest, "ready", vcpus=2)
    guest.console.wait_for("flotilla-guest: READY")
    report = stall.describe_machine(guest.machine)
    lines = report.splitlines()
    assert len(lines) == 2, report
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
