"""Live migration of a guest with a writable volume on a shared pool: the volume lock moves.

Two KvmDrivers in this process (tests/kvm/test_driver_migration.py) play the hosts; the
"shared pool" is one directory both open the volume from. The guest writes a pattern, sleeps
(the migration runs meanwhile), then writes a second one and verifies it. A third process
asks for the volume's writer lock over and over from before the migration to after it: it
must never get it, neither in the hand-off nor in a rollback (docs/storage.md, "Locks").
"""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from compute_node.boot_sources import BootFiles, HostFile
from compute_node.driver import DriverError, IncomingMachine
from compute_node.vmm.client import end
from protos.domain import DomainSpec, PowerState
from protos.migration import MigrationParams
from tests.kvm.test_driver_migration import gone
from tests.kvm.test_driver_save import Host, hosts, make_spec
from tests.kvm.test_migration_native import Relay
from tests.kvm.test_virtio_blk import SECTOR, pattern

__all__ = ["hosts"]

# The target's READY record header on the wire (type 17, flags 0, 16 bytes; migrate.h).
READY = (17).to_bytes(4, "little") + bytes(4) + (16).to_bytes(8, "little")
SLEEP_MS = 6000
# Before the sleep (the source writes it) and after it (whoever runs the guest then).
FIRST = (0, 8, 3)
SECOND = (64, 8, 5)
WORK = (
    f"ready blkinfo blkwrite={FIRST[0]},{FIRST[1]},{FIRST[2]} blkflush sleep={SLEEP_MS} "
    f"blkwrite={SECOND[0]},{SECOND[1]},{SECOND[2]} blkverify={SECOND[0]},{SECOND[1]},"
    f"{SECOND[2]} blkflush counter"
)

# Asks for the whole-file writer lock (as a VMM's virtio-blk does) until told to stop on
# stdin; prints how many times it asked and how many times it got it.
CONTENDER = r"""
import fcntl, os, select, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
want = struct.pack("@hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0)
free = struct.pack("@hhqqi4x", fcntl.F_UNLCK, 0, 0, 0, 0)
tries = got = 0
print("asking", flush=True)
while not select.select([sys.stdin], [], [], 0.0005)[0]:
    tries += 1
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, want)
    except OSError:
        continue
    got += 1
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, free)
print(tries, got, flush=True)
"""


