"""Live migration of a real guest between two processes on loopback (docs/migration.md).

The source is a machine in this process; the target is `python -m native.migration listen`,
a process of its own. Faults are injected at every phase, through the target process (kill)
or a TCP relay between the two (a dropped connection at a chosen record): each run must end
with exactly one running copy of the guest, with its memory intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import native
from native import migration
from tests.kvm.harness import Booted, Console
from tests.kvm.test_snapshot import last_counter, memtest_checksum

ROOT = Path(__file__).resolve().parents[2]
MEMTEST = r"MEMTEST mib=16 base=0x([0-9a-f]+) checksum=0x([0-9a-f]{16})"
# Record headers as they appear on the wire (type, flags, length; migrate.h).
PAUSED = (4).to_bytes(4, "little") + bytes(4) + (8).to_bytes(8, "little")
READY = (17).to_bytes(4, "little") + bytes(4) + (16).to_bytes(8, "little")


class Target:
    """`python -m native.migration listen` with its console and its JSON lines."""

    def __init__(self, token: str) -> None:
        self.console = Console()
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "native.migration", "listen", "--timeout", "30"),
                *("--console-fd", str(self.console.write_fd)),
            ],
            cwd=ROOT,
            env={**os.environ, "FLOTILLA_MIGRATION_TOKEN": token},
            stdout=subprocess.PIPE,
            pass_fds=(self.console.write_fd,),
        )
        assert self.proc.stdout is not None
        self._out = self.proc.stdout
        first = self.line()
        assert first["event"] == "listening", first
        self.address = (str(first["host"]), int(str(first["port"])))

    def line(self, timeout: float = 30.0) -> dict[str, object]:
        done: list[bytes] = []
        reader = threading.Thread(target=lambda: done.append(self._out.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        assert done, f"target said nothing (exit {self.proc.poll()})"
        assert done[0], f"target closed its output (exit {self.proc.poll()})"
        return dict(json.loads(done[0]))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def end(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        self.console.close()


class Relay:
    """A TCP relay source → relay → target that can cut the connection (or kill the target)
    the moment a given record header passes in a given direction, or flip one bit of the
    first page the source sends."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        cut_at: bytes = b"\xff" * 64,
        downstream: bool = True,
        flip_first_page: bool = False,
    ) -> None:
        self._target = target
        self._cut_at = cut_at
        self._flip = flip_first_page
        self._head = b""  # the stream's first bytes: hello, CONFIG, the first PAGES header
        self._passed = 0
        self.flipped = False
        self._downstream = downstream  # True: look in source → target bytes
        self.on_cut: Callable[[], None] = lambda: None
        self.cut = threading.Event()
        self.state_at_cut: native.MachineState | None = None
        self.source: native.Machine | None = None
        self._server = socket.create_server(("127.0.0.1", 0))
        self.address = self._server.getsockname()[:2]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        client, _ = self._server.accept()
        upstream = socket.create_connection(self._target)
        pairs = {client: upstream, upstream: client}
        tail = {client: b"", upstream: b""}
        try:
            while not self.cut.is_set():
                readable, _, _ = select.select(list(pairs), [], [], 0.2)
                for sock in readable:
                    data = sock.recv(1 << 20)
                    if not data:
                        return
                    watched = (sock is client) == self._downstream
                    window = tail[sock] + data
                    at = window.find(self._cut_at) if watched else -1
                    if at >= 0:
                        # Forward what came before the record, then cut.
                        pairs[sock].sendall(
                            window[len(tail[sock]) : at] if at > len(tail[sock]) else b""
                        )
                        if self.source is not None:
                            self.state_at_cut = self.source.state()
                        self.on_cut()
                        self.cut.set()
                        return
                    if sock is client and self._flip and not self.flipped:
                        data = self._flip_page(data)
                    try:
                        pairs[sock].sendall(data)
                    except OSError:
                        # The target closed (it refused): still pass on what it said.
                        if sock is client:
                            self._drain(upstream, client)
                        return
                    tail[sock] = window[-32:]
        finally:
            for s in (client, upstream, self._server):
                s.close()

    @staticmethod
    def _drain(src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(2)
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass

    def _flip_page(self, data: bytes) -> bytes:
        """Flips a bit 100 bytes into the first page of the first PAGES record: it follows
        the hello (48), CONFIG (16 + 224), its header (16), range (16) and checksums."""
        first = 48 + 16 + 224
        self._head += data[: max(0, first + 32 - len(self._head))]
        out = bytearray(data)
        if len(self._head) >= first + 32:
            kind, _, _ = struct.unpack_from("<IIQ", self._head, first)
            assert kind == 2, "the stream does not go on with pages"
            (count,) = struct.unpack_from("<I", self._head, first + 24)
            at = first + 32 + count * 8 + 100 - self._passed
            if 0 <= at < len(out):
                out[at] ^= 0x10
                self.flipped = True
        self._passed += len(data)
        return bytes(out)

    def join(self) -> None:
        self._thread.join(10)


@pytest.fixture
def targets() -> Iterator[Callable[[str], Target]]:
    made: list[Target] = []

    def _target(token: str) -> Target:
        t = Target(token)
        made.append(t)
        return t

    yield _target
    for t in made:
        t.end()


def region_digest(machine: native.Machine, base: int) -> str:
    return hashlib.sha256(machine.read_memory(base, 16 << 20)).hexdigest()


def start_guest(
    boot: Callable[..., Booted], test_guest: Path, work: str
) -> tuple[Booted, int, str]:
    """A 2-vCPU, 128 MiB guest that ran memtest=16 and then `work`: (booted, the memtest
    region's base, its digest). The guest never writes the region again."""
    g = boot(test_guest, f"ready memtest=16 {work}", vcpus=2, memory_mib=128)
    m = g.console.wait_for(MEMTEST)
    g.console.wait_for(r"COUNTER 3\b")
    base = int(m.group(1), 16)
    return g, base, region_digest(g.machine, base)


def assert_runs_intact(g: Booted, base: int, digest: str) -> None:
    """The source runs on (its counter advances) and its memtest region is as written."""
    assert g.machine.state() is native.MachineState.RUNNING
    before = last_counter(g.console.text)  # (drain() waits for a quiet pipe: it never is)
    g.console.wait_for(rf"COUNTER {before + 3}\b")
    assert region_digest(g.machine, base) == digest


@pytest.mark.parametrize("work", ["counter", "rewrite=8"])
def test_live_migration_moves_the_running_guest(
    boot: Callable[..., Booted],
    test_guest: Path,
    targets: Callable[[str], Target],
    work: str,
) -> None:
    g, base, digest = start_guest(boot, test_guest, work)
    checksum = int(re.findall(MEMTEST, g.console.text)[0][1], 16)
    token = migration.new_token()
    target = targets(token)
    seen: list[migration.MigrationProgress] = []
    result = migration.migrate(
        g.machine,
        target.address,
        token,
        debug=True,
        progress=seen.append,
        progress_interval=0.02,
    )
    resumed = target.line()
    assert resumed["event"] == "resumed", resumed
    # Debug mode: every page's checksum was checked on arrival, and all RAM's before the
    # commit; both sides report the same.
    assert result.ram_checksum
    assert resumed["ram_checksum"] == result.ram_checksum
    # The source keeps its (paused) copy; its memtest region is what the guest wrote.
    assert g.machine.state() is native.MachineState.PAUSED
    assert region_digest(g.machine, base) == digest
    assert memtest_checksum(g.machine, base, 16) == checksum
    source_text = g.console.drain()
    # The target's guest counts on from there: no reboot, no restart, not a line lost (the
    # switch may even fall inside a line: the two consoles join into one).
    target.console.wait_for(rf"COUNTER {last_counter(source_text) + 5}\b")
    counts = [int(n) for n in re.findall(r"COUNTER (\d+)\n", source_text + target.console.text)]
    assert counts == list(range(counts[0], counts[0] + len(counts))), counts
    assert "READY" not in target.console.text
    assert "MEMTEST" not in target.console.text
    # Progress came, bounded, ending with done; the reported pause is the measured one.
    assert seen
    assert seen[-1].phase == "done"
    assert {p.phase for p in seen} <= {"setup", "precopy", "stopcopy", "commit", "done"}
    assert len(seen) < 1 + result.total_ms / 20 + 2
    assert 0 < result.downtime_ms <= result.paused_ms
    # (the gap is the PAUSED marker's way to the target: microseconds, more on a loaded host)
    assert result.paused_ms - result.downtime_ms < 25.0, result
    assert result.bytes_sent < 128 << 20  # zero pages are not sent
    # The token is spent: a replay is refused, and the replaying guest runs on.
    other = boot(test_guest, "ready counter", memory_mib=32)
    other.console.wait_for(r"COUNTER 1\b")
    with pytest.raises(migration.MigrationError, match="already used") as exc:
        migration.migrate(other.machine, target.address, token)
    assert exc.value.refused
    assert not exc.value.committed
    assert other.machine.state() is native.MachineState.RUNNING


def test_a_wrong_token_is_refused_and_the_target_waits_on(
    boot: Callable[..., Booted], test_guest: Path, targets: Callable[[str], Target]
) -> None:
    g, base, digest = start_guest(boot, test_guest, "counter")
    token = migration.new_token()
    target = targets(token)
    with pytest.raises(migration.MigrationError, match="wrong migration token") as exc:
        migration.migrate(g.machine, target.address, migration.new_token())
    assert exc.value.refused
    assert not exc.value.committed
    assert_runs_intact(g, base, digest)
    # The listener did not spend its token on the impostor.
    migration.migrate(g.machine, target.address, token)
    resumed = target.line()
    assert resumed["event"] == "resumed"
    assert resumed["refused"] == ["wrong migration token"]


def _fails_cleanly(
    g: Booted, base: int, digest: str, target: Target, exc: migration.MigrationError
) -> None:
    assert not exc.committed, exc
    assert_runs_intact(g, base, digest)
    # The target ran no copy: it gave up (or was killed) without starting the guest.
    deadline = time.monotonic() + 10
    while target.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not target.alive()
    assert "COUNTER" not in target.console.text


def test_killing_the_target_during_precopy_resumes_nothing_and_loses_nothing(
    boot: Callable[..., Booted], test_guest: Path, targets: Callable[[str], Target]
) -> None:
    g, base, digest = start_guest(boot, test_guest, "rewrite=8")
    token = migration.new_token()
    target = targets(token)

    def kill_midway(p: migration.MigrationProgress) -> None:
        if p.phase == "precopy" and p.bytes_sent > 4 << 20 and target.alive():
            target.proc.kill()

    with pytest.raises(migration.MigrationError) as exc:
        migration.migrate(
            g.machine,
            target.address,
            token,
            bandwidth=16 << 20,
            progress=kill_midway,
            progress_interval=0.02,
        )
    _fails_cleanly(g, base, digest, target, exc.value)


@pytest.mark.parametrize(
    ("cut_at", "downstream", "kill"),
    [
        (PAUSED, True, False),  # the connection drops as the source pauses
        (PAUSED, True, True),  # the target dies as the source pauses
        (READY, False, False),  # drops after the target loaded all, before the commit
    ],
    ids=["drop-at-pause", "kill-at-pause", "drop-before-commit"],
)
def test_faults_in_the_paused_phase_resume_the_source(  # noqa: PLR0917 - fixtures + params
    boot: Callable[..., Booted],
    test_guest: Path,
    targets: Callable[[str], Target],
    cut_at: bytes,
    downstream: bool,
    kill: bool,
) -> None:
    g, base, digest = start_guest(boot, test_guest, "rewrite=8")
    token = migration.new_token()
    target = targets(token)
    relay = Relay(target.address, cut_at=cut_at, downstream=downstream)
    relay.source = g.machine
    if kill:
        relay.on_cut = target.proc.kill
    with pytest.raises(migration.MigrationError) as exc:
        migration.migrate(g.machine, relay.address, token, timeout=20)
    relay.join()
    assert relay.cut.is_set()
    assert relay.state_at_cut is native.MachineState.PAUSED  # the fault hit the paused phase
    _fails_cleanly(g, base, digest, target, exc.value)


def test_cancel_resumes_the_source(
    boot: Callable[..., Booted], test_guest: Path, targets: Callable[[str], Target]
) -> None:
    g, base, digest = start_guest(boot, test_guest, "rewrite=8")
    token = migration.new_token()
    target = targets(token)
    control = migration.Migration(bandwidth=8 << 20)

    def cancel_midway(p: migration.MigrationProgress) -> None:
        if p.bytes_sent > 2 << 20:
            control.cancel()

    with pytest.raises(migration.MigrationError, match="cancel") as exc:
        migration.migrate(
            g.machine,
            target.address,
            token,
            control=control,
            progress=cancel_midway,
            progress_interval=0.02,
        )
    _fails_cleanly(g, base, digest, target, exc.value)
    assert "cancel" in str(target.line().get("error", ""))


def test_a_timeout_resumes_the_source(
    boot: Callable[..., Booted], test_guest: Path, targets: Callable[[str], Target]
) -> None:
    g, base, digest = start_guest(boot, test_guest, "rewrite=8")
    token = migration.new_token()
    target = targets(token)
    t = time.monotonic()
    with pytest.raises(migration.MigrationError, match="timed out") as exc:
        migration.migrate(g.machine, target.address, token, bandwidth=8 << 20, timeout=1.0)
    assert time.monotonic() - t < 3.0
    _fails_cleanly(g, base, digest, target, exc.value)


@pytest.mark.parametrize("end", ["timeout", "cancel"])
def test_a_precopy_that_never_waits_still_meets_its_timeout_and_its_cancel(
    boot: Callable[..., Booted], test_guest: Path, targets: Callable[[str], Target], end: str
) -> None:
    """A guest that dirties next to nothing and a budget no pause fits: each pre-copy round
    sends a few pages or none, the socket never fills and no send ever waits. The deadline
    and a cancel are still seen within a round, not at the next send that happens to wait
    (there may be none)."""
    g, base, digest = start_guest(boot, test_guest, "counter")
    token = migration.new_token()
    target = targets(token)
    control = migration.Migration(max_downtime_ms=0.001)
    t = time.monotonic()

    def cancel_late(_p: migration.MigrationProgress) -> None:
        if end == "cancel" and time.monotonic() - t >= 1.0:
            control.cancel()

    with pytest.raises(migration.MigrationError, match=end.replace("timeout", "timed out")) as exc:
        migration.migrate(
            g.machine,
            target.address,
            token,
            control=control,
            auto_converge=False,
            timeout=1.0 if end == "timeout" else 60.0,
            progress=cancel_late,
            progress_interval=0.02,
        )
    # Before, it ran on until the target gave up (30 s), however idle the host.
    assert time.monotonic() - t < 10.0
    assert exc.value.result is not None
    assert exc.value.result.iterations > 2  # it kept trying
    _fails_cleanly(g, base, digest, target, exc.value)


def test_budget_and_bandwidth_change_while_running(
    boot: Callable[..., Booted], test_guest: Path, targets: Callable[[str], Target]
) -> None:
    """A budget the rewriting guest cannot meet makes auto-converge throttle its vCPUs; the
    cap and the budget are raised on the fly and the migration then completes."""
    g, _, _ = start_guest(boot, test_guest, "rewrite=8")
    token = migration.new_token()
    target = targets(token)
    control = migration.Migration(max_downtime_ms=0.001, bandwidth=64 << 20)
    seen: list[migration.MigrationProgress] = []

    def steer(p: migration.MigrationProgress) -> None:
        seen.append(p)
        if p.throttle_pct >= 30:
            control.set_bandwidth(0)
            control.set_max_downtime(300)

    result = migration.migrate(
        g.machine,
        target.address,
        token,
        control=control,
        progress=steer,
        progress_interval=0.02,
        timeout=30,
    )
    assert result.throttle_pct >= 30
    assert any(p.budget_ms == 300 for p in seen)
    assert target.line()["event"] == "resumed"
    target.console.wait_for(r"COUNTER \d+")


@pytest.mark.parametrize(
    ("expect", "why"),
    [
        ({"disks": "disk"}, "virtio devices"),
        ({"memory_mib": 64}, "128 MiB, not 64"),
        ({"vcpus": 1}, "2 vCPUs, not 1"),
    ],
    ids=["disk", "memory", "vcpus"],
)
def test_a_target_expecting_another_machine_refuses_and_the_source_runs_on(
    boot: Callable[..., Booted],
    test_guest: Path,
    tmp_path: Path,
    expect: dict[str, object],
    why: str,
) -> None:
    """The machine config comes before any page: a target given a disk the source does not
    have, or expecting another memory size or vCPU count, refuses it, and nothing moved."""
    g, base, digest = start_guest(boot, test_guest, "counter")
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    kwargs: dict[str, Any] = dict(expect)
    if "disks" in kwargs:
        kwargs["disks"] = [native.Disk(str(disk))]
    token = migration.new_token()
    failures: list[migration.MigrationError] = []
    with migration.MigrationListener(token) as listener:

        def serve() -> None:
            try:
                listener.accept(timeout=20, **kwargs)
            except migration.MigrationError as exc:
                failures.append(exc)

        server = threading.Thread(target=serve)
        server.start()
        with pytest.raises(migration.MigrationError, match=why) as exc:
            migration.migrate(g.machine, listener.address, token)
        server.join(10)
    assert exc.value.refused
    assert len(failures) == 1
    assert why in failures[0].message
    assert_runs_intact(g, base, digest)


def test_debug_mode_catches_a_damaged_page(
    boot: Callable[..., Booted], test_guest: Path, targets: Callable[[str], Target]
) -> None:
    """One bit flipped on the wire in the first page: the target finds it by its checksum,
    refuses, and the source runs on."""
    g, base, digest = start_guest(boot, test_guest, "counter")
    token = migration.new_token()
    target = targets(token)
    relay = Relay(target.address, flip_first_page=True)
    with pytest.raises(migration.MigrationError, match=r"page \d+ arrived damaged") as exc:
        migration.migrate(g.machine, relay.address, token, debug=True)
    relay.join()
    assert relay.flipped
    assert exc.value.refused
    _fails_cleanly(g, base, digest, target, exc.value)


def test_a_paused_machine_migrates_in_one_pass_and_stays_paused_on_a_failure(
    boot: Callable[..., Booted], test_guest: Path, targets: Callable[[str], Target]
) -> None:
    g, base, digest = start_guest(boot, test_guest, "counter")
    g.machine.pause()
    frozen = last_counter(g.console.drain())
    token = migration.new_token()
    target = targets(token)
    with pytest.raises(migration.MigrationError, match="wrong migration token") as exc:
        migration.migrate(g.machine, target.address, migration.new_token())
    assert not exc.value.committed
    assert g.machine.state() is native.MachineState.PAUSED  # never resumed by the engine
    assert last_counter(g.console.drain()) == frozen
    result = migration.migrate(g.machine, target.address, token, debug=True)
    assert result.iterations == 1  # nothing dirtied its RAM
    assert result.throttle_pct == 0
    assert region_digest(g.machine, base) == digest
    assert target.line()["event"] == "resumed"
    target.console.wait_for(rf"COUNTER {frozen + 3}\b")  # the target runs it on the commit


def test_without_auto_converge_the_vcpus_are_never_throttled(
    boot: Callable[..., Booted], test_guest: Path, targets: Callable[[str], Target]
) -> None:
    g, base, digest = start_guest(boot, test_guest, "rewrite=8")
    token = migration.new_token()
    target = targets(token)
    with pytest.raises(migration.MigrationError, match="timed out") as exc:
        migration.migrate(
            g.machine, target.address, token, max_downtime_ms=0.001, auto_converge=False, timeout=2
        )
    assert exc.value.result is not None
    assert exc.value.result.iterations > 2  # it kept trying
    assert exc.value.result.throttle_pct == 0
    _fails_cleanly(g, base, digest, target, exc.value)


def test_without_auto_converge_a_budget_that_fits_never_throttles_either(
    boot: Callable[..., Booted], test_guest: Path, targets: Callable[[str], Target]
) -> None:
    """At a budget the pause fits, a guest writing as fast as the stream sends gets extra
    rounds with its vCPUs throttled to shorten the pause; with auto-converge off it gets
    none, and the migration completes with its memory intact."""
    g, base, digest = start_guest(boot, test_guest, "rewrite=8")
    token = migration.new_token()
    target = targets(token)
    result = migration.migrate(
        g.machine, target.address, token, max_downtime_ms=300, auto_converge=False, debug=True
    )
    assert result.throttle_pct == 0
    assert target.line()["event"] == "resumed"
    assert region_digest(g.machine, base) == digest
    target.console.wait_for(r"COUNTER \d+")
