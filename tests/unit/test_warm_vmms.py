"""Warm VMMs (compute_node/warm_vmms.py, compute_node/vmm/warm.py and vmm/spare.py): a spare
VMM process takes a domain over its socketpair with the descriptors passed by SCM_RIGHTS and
becomes the VMM a cold spawn would have started; whatever goes wrong with the spare, the
start goes cold. No KVM needed: the domains here wait for an incoming migration, which
makes no machine."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from compute_node.vmm.client import VmmClient, VmmSpawnError, end, spawn
from compute_node.vmm.config import IncomingConfig, LaunchConfig
from compute_node.vmm.spare import pack, place_fds, unpack
from compute_node.vmm.warm import Spare, SpareUnusable, end_leftovers, start_time
from compute_node.warm_vmms import WarmVmms

TOKEN = "5a" * 32


def write_config(directory: Path, *, kernel: str = "/nonexistent/guest.elf") -> None:
    directory.mkdir(exist_ok=True)
    LaunchConfig(
        domain_id=directory.name,
        name=directory.name,
        kernel=kernel,  # never read: the machine would come from the stream
        initrd=None,
        cmdline="",
        disks=[],
        memory_mib=32,
        vcpus=1,
        on_poweroff="destroy",
        on_reboot="restart",
        on_crash="destroy",
        console_ring_bytes=65536,
        console_log=True,
        start_paused=False,
        cgroup=None,
        incoming=IncomingConfig("127.0.0.1", 0, TOKEN, False, 60.0),
    ).write(str(directory))


def wait_until(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Callable[..., WarmVmms]]:
    made: list[WarmVmms] = []

    def make(count: int = 1, **kwargs: Any) -> WarmVmms:
        warm = WarmVmms(tmp_path / "spares", count, **kwargs)
        made.append(warm)
        return warm

    yield make
    for warm in made:
        warm.close()
    for directory in tmp_path.iterdir():
        if (directory / "vmm.json").exists():
            end(directory)


def ready_spare(warm: WarmVmms) -> int:
    wait_until(lambda: len(warm.pids()) == 1)
    return warm.pids()[0]


def describe(pid: int, directory: Path) -> dict[str, object]:
    """What a VMM process is, as far as where it came from must not matter."""
    proc = Path(f"/proc/{pid}")

    fds = {}
    for link in (proc / "fd").iterdir():
        try:
            target = str(link.readlink())
        except FileNotFoundError:
            continue  # closed meanwhile (a wait's connection)
        fds[link.name] = (
            target.split(":", 1)[0] if ":" in target else target.replace(str(directory), "D")
        )
    status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines())
    return {
        "fds": sorted(fds.values()),
        "stdio": [fds["0"], fds["1"], fds["2"]],
        "cwd": str((proc / "cwd").readlink()).replace(str(directory), "D"),
        "session leader": os.getsid(pid) == pid,
        "group leader": os.getpgid(pid) == pid,
        "nice": os.getpriority(os.PRIO_PROCESS, pid),
        "limits": (proc / "limits").read_text(),
        "cgroup": (proc / "cgroup").read_text(),
        "ids": (status["Uid"], status["Gid"], status["Groups"]),
        "signals": (status["SigBlk"], status["SigIgn"]),
        "threads": status["Threads"],
    }


def test_a_spare_becomes_exactly_the_vmm_a_cold_spawn_starts(
    pool: Callable[..., WarmVmms], tmp_path: Path
) -> None:
    warm = pool()
    spare = ready_spare(warm)
    pid_files = list((tmp_path / "spares").glob("*.pid"))
    assert [int(f.read_text().split()[0]) for f in pid_files] == [spare]
    boot = tmp_path / "boot.bin"
    boot.write_bytes(b"kernel")
    fd = os.open(boot, os.O_RDONLY | os.O_CLOEXEC)
    try:
        warm_dir, cold_dir = tmp_path / "warm", tmp_path / "cold"
        write_config(warm_dir)
        write_config(cold_dir)
        pid = warm.launch(warm_dir, [fd], timeout=10.0)
        cold = spawn(cold_dir, pass_fds=[fd])
    finally:
        os.close(fd)
    assert pid == spare
    assert (warm.warm_starts, warm.cold_starts) == (1, 0)
    assert not pid_files[0].exists()  # no longer a spare: a restarting node leaves it be
    status = VmmClient(warm_dir).status()
    assert status.pid == pid
    assert status.incoming_port is not None
    # The inherited descriptor under its number, the very file.
    assert Path(f"/proc/{pid}/fd/{fd}").stat().st_ino == boot.stat().st_ino
    assert (warm_dir / "vmm.pid").read_text() == f"{pid}\n"
    assert stat.S_IMODE((warm_dir / "control.sock").stat().st_mode) == 0o600
    # Equal once each has closed the connections of the waits for it (sockets it accepted).
    deadline = time.monotonic() + 5
    while (ours := describe(pid, warm_dir)) != (theirs := describe(cold, cold_dir)):
        assert time.monotonic() < deadline, f"{ours}\n!=\n{theirs}"
        time.sleep(0.05)
    assert ours["stdio"] == ["/dev/null", "D/vmm.log", "D/vmm.log"]
    assert ours["cwd"] == "D"
    # The next spare comes (the launch ran outside any report, so at once).
    wait_until(lambda: len(warm.pids()) == 1)
    assert warm.pids() != [spare]


def test_the_assigned_vmm_fails_like_a_cold_one_and_is_not_started_again(
    pool: Callable[..., WarmVmms], tmp_path: Path
) -> None:
    warm = pool()
    spare = ready_spare(warm)
    domain = tmp_path / "d"
    domain.mkdir()
    (domain / "vmm.json").write_text('{"domain_id": "d", "name": "d", "memory_mib": 32}')
    with pytest.raises(VmmSpawnError, match="missing 'kernel'"):
        warm.launch(domain, [], timeout=10.0)
    assert (warm.warm_starts, warm.cold_starts) == (0, 0)
    assert gone(spare)
    assert not (domain / "vmm.pid").exists()


def test_a_killed_spare_is_replaced_and_the_start_goes_cold(
    pool: Callable[..., WarmVmms], tmp_path: Path
) -> None:
    warm = pool()
    spare = ready_spare(warm)
    os.kill(spare, signal.SIGKILL)
    wait_until(lambda: gone(spare))
    domain = tmp_path / "d"
    write_config(domain)
    pid = warm.launch(domain, [], timeout=10.0)
    assert pid != spare
    assert (warm.warm_starts, warm.cold_starts) == (0, 1)
    assert VmmClient(domain).status().pid == pid
    wait_until(lambda: len(warm.pids()) == 1 and warm.pids() != [spare])
    assert list((tmp_path / "spares").glob("*.pid")) != []


def test_a_spare_that_does_not_answer_is_ended_and_the_start_goes_cold(
    pool: Callable[..., WarmVmms], tmp_path: Path
) -> None:
    warm = pool(assign_timeout=0.3)
    spare = ready_spare(warm)
    os.kill(spare, signal.SIGSTOP)
    domain = tmp_path / "d"
    write_config(domain)
    pid = warm.launch(domain, [], timeout=10.0)
    assert pid != spare
    assert (warm.warm_starts, warm.cold_starts) == (0, 1)
    assert gone(spare)  # never left holding what it was sent
    assert VmmClient(domain).status().pid == pid


def test_a_wrong_answer_ends_the_spare(tmp_path: Path) -> None:
    # A process on the spare's socket that answers the assignment with something else.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    script = (
        "import os,socket,sys,msgpack; s=socket.socket(fileno=int(sys.argv[1])); "
        "s.send(msgpack.packb({'ready': os.getpid()})); "
        "socket.recv_fds(s, 65536, 8); s.send(msgpack.packb({'ok': True})); s.recv(1)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(theirs.fileno())], pass_fds=(theirs.fileno(),)
    )
    theirs.close()
    spare = Spare(proc, ours, tmp_path / "x.pid")
    domain = tmp_path / "d"
    write_config(domain)
    with pytest.raises(SpareUnusable, match="refused the assignment"):
        spare.assign(domain, [])
    assert proc.poll() is not None


def test_a_spare_still_importing_is_taken_and_waited_for(
    pool: Callable[..., WarmVmms], tmp_path: Path
) -> None:
    warm = pool(refill_delay=0.0)
    wait_until(lambda: any((tmp_path / "spares").glob("*.pid")), timeout=5)
    domain = tmp_path / "d"
    write_config(domain)
    pid = warm.launch(domain, [], timeout=10.0)
    assert (warm.warm_starts, warm.cold_starts) == (1, 0)
    assert VmmClient(domain).status().pid == pid


def test_a_bad_assignment_is_refused_and_the_spare_takes_nothing(tmp_path: Path) -> None:
    spares = tmp_path / "spares"
    spares.mkdir()
    spare = Spare.start(spares)
    try:
        spare.wait_ready()
        log = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            # Two numbers but only the log: the spare cannot know what goes where.
            message = pack({"v": 1, "dir": str(tmp_path), "fds": [5, 6]})
            socket.send_fds(spare.sock, [message], [log])
        finally:
            os.close(log)
        reply = unpack(spare.sock.recv(65536))
        assert reply["ok"] is False
        assert "1 descriptors came for 2" in reply["error"]
        assert spare.proc.wait(5) == 0
        assert not spare.pid_file.exists()
        assert not (tmp_path / "vmm.pid").exists()
    finally:
        spare.end()


def test_a_spare_whose_node_goes_away_exits(tmp_path: Path) -> None:
    spares = tmp_path / "spares"
    spares.mkdir()
    spare = Spare.start(spares)
    spare.wait_ready()
    spare.sock.close()  # as the node's death closes it
    assert spare.proc.wait(5) == 0
    spare.end()
    assert not spare.pid_file.exists()


def test_place_fds_puts_each_descriptor_under_its_number_whatever_collides() -> None:
    pipes = [os.pipe() for _ in range(4)]
    readers = [r for r, _ in pipes]
    keep = os.dup(readers[0])
    try:
        # Each number is another received descriptor's, or the kept one's.
        numbers = [readers[1], readers[2], readers[0], keep]
        kept = place_fds(list(readers), numbers, keep)
        assert kept not in numbers
        for (_, w), number in zip(pipes, numbers, strict=True):
            os.write(w, b"x%d" % w)
            assert os.read(number, 16) == b"x%d" % w
            assert os.get_inheritable(number)
        os.write(pipes[0][1], b"kept")
        assert os.read(kept, 16) == b"kept"  # the first pipe's reader, moved aside
    finally:
        for fd in {kept, *numbers} | {w for _, w in pipes}:
            os.close(fd)


def test_a_restarting_node_ends_leftover_spares_and_nothing_else(
    pool: Callable[..., WarmVmms], tmp_path: Path
) -> None:
    first = pool()
    spare = ready_spare(first)
    spares = tmp_path / "spares"
    sleeper = subprocess.Popen(["sleep", "60"])
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        # A pid file naming a process that is no spare, and one whose pid was recycled.
        (spares / "other.pid").write_text(f"{sleeper.pid} {start_time(sleeper.pid)}\n")
        (spares / "old.pid").write_text(f"{stranger.pid} {start_time(stranger.pid) - 1}\n")
        (spares / "torn.pid").write_text("12")
        assert end_leftovers(spares) == [spare]
        assert gone(spare)
        assert sleeper.poll() is None
        assert stranger.poll() is None
        assert list(spares.glob("*.pid")) == []
    finally:
        for proc in (sleeper, stranger):
            proc.kill()
            proc.wait()


def test_a_clean_stop_ends_the_spares(pool: Callable[..., WarmVmms], tmp_path: Path) -> None:
    warm = pool(count=2)
    wait_until(lambda: len(warm.pids()) == 2)
    pids = warm.pids()
    warm.close()
    assert all(gone(pid) for pid in pids)
    assert list((tmp_path / "spares").glob("*.pid")) == []


def test_no_spare_is_made_while_a_start_reports(
    pool: Callable[..., WarmVmms], tmp_path: Path
) -> None:
    warm = pool(refill_delay=0.05)
    spare = ready_spare(warm)
    domain = tmp_path / "d"
    write_config(domain)
    with warm.reporting():
        assert warm.launch(domain, [], timeout=10.0) == spare
        time.sleep(0.5)
        assert warm.pids() == []
    wait_until(lambda: len(warm.pids()) == 1)


def test_with_none_every_start_is_cold(pool: Callable[..., WarmVmms], tmp_path: Path) -> None:
    warm = pool(count=0)
    domain = tmp_path / "d"
    write_config(domain)
    assert warm.launch(domain, [], timeout=10.0) > 0
    assert (warm.warm_starts, warm.cold_starts) == (0, 1)
    assert warm.pids() == []


def test_spares_that_never_get_ready_are_tried_less_and_less_often(
    tmp_path: Path, pool: Callable[..., WarmVmms]
) -> None:
    """On a host too loaded to start a spare in time, each one is ended and the next tried
    twice as long after the one before (up to a bound), not every few seconds: a "Python"
    that dies without a word 0.15 s after it starts, counted at each start."""
    starts = tmp_path / "starts"
    silent = tmp_path / "silent-python"
    silent.write_text(f"#!/bin/sh\necho >> {starts}\nexec sleep 0.15\n")
    silent.chmod(0o755)
    warm = pool(1, python=str(silent), ready_timeout=5.0, retry=0.1, retry_max=30.0)
    time.sleep(3.0)
    tried = len(starts.read_text().splitlines())
    # ~0.2 s a try, then 0.1, 0.2, 0.4, 0.8, 1.6 s: five tries in 3 s, where a fixed 0.1 s
    # would have made ten.
    assert 3 <= tried <= 6, tried
    assert warm.failures >= tried - 1
    assert warm.pids() == []


def test_the_wait_after_failures_doubles_up_to_its_bound(
    pool: Callable[..., WarmVmms], monkeypatch: pytest.MonkeyPatch
) -> None:
    warm = pool(0, retry=0.05, retry_max=0.4)  # no thread: the schedule alone
    waits: list[float] = []
    monkeypatch.setattr(warm, "_pause", waits.append)
    for _ in range(6):
        warm._failed()
    assert waits == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4]
