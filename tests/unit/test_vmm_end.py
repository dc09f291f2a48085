"""`vmm_client.end()`: a VMM is ended by the pid it recorded, and only a process that holds
the domain dir's lock and runs in that dir is ever signalled (no KVM needed: a stand-in
process plays the VMM)."""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from compute_node.vmm.client import end


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[Callable[[Path], subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(cwd: Path) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["sleep", "60"], cwd=cwd)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _lock(pid_file: Path, pid: int) -> int:
    """Write `pid` and hold the lock as a VMM does (here: the test process holds it)."""
    fd = os.open(pid_file, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, f"{pid}\n".encode(), 0)
    return fd


def test_end_signals_only_the_process_running_in_the_domain_dir(
    tmp_path: Path, sleeper: Callable[[Path], subprocess.Popen[bytes]]
) -> None:
    domain = tmp_path / "domain"
    domain.mkdir()
    assert end(domain) is None  # no vmm.pid at all
    stranger = sleeper(tmp_path)  # a recycled pid: some process elsewhere
    (domain / "vmm.pid").write_text(f"{stranger.pid}\n")
    assert end(domain) is None  # nobody holds the lock: no VMM runs
    fd = _lock(domain / "vmm.pid", stranger.pid)
    try:
        assert end(domain) is None  # locked, but that pid does not run in the dir
        assert stranger.poll() is None
        vmm = sleeper(domain)
        os.pwrite(fd, f"{vmm.pid}\n".encode(), 0)
        assert end(domain, timeout=5.0) == vmm.pid
        assert vmm.wait(5) == -15  # SIGTERM first
        assert stranger.poll() is None
    finally:
        os.close(fd)
