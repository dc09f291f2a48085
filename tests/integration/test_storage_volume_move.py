"""Moving a host-local volume between two compute nodes' `dir` pools through the storage
service (`MoveVolume`): the bytes go host to host over the transfer ports, sparse and
checked; the id, size and attachment stay; the source file goes only after the target's is
verified; a repeat is answered as it is; a volume a guest writes is refused and stays. A
shut-off domain with such a volume migrates cold: its volume moves first."""

from __future__ import annotations

import fcntl
import json
import os
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pika
import pytest

from protos import routing
from protos.bindings import DiskBinding
from protos.commands import DefineDomain, GetDomainInfo, StartDomain
from protos.domain import BootSpec, DiskSpec, DomainSpec, PowerState
from protos.migration import MigrationParams, MigrationPhase
from protos.replies import DomainInfo
from protos.volumes import (
    Attachment,
    AttachVolume,
    CreateVolume,
    GetVolume,
    LiveMoveVolume,
    MoveVolume,
    ResizeVolume,
    Volume,
)
from services.bus import Bus, RemoteError
from tests.bootfiles import BOOT_DIR, KERNEL
from tests.brokers import STORAGE_EVENTS, purge_queues
from tests.integration.compute_harness import ComputeProcess
from tests.integration.conftest import MakeBus
from tests.integration.storage_harness import StorageProcess, VolumeWatcher, call
from tests.integration.test_compute_migration import ended, migrate

pytestmark = pytest.mark.integration
MiB = 1 << 20


class TwoHosts:
    def __init__(
        self,
        bus: Bus,
        computes: list[ComputeProcess],
        pools: dict[str, Path],
        watcher: VolumeWatcher,
        storage: StorageProcess,
    ) -> None:
        self.storage = storage
        self.bus = bus
        self.computes = computes
        self.hosts = [c.host for c in computes]
        self.pools = pools
        self.watcher = watcher

    def events(self, volume_id: uuid.UUID) -> list[tuple[str, int, str, str]]:
        """(type, seq, host, from_host) of the volume's events published so far."""
        return [
            (e.TYPE, e.seq, e.host, getattr(e, "from_host", ""))
            for _, e in self.watcher.all_of(self.bus, volume_id)
        ]

    def volume(self, command: object) -> Volume:
        reply = call(self.bus, command, timeout=90)  # type: ignore[arg-type]
        assert isinstance(reply, Volume), reply
        return reply

    def file(self, volume: Volume) -> Path:
        assert volume.host is not None
        return self.pools[volume.host] / "volumes" / str(volume.volume_id)


@pytest.fixture
def two_hosts(
    amqp_url: str, tmp_path: Path, make_bus: MakeBus, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TwoHosts]:
    monkeypatch.setenv("FLOTILLA_DRIVER", "fake")
    monkeypatch.setenv("FLOTILLA_ALLOWED_BOOT_DIRS", str(BOOT_DIR))
    monkeypatch.setenv("FLOTILLA_RESERVED_HOST_MEMORY_MIB", "0")
    bus = make_bus("test-client")
    watcher = VolumeWatcher(make_bus("test-watcher"))
    tag = uuid.uuid4().hex[:6]
    computes: list[ComputeProcess] = []
    pools: dict[str, Path] = {}
    storage = StorageProcess(
        amqp_url,
        f"sqlite:///{tmp_path}/cat.db",
        tmp_path / "storage.log",
        replica="r1",
        agent_hosts=[f"mv{i}-{tag}" for i in range(2)],
        default_pool="local",
    )
    try:
        for host in storage.agent_hosts:
            pool = tmp_path / host / "pool"
            state = tmp_path / host / "state"
            pool.mkdir(parents=True)
            state.mkdir()
            monkeypatch.setenv("FLOTILLA_POOLS", json.dumps([{"name": "local", "path": str(pool)}]))
            computes.append(ComputeProcess(amqp_url, state, host).start(bus))
            pools[host] = pool
        purge_queues(amqp_url, STORAGE_EVENTS)
        storage.start(bus)
        yield TwoHosts(bus, computes, pools, watcher, storage)
    finally:
        storage.stop()
        for c in computes:
            c.stop()
        watcher.subscription.close()


