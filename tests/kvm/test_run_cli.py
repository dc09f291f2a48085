"""A guest on the terminal, its end as the exit status: `python -m native.run` and
`flotilla-vmm` (native/cmd/flotilla-vmm.c, the runtime with no interpreter in front), which
answer alike."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from native import vmm_binary

FRONT_ENDS = ("native.run", "flotilla-vmm")


@pytest.fixture(scope="module")
def flotilla_vmm() -> Path:
    try:
        return vmm_binary.build()
    except vmm_binary.VmmBuildError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(params=FRONT_ENDS)
def front_end(request: pytest.FixtureRequest) -> list[str]:
    """The command that starts a guest: native.run, or the built flotilla-vmm."""
    if request.param == "native.run":
        return [sys.executable, "-m", "native.run"]
    return [str(request.getfixturevalue("flotilla_vmm"))]


def run(
    argv: list[str], kernel: Path, cmdline: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*argv, "--kernel", str(kernel), "--cmdline", cmdline, "--memory", "32", *extra],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    "case",
    [
        ("ready poweroff", 0, "POWEROFF (acpi_s5)"),
        ("debugexit=3", 7, "POWEROFF (debug_exit, code 7)"),
        ("reboot", 2, "REBOOT (i8042_reset)"),
        ("panic", 4, "CRASHED (pvpanic)"),
    ],
)
def test_exit_status_maps_the_event(
    kvm: None, test_guest: Path, front_end: list[str], case: tuple[str, int, str]
) -> None:
    cmdline, status, said = case
    proc = run(front_end, test_guest, cmdline)
    assert proc.returncode == status, proc.stderr
    assert said in proc.stderr
    # The summary says when the guest began to run and when it stopped, from the start.
    times = re.search(
        r"; vCPUs running (\d+\.\d+) s after the start, stopped at (\d+\.\d+) s", proc.stderr
    )
    assert times, proc.stderr
    assert 0 < float(times[1]) <= float(times[2]) < 30
    if cmdline.startswith("ready"):
        assert "flotilla-guest: READY vcpus=1 memory_mib=32" in proc.stdout


def test_bad_kernel_is_a_usage_error(tmp_path: Path, front_end: list[str]) -> None:
    proc = run(front_end, tmp_path / "missing.elf", "")
    assert proc.returncode == 64
    assert "missing.elf" in proc.stderr


@pytest.mark.parametrize(
    "args",
    [["--vcpus", "0"], ["--memory", "lots"], ["--disk", "x,rw"], ["--no-such-flag", "1"]],
)
def test_a_bad_command_line_is_a_usage_error(
    test_guest: Path, front_end: list[str], args: list[str]
) -> None:
    proc = run(front_end, test_guest, "ready poweroff", *args)
    assert proc.returncode == 64, proc.stderr
    assert proc.stderr.strip(), "no word on what was wrong"


def test_flotilla_vmm_writes_a_disk_the_host_reads(
    kvm: None, test_guest: Path, flotilla_vmm: Path, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(1 << 20)
    proc = run(
        [str(flotilla_vmm)],
        test_guest,
        "blkinfo blkwrite=0,8,5 blkflush poweroff",
        "--disk",
        str(image),
    )
    assert proc.returncode == 0, proc.stderr
    assert "BLK write sector=0 count=8 status=ok" in proc.stdout
    assert image.read_bytes()[: 8 * 512] != bytes(8 * 512)
    ro = run([str(flotilla_vmm)], test_guest, "blkwrite=0,8,5 poweroff", "--disk", f"{image},ro")
    assert ro.returncode == 0, ro.stderr
    assert "BLK write sector=0 count=8 status=" in ro.stdout
    assert "BLK write sector=0 count=8 status=ok" not in ro.stdout


def test_sigusr1_prints_where_the_guest_stands_and_it_runs_on(
    kvm: None, test_guest: Path, front_end: list[str]
) -> None:
    proc = subprocess.Popen(
        [*front_end, "--kernel", str(test_guest), "--vcpus", "2", "--cmdline", "ready",
         "--memory", "32"],
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
    assert ": where the guest stands" in err
    assert re.search(r"^ioapic: lines=", err, re.M), err
    assert re.search(r"^serial: ier=0x", err, re.M), err
    assert re.search(r"^vCPU 0: (halted|runnable) rip=0x", err, re.M), err
    assert re.search(r"^vCPU 1: uninitialized ", err, re.M), err
    assert ": stopped from the host" in err
