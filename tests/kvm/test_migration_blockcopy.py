"""Live block copy (docs/migration.md, "Block copy"): a disk on host-local storage moves with
its guest through the migration stream, while the guest writes it.

The source is a machine in this process, its disk one file; the target is a
`MigrationListener` in a thread of this process given another file (another path, as on
another host), started paused so the two files can be compared at the switch.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import native
from native import migration
from tests.kvm.harness import Booted, Console
from tests.kvm.test_snapshot import last_counter

MIB = 1 << 20
CHUNK = 64 << 10
BLOCK = 11  # the BLOCK record's type (migrate.h)

Boot = Callable[..., Booted]


@pytest.fixture
def disk_boot(kvm: None, test_guest: Path) -> Iterator[Boot]:
    """boot(cmdline, disk path) -> a running 1-vCPU, 64 MiB guest with that disk."""
    started: list[Booted] = []

    def _boot(cmdline: str, disk: Path) -> Booted:
        console = Console()
        try:
            machine = native.Machine(
                test_guest,
                cmdline=cmdline,
                memory_mib=64,
                console_out=console.write_fd,
                console_in=console.input_fd,
                disks=[native.Disk(str(disk))],
            )
        except BaseException:
            console.close()
            raise
        booted = Booted(machine, console)
        started.append(booted)
        machine.start()
        return booted

    yield _boot
    for b in started:
        b.machine.close()
        b.console.close()


def sparse(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


def data_segments(path: Path) -> list[tuple[int, int]]:
    """The file's data (SEEK_DATA/SEEK_HOLE) as (start, end) pairs."""
    out: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, at = os.fstat(fd).st_size, 0
        while at < size:
            try:
                start = os.lseek(fd, at, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            at = end
    finally:
        os.close(fd)
    return out


class Incoming:
    """A listener in a thread receiving into `disk` (copied), its machine left paused."""

    def __init__(self, disk: Path, *, copy: bool = True, token: str | None = None) -> None:
        self.token = token or migration.new_token()
        self.console = Console()
        self.listener = migration.MigrationListener(self.token)
        self.machine: native.Machine | None = None
        self.result: migration.MigrationResult | None = None
        self.error: migration.MigrationError | None = None
        self._thread = threading.Thread(target=self._serve, args=(disk, copy), daemon=True)
        self._thread.start()

    def _serve(self, disk: Path, copy: bool) -> None:
        try:
            self.machine, self.result = self.listener.accept(
                console_out=self.console.write_fd,
                disks=[native.Disk(str(disk))],
                copy_disks=[0] if copy else [],
                paused=True,
                timeout=60,
            )
        except migration.MigrationError as exc:
            self.error = exc

    def join(self) -> None:
        self._thread.join(60)
        assert not self._thread.is_alive()

    def close(self) -> None:
        self.listener.close()
        self._thread.join(60)
        if self.machine is not None:
            self.machine.close()
        self.console.close()


@pytest.fixture
def incoming() -> Iterator[Callable[..., Incoming]]:
    made: list[Incoming] = []

    def _incoming(disk: Path, **kwargs: object) -> Incoming:
        inc = Incoming(disk, **kwargs)  # type: ignore[arg-type]
        made.append(inc)
        return inc

    yield _incoming
    for inc in made:
        inc.close()


def test_a_writing_guest_moves_with_its_disk(
    disk_boot: Boot, incoming: Callable[..., Incoming], tmp_path: Path
) -> None:
    """The guest wrote 1 MiB before and keeps rewriting another MiB (a new pattern each pass)
    as it migrates: at the switch the target's file is byte for byte the source's, the
    rewritten chunks went more than once, and on the target the guest's loop goes on and
    both ranges verify."""
    passes = 600
    source_disk = sparse(tmp_path / "source.img", 64 * MIB)
    target_disk = sparse(tmp_path / "target.img", 64 * MIB)
    g = disk_boot(
        f"blkinfo blkwrite=0,2048,7 blkloop=8192,2048,{passes} "
        f"blkverify=0,2048,7 blkverify=8192,2048,{passes} counter",
        source_disk,
    )
    g.console.wait_for(r"BLK loop pass=20\b", 30)
    inc = incoming(target_disk)
    seen: list[migration.MigrationProgress] = []
    result = migration.migrate(
        g.machine,
        inc.listener.address,
        inc.token,
        copy_disks=[0],
        # At 8 MiB/s the copy takes ~0.5 s, so the loop surely rewrites chunks already sent
        # (unbounded, a quick copy on a loaded host could end before the guest wrote again).
        bandwidth=8 * MIB,
        debug=True,
        progress=seen.append,
        progress_interval=0.02,
    )
    inc.join()
    assert inc.error is None, inc.error
    assert inc.machine is not None
    assert inc.result is not None
    assert g.machine.state() is native.MachineState.PAUSED
    source_text = g.console.drain()
    last_source_pass = int(re.findall(r"BLK loop pass=(\d+)", source_text)[-1])
    assert last_source_pass < passes, "the loop ended before the switch: raise `passes`"
    # At the switch: the same bytes (the source paused and flushed, the target fsynced).
    assert digest(target_disk) == digest(source_disk)
    # 2 MiB of data, but the rewritten MiB went again each round; the target got it all.
    assert result.disk_chunks > 2 * MIB // CHUNK
    assert result.disk_bytes == inc.result.disk_bytes
    assert result.disk_chunks == inc.result.disk_chunks
    assert any(p.disk_bytes_sent for p in seen)
    assert seen[-1].phase == "done"
    # The guest runs on at the target: its loop goes on from where it was, then verifies.
    inc.machine.start()
    inc.console.wait_for(rf"BLK loop sector=8192 count=2048 passes={passes} status=ok", 120)
    inc.console.wait_for(r"BLK verify sector=0 count=2048 ok", 30)
    inc.console.wait_for(r"BLK verify sector=8192 count=2048 ok", 30)
    # The two consoles joined (the switch may fall inside a line) count every pass once.
    joined = source_text + inc.console.text
    assert [int(p) for p in re.findall(r"BLK loop pass=(\d+)\n", joined)] == list(
        range(1, passes + 1)
    )
    assert "BLK capacity" not in inc.console.text  # no second boot


def test_holes_stay_holes(
    disk_boot: Boot, incoming: Callable[..., Incoming], tmp_path: Path
) -> None:
    """An 8 GiB sparse disk with 3 MiB written (at its start, at 4 GiB, at its end): only
    those chunks cross, and the target's file is as sparse as the source's."""
    size = 8 << 30
    source_disk = sparse(tmp_path / "source.img", size)
    target_disk = sparse(tmp_path / "target.img", size)
    last = size // 512 - 2048
    g = disk_boot(
        f"blkinfo blkwrite=0,2048,3 blkwrite=8388608,2048,4 blkwrite={last},2048,5 counter",
        source_disk,
    )
    g.console.wait_for(r"COUNTER 2\b", 30)
    inc = incoming(target_disk)
    result = migration.migrate(
        g.machine, inc.listener.address, inc.token, copy_disks=[0], debug=True
    )
    inc.join()
    assert inc.error is None, inc.error
    assert inc.machine is not None
    assert result.disk_bytes == 3 * MIB
    assert result.disk_chunks == 3 * MIB // CHUNK
    assert target_disk.stat().st_size == size
    assert target_disk.stat().st_blocks * 512 <= 4 * MIB
    segments = data_segments(target_disk)
    assert segments == data_segments(source_disk)
    with source_disk.open("rb") as src, target_disk.open("rb") as dst:
        for start, end in segments:
            src.seek(start)
            dst.seek(start)
            assert src.read(end - start) == dst.read(end - start)
    inc.machine.start()
    inc.console.wait_for(r"COUNTER \d+", 30)


@pytest.mark.parametrize(
    ("target_size", "source_copies", "target_copies", "why"),
    [
        (32 * MIB, True, True, "sizes must match"),
        (16 * MIB, False, True, "source does not copy it"),
        (16 * MIB, True, False, "not given it to copy"),
    ],
    ids=["size", "copy-on-target-only", "copy-on-source-only"],
)
def test_disagreeing_disks_are_refused_at_setup(  # noqa: PLR0917 - fixtures + params
    disk_boot: Boot,
    incoming: Callable[..., Incoming],
    tmp_path: Path,
    target_size: int,
    source_copies: bool,
    target_copies: bool,
    why: str,
) -> None:
    source_disk = sparse(tmp_path / "source.img", 16 * MIB)
    target_disk = sparse(tmp_path / "target.img", target_size)
    with target_disk.open("r+b") as f:
        f.write(b"kept")  # refused before the copy would empty it
    g = disk_boot("blkinfo blkwrite=0,64,3 counter", source_disk)
    g.console.wait_for(r"COUNTER 2\b", 30)
    inc = incoming(target_disk, copy=target_copies)
    with pytest.raises(migration.MigrationError, match=why) as exc:
        migration.migrate(
            g.machine,
            inc.listener.address,
            inc.token,
            copy_disks=[0] if source_copies else [],
        )
    inc.join()
    assert exc.value.refused
    assert not exc.value.committed
    assert inc.error is not None
    assert why in inc.error.message
    assert exc.value.result is not None
    assert exc.value.result.disk_bytes == 0
    assert target_disk.read_bytes()[:4] == b"kept"
    before = last_counter(g.console.text)
    g.console.wait_for(rf"COUNTER {before + 2}\b", 30)


class BlockRewriter:
    """A relay source → target that passes the stream record by record and gives the first
    BLOCK record another offset (the answers pass untouched): a hostile source."""

    def __init__(self, target: tuple[str, int], offset: int) -> None:
        self._target = target
        self._offset = offset
        self.rewritten = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.address = self._server.getsockname()[:2]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        client, _ = self._server.accept()
        upstream = socket.create_connection(self._target)
        back = threading.Thread(target=self._pipe, args=(upstream, client), daemon=True)
        back.start()
        try:
            self._forward(client, upstream)
        except OSError:
            pass
        finally:
            back.join(10)
            for s in (client, upstream, self._server):
                s.close()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _forward(self, src: socket.socket, dst: socket.socket) -> None:
        buf = b""
        skip = 48  # the hello, then records: a header and its payload
        while data := src.recv(1 << 20):
            buf += data
            while True:
                if skip:
                    n = min(skip, len(buf))
                    dst.sendall(buf[:n])
                    buf, skip = buf[n:], skip - n
                    if skip:
                        break
                if len(buf) < 16 + 24:
                    break
                kind, _, length = struct.unpack_from("<IIQ", buf)
                if kind == BLOCK and not self.rewritten.is_set():
                    buf = buf[:24] + struct.pack("<Q", self._offset) + buf[32:]
                    self.rewritten.set()
                dst.sendall(buf[:16])
                buf, skip = buf[16:], length
        dst.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("offset", [4 * MIB, (1 << 64) - CHUNK], ids=["past-end", "wraps"])
def test_a_block_outside_the_disk_is_refused_and_the_source_runs_on(
    disk_boot: Boot, incoming: Callable[..., Incoming], tmp_path: Path, offset: int
) -> None:
    source_disk = sparse(tmp_path / "source.img", 4 * MIB)
    target_disk = sparse(tmp_path / "target.img", 4 * MIB)
    g = disk_boot("blkinfo blkwrite=0,256,3 counter", source_disk)
    g.console.wait_for(r"COUNTER 2\b", 30)
    before = digest(source_disk)
    inc = incoming(target_disk)
    relay = BlockRewriter(inc.listener.address, offset)
    with pytest.raises(migration.MigrationError, match="lies outside") as exc:
        migration.migrate(g.machine, relay.address, inc.token, copy_disks=[0], timeout=20)
    inc.join()
    assert relay.rewritten.is_set()
    assert exc.value.refused
    assert not exc.value.committed
    assert inc.error is not None
    assert "lies outside its 4194304 bytes" in inc.error.message
    assert target_disk.stat().st_size == 4 * MIB  # nothing written past it
    assert g.machine.state() is native.MachineState.RUNNING
    c = last_counter(g.console.text)
    g.console.wait_for(rf"COUNTER {c + 2}\b", 30)
    assert digest(source_disk) == before


def test_a_cancel_mid_copy_resumes_the_source_with_its_disk_intact(
    disk_boot: Boot, incoming: Callable[..., Incoming], tmp_path: Path
) -> None:
    """Cancelled while the disk streams (under a cap): the source runs on with its disk as
    the guest wrote it; the target's file, partly written, is left to the caller. A second
    attempt then copies the disk whole."""
    source_disk = sparse(tmp_path / "source.img", 64 * MIB)
    target_disk = sparse(tmp_path / "target.img", 64 * MIB)
    g = disk_boot("blkinfo blkwrite=0,65536,7 counter", source_disk)
    g.console.wait_for(r"COUNTER 2\b", 60)
    before = digest(source_disk)
    inc = incoming(target_disk)
    control = migration.Migration(bandwidth=16 * MIB)
    at_cancel: list[migration.MigrationProgress] = []

    def cancel_midway(p: migration.MigrationProgress) -> None:
        if p.disk_bytes_sent > 4 * MIB and not at_cancel:
            at_cancel.append(p)
            control.cancel()

    with pytest.raises(migration.MigrationError, match="cancel") as exc:
        migration.migrate(
            g.machine,
            inc.listener.address,
            inc.token,
            control=control,
            copy_disks=[0],
            progress=cancel_midway,
            progress_interval=0.02,
        )
    inc.join()
    assert not exc.value.committed
    assert exc.value.result is not None
    assert 4 * MIB < exc.value.result.disk_bytes < 32 * MIB
    # The cap held the disk's bytes too (at most one record ahead of it).
    (p,) = at_cancel
    assert p.bytes_sent <= 16 * MIB * p.elapsed_ms / 1e3 + 2 * MIB, p
    assert inc.error is not None
    assert "cancel" in inc.error.message
    assert g.machine.state() is native.MachineState.RUNNING
    c = last_counter(g.console.text)
    g.console.wait_for(rf"COUNTER {c + 2}\b", 30)
    assert digest(source_disk) == before
    # The target's file holds part of the copy: not the source's, and not removed.
    assert target_disk.exists()
    assert digest(target_disk) != before
    # Again, to a new target on the same file (emptied first): the whole disk this time.
    again = incoming(target_disk)
    result = migration.migrate(
        g.machine, again.listener.address, again.token, copy_disks=[0], debug=True
    )
    again.join()
    assert again.error is None, again.error
    assert result.disk_bytes >= 32 * MIB
    assert digest(target_disk) == digest(source_disk) == before


def test_the_copy_is_flushed_before_the_pause(
    disk_boot: Boot, incoming: Callable[..., Incoming], tmp_path: Path
) -> None:
    """128 MiB of disk data cross during pre-copy; the target flushes them before the source
    pauses (at the drain), so the pause does not wait for them to reach its disk (a flush of
    that much took 80-110 ms in the pause on these hosts, 1-4 ms with it flushed before)."""
    source_disk = tmp_path / "source.img"
    with source_disk.open("wb") as f:
        block = os.urandom(MIB)
        for _ in range(128):
            f.write(block)
        os.fsync(f.fileno())
    target_disk = sparse(tmp_path / "target.img", 128 * MIB)
    g = disk_boot("blkinfo counter", source_disk)
    g.console.wait_for(r"COUNTER 2\b", 30)
    inc = incoming(target_disk)
    result = migration.migrate(g.machine, inc.listener.address, inc.token, copy_disks=[0])
    inc.join()
    assert inc.error is None, inc.error
    assert result.disk_bytes == 128 * MIB
    assert result.downtime_ms < 40, result
    assert digest(target_disk) == digest(source_disk)


def test_the_target_locks_its_copy_before_writing_it(
    disk_boot: Boot, incoming: Callable[..., Incoming], tmp_path: Path
) -> None:
    """The copy is the target's own file: it takes the volume lock on it at setup, so a file
    someone else holds (another VMM, the storage agent wiping it) is refused untouched."""
    source_disk = sparse(tmp_path / "source.img", 4 * MIB)
    target_disk = sparse(tmp_path / "target.img", 4 * MIB)
    with target_disk.open("r+b") as f:
        f.write(b"theirs")
    g = disk_boot("blkinfo blkwrite=0,64,3 counter", source_disk)
    g.console.wait_for(r"COUNTER 2\b", 30)
    holder = os.open(target_disk, os.O_RDWR)
    try:
        # Another open file description's shared lock (the storage agent reading it).
        fcntl.fcntl(
            holder, fcntl.F_OFD_SETLK, struct.pack("hhxxxxqqixxxx", fcntl.F_RDLCK, 0, 0, 0, 0)
        )
        inc = incoming(target_disk)
        with pytest.raises(migration.MigrationError, match="in use") as exc:
            migration.migrate(g.machine, inc.listener.address, inc.token, copy_disks=[0])
        inc.join()
    finally:
        os.close(holder)
    assert exc.value.refused
    assert target_disk.read_bytes()[:6] == b"theirs"
    c = last_counter(g.console.text)
    g.console.wait_for(rf"COUNTER {c + 2}\b", 30)


def test_progress_counts_the_disk_beside_the_ram(
    disk_boot: Boot, incoming: Callable[..., Incoming], tmp_path: Path
) -> None:
    """A guest rewriting 1 MiB of its disk against a budget nothing meets: each round finds
    chunks written since, and the remaining bytes (what the pause is predicted from) count
    them beside the dirty pages; at the timeout the source runs on. A round that found
    chunks is followed at once by one that sends them: a sample catches the figures between
    the two only now and then (a few times a second), so the progress is sampled often, and
    an attempt whose samples all missed is made again."""
    source_disk = sparse(tmp_path / "source.img", 16 * MIB)
    target_disk = sparse(tmp_path / "target.img", 16 * MIB)
    g = disk_boot("blkinfo blkloop=0,2048,100000", source_disk)
    g.console.wait_for(r"BLK loop pass=5\b", 30)
    seen: list[migration.MigrationProgress] = []
    for _attempt in range(6):
        inc = incoming(target_disk)
        with pytest.raises(migration.MigrationError, match="timed out"):
            migration.migrate(
                g.machine,
                inc.listener.address,
                inc.token,
                copy_disks=[0],
                max_downtime_ms=0.001,
                auto_converge=False,
                timeout=1.5,
                progress=seen.append,
                progress_interval=0.0005,
            )
        inc.join()
        assert g.machine.state() is native.MachineState.RUNNING
        if any(p.disk_remaining_bytes for p in seen):
            break
    dirty = [p for p in seen if p.disk_remaining_bytes]
    assert dirty, seen[-5:]
    assert all(p.remaining_bytes >= p.disk_remaining_bytes for p in dirty)
    assert all(p.predicted_ms > 0 for p in dirty)
    assert g.machine.state() is native.MachineState.RUNNING
    n = int(re.findall(r"BLK loop pass=(\d+)", g.console.text)[-1])
    g.console.wait_for(rf"BLK loop pass={n + 3}\b", 30)


def test_a_version_1_stream_still_migrates_a_guest_on_shared_storage(
    disk_boot: Boot, incoming: Callable[..., Incoming], tmp_path: Path
) -> None:
    """A rolling upgrade: a source of the release before block copy speaks stream version 1
    (no DISKS record, a shorter END), and a target of this release takes it; this source
    speaks version 1 to such a target (`stream_version=1`). The disk is shared (the target
    opens the same file), so nothing is copied, and the guest runs on at the target."""
    disk = sparse(tmp_path / "shared.img", 16 * MIB)
    g = disk_boot("blkinfo blkwrite=0,64,5 counter", disk)
    g.console.wait_for(r"COUNTER 2\b", 30)
    inc = incoming(disk, copy=False)
    result = migration.migrate(
        g.machine, inc.listener.address, inc.token, debug=True, stream_version=1
    )
    inc.join()
    assert inc.error is None, inc.error
    assert inc.machine is not None
    assert inc.result is not None
    assert result.disk_bytes == inc.result.disk_bytes == 0
    assert result.ram_checksum == inc.result.ram_checksum  # debug: END's RAM sum checked
    source_text = g.console.drain()
    inc.machine.start()
    inc.console.wait_for(rf"COUNTER {last_counter(source_text) + 2}\b", 30)
    assert "BLK capacity" not in inc.console.text  # no second boot


def test_a_version_1_stream_copies_no_disks(
    disk_boot: Boot, incoming: Callable[..., Incoming], tmp_path: Path
) -> None:
    """Block copy needs version 2 at both ends: this source refuses to copy to a version-1
    target before it sends anything, and this target, given a disk to copy, refuses a
    version-1 source; the source runs on either way."""
    source_disk = sparse(tmp_path / "source.img", 16 * MIB)
    target_disk = sparse(tmp_path / "target.img", 16 * MIB)
    g = disk_boot("blkinfo blkwrite=0,64,3 counter", source_disk)
    g.console.wait_for(r"COUNTER 2\b", 30)
    inc = incoming(target_disk, copy=True)
    with pytest.raises(migration.MigrationError, match="copies no disks") as exc:
        migration.migrate(
            g.machine, inc.listener.address, inc.token, copy_disks=[0], stream_version=1
        )
    assert not exc.value.committed
    with pytest.raises(migration.MigrationError, match="source does not copy it") as exc:
        migration.migrate(g.machine, inc.listener.address, inc.token, stream_version=1)
    inc.join()
    assert exc.value.refused
    assert not exc.value.committed
    assert inc.error is not None
    before = last_counter(g.console.text)
    g.console.wait_for(rf"COUNTER {before + 2}\b", 30)
    with pytest.raises(ValueError, match="speaks versions 1 to 2"):
        migration.migrate(g.machine, inc.listener.address, inc.token, stream_version=3)