def _pattern(path: Path) -> bytes:
    """Data, a hole, data, a hole: what the volume should read as wherever it is."""
    size = path.stat().st_size
    head, tail = os.urandom(MiB // 2), os.urandom(MiB // 4)
    with path.open("r+b") as f:
        f.write(head)
        f.seek(size - MiB // 2)
        f.write(tail)
    return head + bytes(size - MiB) + tail + bytes(MiB // 4)


def test_a_volume_moves_to_the_other_host(two_hosts: TwoHosts) -> None:
    t = two_hosts
    vid = uuid.uuid4()
    made = t.volume(CreateVolume(volume_id=vid, project="p1", name="data", size=9 * MiB))
    source_file = t.file(made)
    want = _pattern(source_file)
    domain = uuid.uuid4()
    t.volume(
        AttachVolume(
            volume_id=vid, project="p1", attachment=Attachment(domain_id=domain, target="vdb")
        )
    )
    [other] = [h for h in t.hosts if h != made.host]
    moved = t.volume(MoveVolume(volume_id=vid, project="p1", host=other))
    assert moved.host == other
    assert (moved.volume_id, moved.size, moved.state) == (vid, 9 * MiB, "attached")
    assert moved.attachment == Attachment(domain_id=domain, target="vdb")
    target_file = t.file(moved)
    assert target_file.read_bytes() == want
    assert target_file.stat().st_blocks * 512 < 4 * MiB  # the hole stayed a hole
    assert not source_file.exists()
    assert t.volume(GetVolume(volume_id=vid, project="p1")).host == other
    # Again (a retry, a redelivery): answered as it is, nothing moves.
    assert t.volume(MoveVolume(volume_id=vid, project="p1", host=other)).host == other
    assert target_file.read_bytes() == want
    # And back.
    back = t.volume(MoveVolume(volume_id=vid, project="p1", host=made.host or ""))
    assert t.file(back).read_bytes() == want
    assert not target_file.exists()
    # Each move is announced once, its seq going on from the volume's last event.
    source = made.host or ""
    assert t.events(vid) == [
        ("volume.created", 1, source, ""),
        ("volume.attached", 2, source, ""),
        ("volume.moved", 3, other, source),
        ("volume.moved", 4, source, other),
    ]


def test_a_volume_a_guest_writes_does_not_move(two_hosts: TwoHosts) -> None:
    t = two_hosts
    vid = uuid.uuid4()
    made = t.volume(CreateVolume(volume_id=vid, project="p1", name="busy", size=2 * MiB))
    source_file = t.file(made)
    want = _pattern(source_file)
    [other] = [h for h in t.hosts if h != made.host]
    fd = os.open(source_file, os.O_RDWR)
    try:  # the writer lock a running guest's VMM holds
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("@hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
        with pytest.raises(RemoteError) as refused:
            call(t.bus, MoveVolume(volume_id=vid, project="p1", host=other), timeout=60)
    finally:
        os.close(fd)
    assert (refused.value.code, refused.value.details.get("reason")) == ("conflict", "busy")
    assert t.volume(GetVolume(volume_id=vid, project="p1")).host == made.host
    assert source_file.read_bytes() == want
    assert not (t.pools[other] / "volumes" / str(vid)).exists()
    assert not list((t.pools[other] / ".tmp").iterdir())
    with pytest.raises(RemoteError) as nowhere:
        call(t.bus, MoveVolume(volume_id=vid, project="p1", host="no-such-host"))
    assert nowhere.value.code == "not_found"
    assert [e[0] for e in t.events(vid)] == ["volume.created"]  # refused: nothing announced


def test_a_shut_off_domain_migrates_cold_with_its_host_local_volume(two_hosts: TwoHosts) -> None:
    t = two_hosts
    vid = uuid.uuid4()
    made = t.volume(CreateVolume(volume_id=vid, project="p1", name="root", size=4 * MiB))
    want = _pattern(t.file(made))
    src = next(c for c in t.computes if c.host == made.host)
    dst = next(c for c in t.computes if c.host != made.host)
    spec = DomainSpec(
        name=f"cold-{uuid.uuid4().hex[:6]}",
        boot=BootSpec(kernel=KERNEL),
        disks=[DiskSpec(target="vdb", volume_id=vid)],
    )
    t.volume(
        AttachVolume(
            volume_id=vid, project="p1", attachment=Attachment(domain_id=spec.uuid, target="vdb")
        )
    )
    binding = DiskBinding(target="vdb", volume_id=vid, pool="local", host=src.host)
    t.bus.call(src.queue, DefineDomain(spec=spec, disks=[binding]), timeout=20)
    source_file = t.file(made)
    migrate(t.bus, src, dst, spec, MigrationParams(live=False))
    assert ended(t.bus, src, spec.uuid).phase is MigrationPhase.DONE
    moved = t.volume(GetVolume(volume_id=vid, project="p1"))
    assert (moved.host, moved.state) == (dst.host, "attached")
    assert moved.attachment == Attachment(domain_id=spec.uuid, target="vdb")
    assert t.file(moved).read_bytes() == want
    assert not source_file.exists()
    # Subscribers learn it once, as every other change of the volume, from the catalog's
    # outbox, under the migration's correlation id.
    assert t.events(vid) == [
        ("volume.created", 1, src.host, ""),
        ("volume.attached", 2, src.host, ""),
        ("volume.moved", 3, dst.host, src.host),
    ]
    envelope, event = t.watcher.all_of(t.bus, vid)[-1]
    assert (envelope.type, envelope.source) == ("volume.moved", "storage:r1")
    assert envelope.correlation_id is not None
    assert (event.project, event.name, event.size) == ("p1", "root", 4 * MiB)
    # It starts there: the target opens the volume from its own pool.
    info = t.bus.call(dst.queue, StartDomain(domain_id=spec.uuid), timeout=20)
    assert isinstance(info, DomainInfo)
    assert info.state is PowerState.RUNNING


def test_a_live_move_is_prepared_then_aborted_or_committed(two_hosts: TwoHosts) -> None:
    """`cmd.catalog.volume_live_move`: an empty sparse file on the target under the lease;
    abort removes it and frees the volume; commit names the target and removes the source's
    file (docs/storage.md, "Moving a volume live")."""
    t = two_hosts
    vid = uuid.uuid4()
    made = t.volume(CreateVolume(volume_id=vid, project="p1", name="live", size=8 * MiB))
    source_file = t.file(made)
    want = _pattern(source_file)
    [other] = [h for h in t.hosts if h != made.host]
    target_file = t.pools[other] / "volumes" / str(vid)

    def step(name: Literal["prepare", "commit", "abort"]) -> Volume:
        return t.volume(LiveMoveVolume(volume_id=vid, project="p1", host=other, step=name))

    assert step("prepare").host == made.host
    with pytest.raises(RemoteError) as again:  # prepared already
        step("prepare")
    assert (again.value.code, again.value.details.get("reason")) == ("conflict", "busy")
    assert target_file.stat().st_size == 8 * MiB
    assert target_file.stat().st_blocks == 0  # sparse: the stream fills it
    with pytest.raises(RemoteError) as busy:  # the move holds the volume
        call(t.bus, ResizeVolume(volume_id=vid, project="p1", size=16 * MiB))
    assert (busy.value.code, busy.value.details.get("reason")) == ("conflict", "busy")
    for _ in range(2):
        assert step("abort").host == made.host
    assert not target_file.exists()
    assert source_file.read_bytes() == want
    assert t.volume(ResizeVolume(volume_id=vid, project="p1", size=12 * MiB)).size == 12 * MiB

    step("prepare")
    for _ in range(2):  # a resent commit is answered as it is
        assert step("commit").host == other
    assert t.volume(GetVolume(volume_id=vid, project="p1")).host == other
    assert not source_file.exists()
    assert target_file.stat().st_size == 12 * MiB
    with pytest.raises(RemoteError) as late:
        call(t.bus, LiveMoveVolume(volume_id=vid, project="p1", host=other, step="abort"))
    assert (late.value.code, late.value.details.get("reason")) == ("conflict", "committed")
    assert target_file.exists()
    # The aborts announced nothing; the commit (resent) once.
    source = made.host or ""
    assert t.events(vid) == [
        ("volume.created", 1, source, ""),
        ("volume.resized", 2, source, ""),
        ("volume.moved", 3, other, source),
    ]
    with pytest.raises(RemoteError) as nowhere:
        call(t.bus, LiveMoveVolume(volume_id=vid, project="p1", host="no-such", step="prepare"))
    assert nowhere.value.code == "not_found"


def _drop_queue(amqp_url: str, queue: str) -> None:
    """Delete `queue` on the broker: requests to it are refused at once (no route) until a
    process declares it again, as a storage service does when it starts."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url.split(",", maxsplit=1)[0]))
    try:
        conn.channel().queue_delete(queue)
    finally:
        conn.close()


@pytest.mark.slow  # a 15 s outage, past the old code's ~10 s of resends
def test_a_live_moves_commit_outlives_a_storage_outage(two_hosts: TwoHosts) -> None:
    """The catalog cannot be reached from the source's commit until well after the old ~10 s
    of resends (the storage service stopped and its queue gone: every request refused at
    once), and the source node restarts meanwhile: the commit, kept in the node's store,
    lands once the service is back; the volume is on the target, announced once."""
    t = two_hosts
    vid = uuid.uuid4()
    made = t.volume(CreateVolume(volume_id=vid, project="p1", name="live", size=4 * MiB))
    src = next(c for c in t.computes if c.host == made.host)
    dst = next(c for c in t.computes if c.host != made.host)
    spec = DomainSpec(
        name=f"lv-{uuid.uuid4().hex[:6]}",
        boot=BootSpec(kernel=KERNEL),
        memory_mib=16,
        disks=[DiskSpec(target="vdb", volume_id=vid)],
    )
    t.volume(
        AttachVolume(
            volume_id=vid, project="p1", attachment=Attachment(domain_id=spec.uuid, target="vdb")
        )
    )
    binding = DiskBinding(target="vdb", volume_id=vid, pool="local", host=src.host)
    t.bus.call(src.queue, DefineDomain(spec=spec, disks=[binding]), timeout=20)
    t.bus.call(src.queue, StartDomain(domain_id=spec.uuid), timeout=20)
    # The target's file is prepared before the job is answered; the stream then takes ~2 s.
    migrate(t.bus, src, dst, spec, MigrationParams(bandwidth_mibps=16))
    t.storage.stop()
    _drop_queue(src.amqp_url, routing.STORAGE_QUEUE)
    down = time.monotonic()
    # The job is done while the catalog is unreachable: the commit waits in the node's store.
    assert ended(t.bus, src, spec.uuid, timeout=20).phase is MigrationPhase.DONE
    assert time.monotonic() - down < 15
    info = t.bus.call(dst.queue, GetDomainInfo(domain_id=spec.uuid), timeout=20)
    assert isinstance(info, DomainInfo)
    assert info.state is PowerState.RUNNING
    src.kill()  # a restart, mid-outage (its pool named as the fixture named it)
    pools = [{"name": "local", "path": str(t.pools[src.host])}]
    src.env = {**src.env, "FLOTILLA_POOLS": json.dumps(pools)}
    src.start(t.bus)
    time.sleep(max(0.0, 15 - (time.monotonic() - down)))  # past the old code's 10 resends
    t.storage.start(t.bus)
    deadline = time.monotonic() + 30
    source_file = t.pools[src.host] / "volumes" / str(vid)
    # The catalog names the target, then the source's file goes.
    while t.volume(GetVolume(volume_id=vid, project="p1")).host != dst.host or source_file.exists():
        assert time.monotonic() < deadline, "the commit was lost"
        time.sleep(0.2)
    assert (t.pools[dst.host] / "volumes" / str(vid)).exists()
    assert t.events(vid) == [
        ("volume.created", 1, src.host, ""),
        ("volume.attached", 2, src.host, ""),
        ("volume.moved", 3, dst.host, src.host),
    ]