class Contender:
    """A third process asking for the volume's writer lock all along."""

    def __init__(self, volume: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CONTENDER, str(volume)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "asking"

    def stop(self) -> tuple[int, int]:
        out, _ = self.proc.communicate("stop\n", timeout=10)
        tries, got = out.split()
        return int(tries), int(got)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    pool = tmp_path / "shared-pool"
    pool.mkdir()
    path = pool / "vol-1"
    with path.open("wb") as f:
        f.truncate(1 << 20)
    return path


@pytest.fixture
def contender(volume: Path) -> Iterator[Callable[[], Contender]]:
    started: list[Contender] = []

    def start() -> Contender:
        started.append(Contender(volume))
        return started[-1]

    yield start
    for c in started:
        c.kill()


@pytest.fixture
def two(hosts: Callable[[str], Host]) -> Iterator[tuple[Host, Host]]:
    a, b = hosts("a"), hosts("b")
    yield a, b
    for host in (a, b):
        for directory in host.driver.domains_dir.iterdir():
            end(directory)


def with_volume(host: Host, volume: Path) -> BootFiles:
    """The host's boot files and the volume as a writable disk `vda`, opened as
    compute_node.storage_sources opens a bound volume (the VMM takes the lock)."""
    files = host.boot_files()
    fd = os.open(volume, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    files.files.append(
        HostFile("disks.0", "vda (vol-1)", fd, target="vda", read_only=False, disk_id="vol-1")
    )
    return files


def holds_pattern(volume: Path, where: tuple[int, int, int]) -> bool:
    sector, count, seed = where
    data = volume.read_bytes()[sector * SECTOR : (sector + count) * SECTOR]
    words = [w for (w,) in struct.iter_unpack("<Q", data)]
    base = sector * SECTOR
    return words == [pattern(base + 8 * i, seed) for i in range(len(words))]


def writer_lock_free(volume: Path) -> bool:
    fd = os.open(volume, os.O_RDWR)
    try:
        arg = struct.pack("@hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0)
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, arg)
        return bool(struct.unpack("@hhqqi4x", got)[0] == fcntl.F_UNLCK)
    finally:
        os.close(fd)


def start_writing(host: Host, spec: DomainSpec, volume: Path) -> None:
    host.driver.spawn(spec, with_volume(host, volume))
    host.wait_console(spec.uuid, rf"BLK write sector={FIRST[0]} count={FIRST[1]} status=ok")
    assert holds_pattern(volume, FIRST)
    assert not writer_lock_free(volume)


def test_the_volume_lock_moves_at_the_commit(
    two: tuple[Host, Host],
    test_guest: Path,
    volume: Path,
    contender: Callable[[], Contender],
) -> None:
    a, b = two
    spec = make_spec(test_guest, WORK)
    start_writing(a, spec, volume)
    third = contender()
    # The target prepares while the source holds the lock: it takes nothing yet.
    target = b.driver.prepare_incoming(spec, with_volume(b, volume))
    outcome = a.driver.migrate_out(spec.uuid, target, MigrationParams(), lambda _s: None)
    assert outcome.committed, outcome
    assert gone(a, spec)
    # The guest's writes after the switch land on the volume, from the target.
    b.wait_console(spec.uuid, rf"BLK verify sector={SECOND[0]} count={SECOND[1]} ok", 30)
    b.wait_console(spec.uuid, r"COUNTER 2\b")
    assert "BLK write sector=0 " not in b.console(spec.uuid)  # the first ran at the source
    tries, got = third.stop()
    assert tries > 100
    assert got == 0  # never free: not in the hand-off either
    assert holds_pattern(volume, FIRST)
    assert holds_pattern(volume, SECOND)
    assert not writer_lock_free(volume)  # the target's VMM holds it now
    b.driver.destroy(spec.uuid)
    assert writer_lock_free(volume)


def test_a_rollback_gives_the_lock_back_to_the_source(
    two: tuple[Host, Host],
    test_guest: Path,
    volume: Path,
    contender: Callable[[], Contender],
) -> None:
    a, b = two
    spec = make_spec(test_guest, WORK)
    start_writing(a, spec, volume)
    third = contender()
    target = b.driver.prepare_incoming(spec, with_volume(b, volume))
    # Cut as the target's READY comes back: the source has let go of all but the hand-off
    # byte and the target took the rest; neither commits.
    relay = Relay((target.address, target.port), cut_at=READY, downstream=False)
    via = IncomingMachine(str(relay.address[0]), int(relay.address[1]), target.token)
    outcome = a.driver.migrate_out(spec.uuid, via, MigrationParams(), lambda _s: None)
    relay.join()
    assert relay.cut.is_set()
    assert not outcome.committed
    assert outcome.phase == "failed", outcome
    assert gone(b, spec)
    # The source took its lock back before it resumed; its guest writes on.
    assert a.driver.get_info(spec.uuid).state is PowerState.RUNNING
    assert a.kinds(spec.uuid)[-1] == ("resumed", "migration_failed", "")
    a.wait_console(spec.uuid, rf"BLK verify sector={SECOND[0]} count={SECOND[1]} ok", 30)
    tries, got = third.stop()
    assert tries > 100
    assert got == 0
    assert holds_pattern(volume, SECOND)
    assert not writer_lock_free(volume)
    a.driver.destroy(spec.uuid)
    assert writer_lock_free(volume)


def test_a_source_that_cannot_take_its_lock_back_stays_paused(
    two: tuple[Host, Host], test_guest: Path, volume: Path
) -> None:
    """Rolled back after the hand-off, with another process holding part of the volume by
    then: the source does not resume (two writers) but stays paused and says so; once the
    other lets go, a resume takes the lock and the guest writes on."""
    a, b = two
    spec = make_spec(test_guest, WORK)
    start_writing(a, spec, volume)
    target = b.driver.prepare_incoming(spec, with_volume(b, volume))
    pid = b.driver.get_info(spec.uuid).pid
    assert pid is not None
    intruder = os.open(volume, os.O_RDWR)
    byte0 = struct.pack("@hhqqi4x", fcntl.F_WRLCK, 0, 0, 1, 0)

    def intrude() -> None:
        # As READY passes: the target dies (its part of the lock goes with it) and another
        # process takes byte 0 before the source learns of any of it.
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while True:
            try:
                fcntl.fcntl(intruder, fcntl.F_OFD_SETLK, byte0)
                return
            except OSError:
                assert time.monotonic() < deadline, "the dead target's lock stayed"
                time.sleep(0.005)

    try:
        relay = Relay((target.address, target.port), cut_at=READY, downstream=False)
        relay.on_cut = intrude
        via = IncomingMachine(str(relay.address[0]), int(relay.address[1]), target.token)
        outcome = a.driver.migrate_out(spec.uuid, via, MigrationParams(), lambda _s: None)
        relay.join()
        assert not outcome.committed
        assert outcome.phase == "failed", outcome
        assert "the source stays paused" in (outcome.error or ""), outcome.error
        assert a.driver.get_info(spec.uuid).state is PowerState.PAUSED
        assert a.kinds(spec.uuid)[-1] == ("paused", "migrating", "")
        with pytest.raises(DriverError):
            a.driver.resume(spec.uuid)  # still held by the other: no second writer
        assert a.driver.get_info(spec.uuid).state is PowerState.PAUSED
    finally:
        os.close(intruder)
    a.driver.resume(spec.uuid)
    assert a.driver.get_info(spec.uuid).state is PowerState.RUNNING
    a.wait_console(spec.uuid, rf"BLK verify sector={SECOND[0]} count={SECOND[1]} ok", 30)
    assert not writer_lock_free(volume)
    a.driver.destroy(spec.uuid)
