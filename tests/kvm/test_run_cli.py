"""`python -m native.run`: a guest on the terminal, its end as the exit status."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def run(kernel: Path, cmdline: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "native.run",
            "--kernel",
            str(kernel),
            "--cmdline",
            cmdline,
            "--memory",
            "32",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("cmdline", "status", "said"),
    [
        ("ready poweroff", 0, "POWEROFF (acpi_s5)"),
        ("debugexit=3", 7, "POWEROFF (debug_exit, code 7)"),
        ("reboot", 2, "REBOOT (i8042_reset)"),
        ("panic", 4, "CRASHED (pvpanic)"),
    ],
)
def test_exit_status_maps_the_event(
    kvm: None, test_guest: Path, cmdline: str, status: int, said: str
) -> None:
    proc = run(test_guest, cmdline)
    assert proc.returncode == status, proc.stderr
    assert said in proc.stderr
    if cmdline.startswith("ready"):
        assert "flotilla-guest: READY vcpus=1 memory_mib=32" in proc.stdout


def test_bad_kernel_is_a_usage_error(tmp_path: Path) -> None:
    proc = run(tmp_path / "missing.elf", "")
    assert proc.returncode == 64
    assert "is not a file" in proc.stderr


def test_sigusr1_prints_where_the_guest_stands_and_it_runs_on(kvm: None, test_guest: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "native.run", "--kernel", str(test_guest), "--vcpus", "2",
         "--cmdline", "ready", "--memory", "32"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert "flotilla-guest: READY" in proc.stdout.readline()
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        assert proc.poll() is None  # it runs on
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()  # the VMM this test started
            proc.wait(10)
    assert proc.returncode == 130, err
    assert "native.run: where the guest stands" in err
    assert re.search(r"^vCPU 0: (halted|runnable) rip=0x", err, re.M), err
    assert re.search(r"^vCPU 1: uninitialized ", err, re.M), err
    assert re.search(r"^ioapic: lines=", err, re.M), err
    assert "native.run: stopped from the host" in err
