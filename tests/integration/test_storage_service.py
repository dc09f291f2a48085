"""The storage service in a process of its own, in front of a compute node's storage agent,
through a real broker: pools learned from the agent, volumes made by the agent on the host's
pool, one event per change (the agent stays silent), a kill -9 of the service mid-clone
reconciled on restart, two replicas on one PostgreSQL catalog."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from protos.volumes import (
    Attachment,
    AttachVolume,
    CreateVolume,
    DeleteVolume,
    GetVolume,
    ListVolumes,
    Pools,
    ResizeVolume,
    Volume,
    VolumePage,
)
from protos.volumes import ListPools as ListCatalogPools
from services.bus import Bus, RemoteError
from tests.brokers import STORAGE_EVENTS, purge_queues
from tests.integration.compute_harness import ComputeProcess
from tests.integration.conftest import MakeBus
from tests.integration.storage_harness import StorageProcess, VolumeWatcher, call
from tests.pg import fresh_database

pytestmark = pytest.mark.integration
MiB = 1 << 20


class Stack:
    def __init__(
        self, compute: ComputeProcess, storage: StorageProcess, bus: Bus, watcher: VolumeWatcher
    ) -> None:
        self.compute = compute
        self.storage = storage
        self.bus = bus
        self.watcher = watcher
        self.pool = compute.state_dir.parent / "pool"

    def files(self) -> set[str]:
        return {p.name for p in (self.pool / "volumes").iterdir()}

    def temp_files(self) -> set[str]:
        return {p.name for p in (self.pool / ".tmp").iterdir()}

    def volume(self, command: object) -> Volume:
        reply = call(self.bus, command)  # type: ignore[arg-type]
        assert isinstance(reply, Volume), reply
        return reply

    def refused(self, command: object) -> RemoteError:
        with pytest.raises(RemoteError) as caught:
            call(self.bus, command)  # type: ignore[arg-type]
        return caught.value


@contextlib.contextmanager
def stack(
    amqp_url: str, tmp_path: Path, make_bus: MakeBus, monkeypatch: pytest.MonkeyPatch, db_url: str
) -> Iterator[Stack]:
    pool = tmp_path / "pool"
    pool.mkdir()
    monkeypatch.setenv("FLOTILLA_DRIVER", "fake")
    monkeypatch.setenv("FLOTILLA_POOLS", json.dumps([{"name": "local", "path": str(pool)}]))
    state = tmp_path / "state"
    state.mkdir()
    bus = make_bus("test-client")
    watcher = VolumeWatcher(make_bus("test-watcher"))
    host = f"sv-{uuid.uuid4().hex[:6]}"
    compute = ComputeProcess(amqp_url, state, host).start(bus)
    storage = StorageProcess(
        amqp_url,
        db_url,
        tmp_path / "storage.log",
        replica="r1",
        agent_hosts=[host],
        default_pool="local",
    )
    try:
        purge_queues(amqp_url, STORAGE_EVENTS)  # earlier tests' hosts are not this test's
        storage.start(bus)
        yield Stack(compute, storage, bus, watcher)
    finally:
        storage.stop()
        compute.stop()
        watcher.subscription.close()


@pytest.fixture
def sqlite_stack(
    amqp_url: str, tmp_path: Path, make_bus: MakeBus, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Stack]:
    with stack(amqp_url, tmp_path, make_bus, monkeypatch, f"sqlite:///{tmp_path}/cat.db") as s:
        yield s


def test_volumes_through_the_service_are_made_by_the_agent_and_announced_once(
    sqlite_stack: Stack,
) -> None:
    s = sqlite_stack
    pools = call(s.bus, ListCatalogPools())
    assert isinstance(pools, Pools)
    [pool] = pools.pools
    assert (pool.name, pool.kind, pool.host) == ("local", "dir", s.compute.host)
    assert pool.capacity > 0

    vid = uuid.uuid4()
    created = s.volume(CreateVolume(volume_id=vid, project="p1", name="data", size=8 * MiB))
    assert (created.state, created.host, created.size) == ("available", s.compute.host, 8 * MiB)
    assert s.files() == {str(vid)}
    with (s.pool / "volumes" / str(vid)).open("r+b") as f:
        f.write(b"source data")

    clone = s.volume(CreateVolume(volume_id=uuid.uuid4(), project="p1", name="copy", source_id=vid))
    assert (s.pool / "volumes" / str(clone.volume_id)).read_bytes()[:11] == b"source data"
    assert s.volume(ResizeVolume(volume_id=vid, project="p1", size=16 * MiB)).size == 16 * MiB
    err = s.refused(CreateVolume(volume_id=uuid.uuid4(), project="p1", name="data", size=MiB))
    assert (err.code, err.details["reason"]) == ("conflict", "name_in_use")
    assert s.refused(GetVolume(volume_id=vid, project="p2")).code == "not_found"

    domain = uuid.uuid4()
    s.volume(
        AttachVolume(
            volume_id=vid, project="p1", attachment=Attachment(domain_id=domain, target="vdb")
        )
    )
    assert s.refused(DeleteVolume(volume_id=vid, project="p1")).details["reason"] == "attached"
    assert s.files() == {str(vid), str(clone.volume_id)}

    page = call(s.bus, ListVolumes(project="p1"))
    assert isinstance(page, VolumePage)
    assert [(v.name, v.state) for v in page.volumes] == [
        ("copy", "available"),
        ("data", "attached"),
    ]
    s.volume(DeleteVolume(volume_id=clone.volume_id, project="p1"))
    assert s.files() == {str(vid)}

    events = s.watcher.of(vid, 3)
    assert [(e.TYPE, e.seq, e.project, e.name) for e in events] == [
        ("volume.created", 1, "p1", "data"),
        ("volume.resized", 2, "p1", "data"),
        ("volume.attached", 3, "p1", "data"),
    ]
    clone_events = s.watcher.of(clone.volume_id, 2)
    assert [(e.TYPE, e.seq) for e in clone_events] == [
        ("volume.created", 1),
        ("volume.deleted", 2),
    ]
    time.sleep(1.0)  # anything the agent would have announced has arrived by now
    sources = {env.source for env, _ in s.watcher.events}
    assert sources == {"storage:r1"}, sources
    assert len(s.watcher.of(vid, 3)) == 3


def _fill(path: Path, size: int) -> bytes:
    chunk = bytes(range(256)) * (MiB // 256)
    with path.open("r+b") as f:  # data, not holes: a copy takes a while
        for _ in range(size // MiB):
            f.write(chunk)
    return chunk


@pytest.mark.slow
def test_kill_9_of_the_service_mid_clone_then_restart_leaves_nothing_stuck(
    sqlite_stack: Stack,
) -> None:
    s = sqlite_stack
    size = 512 * MiB
    source = s.volume(CreateVolume(volume_id=uuid.uuid4(), project="p1", name="big", size=size))
    chunk = _fill(s.pool / "volumes" / str(source.volume_id), size)
    target = uuid.uuid4()
    s.bus.send(
        "storage",
        CreateVolume(volume_id=target, project="p1", name="big-copy", source_id=source.volume_id),
    )
    deadline = time.monotonic() + 30
    while not s.temp_files() and time.monotonic() < deadline:
        time.sleep(0.002)
    assert s.temp_files(), "the clone never started"
    s.storage.kill()

    s.storage.start(s.bus)
    # The copy ran on in the agent; the redelivered command or reconcile finishes the record.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        reply = call(s.bus, GetVolume(volume_id=target)) if _exists(s, target) else None
        if isinstance(reply, Volume) and reply.state not in ("creating", "deleting"):
            break
        if reply is None and str(target) not in s.files() and not s.temp_files():
            break
        time.sleep(0.2)
    page = call(s.bus, ListVolumes())
    assert isinstance(page, VolumePage)
    states = {str(v.volume_id): v.state for v in page.volumes}
    assert set(states.values()) <= {"available"}, states
    assert set(states) == s.files(), "catalog and pool disagree"
    assert not s.temp_files()
    if str(target) in states:
        with (s.pool / "volumes" / str(target)).open("rb") as f:
            assert f.read(MiB) == chunk
        created = [e for e in s.watcher.of(target, 1) if e.TYPE == "volume.created"]
        assert len(created) == 1


def _exists(s: Stack, volume_id: uuid.UUID) -> bool:
    try:
        call(s.bus, GetVolume(volume_id=volume_id))
    except RemoteError as exc:
        if exc.code == "not_found":
            return False
        raise
    return True


@pytest.mark.slow
def test_two_replicas_share_one_postgresql_catalog(
    amqp_url: str,
    tmp_path: Path,
    make_bus: MakeBus,
    monkeypatch: pytest.MonkeyPatch,
    pg_server: str,
) -> None:
    with (
        fresh_database(pg_server) as db_url,
        stack(amqp_url, tmp_path, make_bus, monkeypatch, db_url) as s,
    ):
        second = StorageProcess(
            amqp_url,
            db_url,
            tmp_path / "storage-2.log",
            replica="r2",
            agent_hosts=[s.compute.host],
            default_pool="local",
        )
        second.start(s.bus)
        try:
            ids = [uuid.uuid4() for _ in range(12)]
            for i, vid in enumerate(ids):
                s.bus.send(
                    "storage",
                    CreateVolume(volume_id=vid, project="p1", name=f"v{i:02d}", size=MiB),
                )
            # One name, two creates at once: exactly one wins.
            racing = [uuid.uuid4(), uuid.uuid4()]
            for vid in racing:
                s.bus.send(
                    "storage", CreateVolume(volume_id=vid, project="p1", name="race", size=MiB)
                )
            for vid in ids:
                assert s.watcher.of(vid, 1)[0].TYPE == "volume.created"
            deadline = time.monotonic() + 30
            while True:
                page = call(s.bus, ListVolumes(project="p1"))
                assert isinstance(page, VolumePage)
                if len(page.volumes) == 13 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert [v.name for v in page.volumes] == ["race"] + [f"v{i:02d}" for i in range(12)]
            assert len(s.files()) == 13
            sources = {env.source for env, _ in s.watcher.events}
            assert sources == {"storage:r1", "storage:r2"}, "both replicas served"
        finally:
            second.stop()
