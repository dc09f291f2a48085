"""The storage agent of a compute node process (fake hypervisor driver, real pool directory)
through a real broker: RPCs on `storage.<host>`, error replies, volume events with rising seq,
and a kill -9 in the middle of a clone."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protos import routing
from protos.base import Message
from protos.codec import Envelope
from protos.commands import Command
from protos.replies import Done
from protos.storage import (
    CloneVolume,
    CreateVolume,
    DeleteVolume,
    GetPoolInfo,
    GetVolumeInfo,
    PoolInfo,
    ResizeVolume,
    VolumeEvent,
    VolumeInfo,
)
from services.bus import Bus, RemoteError
from tests.integration.compute_harness import ComputeProcess
from tests.integration.conftest import MakeBus

pytestmark = pytest.mark.integration
MiB = 1 << 20


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


class VolumeEvents:
    """Every volume event a subscriber of the events exchange sees, in arrival order."""

    def __init__(self, bus: Bus) -> None:
        self.events: list[VolumeEvent] = []
        self._cond = threading.Condition()
        self.subscription = bus.subscribe(["volume.#"], self._on_event)

    def _on_event(self, _envelope: Envelope, event: Message) -> None:
        assert isinstance(event, VolumeEvent)
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def of(self, volume_id: uuid.UUID, count: int, timeout: float = 15.0) -> list[VolumeEvent]:
        def mine() -> list[VolumeEvent]:
            return [e for e in self.events if e.volume_id == volume_id]

        with self._cond:
            self._cond.wait_for(lambda: len(mine()) >= count, timeout)
            found = mine()
        assert len(found) >= count, [(e.TYPE, e.seq) for e in found]
        return found


class Node:
    def __init__(self, compute: ComputeProcess, bus: Bus, events: VolumeEvents, pool: Path):
        self.compute = compute
        self.bus = bus
        self.events = events
        self.pool = pool
        self.queue = routing.storage_queue(compute.host)

    def call(self, command: Command) -> Message:
        return self.bus.call(self.queue, command, timeout=30)

    def volume(self, command: Command) -> VolumeInfo:
        reply = self.call(command)
        assert isinstance(reply, VolumeInfo), reply
        return reply

    def refused(self, command: Command) -> RemoteError:
        with pytest.raises(RemoteError) as caught:
            self.call(command)
        return caught.value

    def path(self, volume_id: uuid.UUID) -> Path:
        return self.pool / "volumes" / str(volume_id)


@pytest.fixture
def node(
    amqp_url: str, tmp_path: Path, make_bus: MakeBus, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Node]:
    pool = tmp_path / "pool"
    pool.mkdir()
    monkeypatch.setenv("FLOTILLA_DRIVER", "fake")
    monkeypatch.setenv("FLOTILLA_POOLS", json.dumps([{"name": "p", "path": str(pool)}]))
    state = tmp_path / "state"
    state.mkdir()
    bus = make_bus("test-client")
    events = VolumeEvents(make_bus("test-watcher"))
    compute = ComputeProcess(amqp_url, state, f"st-{uuid.uuid4().hex[:6]}")
    compute.start(bus)
    yield Node(compute, bus, events, pool)
    compute.stop()
    events.subscription.close()


def test_volumes_through_the_bus_with_events_in_order(node: Node) -> None:
    pool = node.call(GetPoolInfo(pool="p"))
    assert isinstance(pool, PoolInfo)
    assert pool.capacity > 0
    assert pool.host == node.compute.host

    vid, clone_id = uuid.uuid4(), uuid.uuid4()
    create = CreateVolume(pool="p", volume_id=vid, size=8 * MiB)
    message_id = str(uuid.uuid4())
    created = node.bus.call(node.queue, create, timeout=30, message_id=message_id)
    assert isinstance(created, VolumeInfo)
    assert (created.size, created.seq) == (8 * MiB, 1)
    # The same message again (a caller's resend) is answered from its record: no second
    # volume, no `exists`, no second event.
    again = node.bus.call(node.queue, create, timeout=30, message_id=message_id)
    assert again == created
    with node.path(vid).open("r+b") as f:
        f.write(b"source data")
    assert node.volume(GetVolumeInfo(pool="p", volume_id=vid)).size == 8 * MiB

    clone = node.volume(CloneVolume(pool="p", volume_id=clone_id, source_id=vid))
    assert clone.size == 8 * MiB
    with node.path(vid).open("r+b") as f:
        f.write(b"SOURCE")
    assert node.path(clone_id).read_bytes()[:11] == b"source data"

    assert node.volume(ResizeVolume(pool="p", volume_id=vid, size=16 * MiB)).size == 16 * MiB
    shrink = node.refused(ResizeVolume(pool="p", volume_id=vid, size=MiB))
    assert (shrink.code, shrink.details) == ("conflict", {"reason": "shrink"})
    exists = node.refused(CreateVolume(pool="p", volume_id=vid, size=MiB))
    assert exists.code == "conflict"
    assert node.refused(GetVolumeInfo(pool="p", volume_id=uuid.uuid4())).code == "not_found"
    assert node.refused(GetPoolInfo(pool="nope")).code == "not_found"
    assert node.refused(CreateVolume(pool="p", volume_id=uuid.uuid4(), size=60 << 40)).code == (
        "no_space"
    )

    assert isinstance(node.call(DeleteVolume(pool="p", volume_id=vid)), Done)
    assert not node.path(vid).exists()
    assert node.path(clone_id).exists()

    events = node.events.of(vid, 3)
    assert [(e.TYPE, e.seq) for e in events] == [
        ("volume.created", 1),
        ("volume.resized", 2),
        ("volume.deleted", 3),
    ]
    (cloned,) = node.events.of(clone_id, 1)
    assert cloned.TYPE == "volume.created"
    assert getattr(cloned, "source_id", None) == vid


# The hostile bodies below are built unvalidated; pydantic warns when it serializes them.
@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")
def test_bad_sizes_and_ids_are_refused_as_invalid(node: Node) -> None:
    """Bodies a typed client would refuse to build, sent raw: the agent answers `invalid`."""
    good: dict[str, Any] = {"pool": "p", "volume_id": str(uuid.uuid4()), "size": MiB}
    for bad in (
        {"size": 1000},
        {"size": 0},
        {"size": -512},
        {"volume_id": "../../etc/passwd"},
        {"pool": "../.."},
    ):
        body = {**good, **bad}
        command = CreateVolume.model_construct(**body)  # skips validation, as a hostile client
        error = node.refused(command)
        assert error.code == "invalid", (bad, error)
    assert list((node.pool / "volumes").iterdir()) == []


@pytest.mark.slow
def test_kill_9_mid_clone_then_restart_leaves_nothing_stuck(node: Node) -> None:
    source, target = uuid.uuid4(), uuid.uuid4()
    size = 512 * MiB
    node.volume(CreateVolume(pool="p", volume_id=source, size=size))
    chunk = bytes(range(256)) * (MiB // 256)
    with node.path(source).open("r+b") as f:  # data, not holes: a copy takes a while
        for _ in range(size // MiB):
            f.write(chunk)
    capabilities = node.call(GetPoolInfo(pool="p"))
    assert isinstance(capabilities, PoolInfo)
    if capabilities.capabilities.reflink:
        pytest.skip("clones here are instant reflinks: nothing to interrupt")

    tmp_dir = node.pool / ".tmp"
    node.bus.send(node.queue, CloneVolume(pool="p", volume_id=target, source_id=source))
    deadline = time.monotonic() + 20
    leftover: set[str] = set()
    while not leftover and time.monotonic() < deadline:
        leftover = names(tmp_dir)
        time.sleep(0.002)
    assert leftover, "the clone never started"
    node.compute.kill()
    assert not node.path(target).exists(), "the clone finished before the kill"
    assert leftover <= names(tmp_dir)  # the killed copy's temp file

    node.compute.start(node.bus)
    log = node.compute.log()
    assert "pool reconciled" in log
    for name in leftover:
        assert name in log
    # The unacknowledged clone is delivered again and completes; nothing stays half-done.
    deadline = time.monotonic() + 60
    while not node.path(target).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    info = node.volume(GetVolumeInfo(pool="p", volume_id=target))
    assert info.size == size
    with node.path(target).open("rb") as f:
        assert f.read(MiB) == chunk
    assert not leftover & names(tmp_dir)
    created = node.events.of(target, 1)
    assert [(e.TYPE, e.seq) for e in created] == [("volume.created", 1)]
    assert isinstance(node.call(DeleteVolume(pool="p", volume_id=source)), Done)
