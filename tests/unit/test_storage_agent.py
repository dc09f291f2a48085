"""The storage agent's handlers on a real pool in a temp dir (no broker: called the way the
consumer runtime calls them), its error replies, events and seqs, and its pool config."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from compute_node.config import ComputeConfig, PoolConfig
from compute_node.storage import lock_volume
from compute_node.storage_agent import StorageAgent
from compute_node.store import Store
from protos.base import Message
from protos.codec import Envelope, decode, parse_body
from protos.replies import Done, ErrorReply
from protos.storage import (
    CloneVolume,
    CreateVolume,
    DeleteVolume,
    GetPoolInfo,
    GetVolumeInfo,
    ListPools,
    ListVolumes,
    PoolInfo,
    PoolList,
    ResizeVolume,
    VolumeCreated,
    VolumeDeleted,
    VolumeEvent,
    VolumeInfo,
    VolumeList,
    VolumeResized,
    WipeVolume,
)
from services.bus import Context
from services.bus.service import dispatch

CTX = Context(Envelope(type="t", body={}, source="test"))
MiB = 1 << 20


class Agent:
    def __init__(self, path: Path, pools: list[PoolConfig] | None = None) -> None:
        self.store = Store(path / "compute.db", host="node-1", source="compute:node-1")
        self.pool_dir = path / "pool"
        self.service = StorageAgent(
            "node-1", self.store, pools or [PoolConfig(name="p", path=self.pool_dir)]
        )

    def do(self, command: Message) -> Message:
        return dispatch(self.service, command, CTX)

    def ok(self, command: Message) -> VolumeInfo:
        reply = self.do(command)
        assert isinstance(reply, VolumeInfo), reply
        return reply

    def error(self, command: Message) -> ErrorReply:
        reply = self.do(command)
        assert isinstance(reply, ErrorReply), reply
        return reply

    def events(self) -> list[VolumeEvent]:
        items = self.store.outbox()
        if items:
            self.store.outbox_done(items[-1].row)
        out = []
        for item in items:
            event = parse_body(decode(item.body))
            assert isinstance(event, VolumeEvent)
            assert item.routing_key == f"volume.{event.EVENT}.{event.volume_id}"
            out.append(event)
        return out

    def path(self, volume_id: uuid.UUID) -> Path:
        return self.pool_dir / "volumes" / str(volume_id)


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    return Agent(tmp_path)


def test_create_info_list_and_pool_usage(agent: Agent) -> None:
    vid = uuid.uuid4()
    info = agent.ok(CreateVolume(pool="p", volume_id=vid, size=64 * MiB))
    assert (info.volume_id, info.pool, info.host, info.size, info.seq) == (
        vid,
        "p",
        "node-1",
        64 * MiB,
        1,
    )
    assert info.allocation < MiB  # sparse
    assert agent.path(vid).stat().st_size == 64 * MiB
    assert agent.ok(GetVolumeInfo(pool="p", volume_id=vid)) == info
    listed = agent.do(ListVolumes(pool="p"))
    assert isinstance(listed, VolumeList)
    assert [v.volume_id for v in listed.volumes] == [vid]
    pool = agent.do(GetPoolInfo(pool="p"))
    assert isinstance(pool, PoolInfo)
    assert pool.kind == "dir"
    assert pool.capacity > 0
    assert 0 < pool.available <= pool.capacity
    pools = agent.do(ListPools())
    assert isinstance(pools, PoolList)
    assert [p.name for p in pools.pools] == ["p"]
    (event,) = agent.events()
    assert isinstance(event, VolumeCreated)
    assert (event.seq, event.size, event.source_id) == (1, 64 * MiB, None)


def test_clone_is_independent_and_announced_with_its_source(agent: Agent) -> None:
    src, dst = uuid.uuid4(), uuid.uuid4()
    agent.ok(CreateVolume(pool="p", volume_id=src, size=MiB))
    with agent.path(src).open("r+b") as f:
        f.write(b"original")
    clone = agent.ok(CloneVolume(pool="p", volume_id=dst, source_id=src))
    assert clone.size == MiB
    with agent.path(src).open("r+b") as f:
        f.write(b"CHANGED!")
    assert agent.path(dst).read_bytes()[:8] == b"original"
    events = agent.events()
    assert [type(e) for e in events] == [VolumeCreated, VolumeCreated]
    cloned = events[1]
    assert isinstance(cloned, VolumeCreated)
    assert cloned.source_id == src
    assert cloned.method in ("reflink", "copy")


def test_grow_then_shrink_refused_then_delete_with_rising_seq(agent: Agent) -> None:
    vid = uuid.uuid4()
    agent.ok(CreateVolume(pool="p", volume_id=vid, size=MiB))
    assert agent.ok(ResizeVolume(pool="p", volume_id=vid, size=4 * MiB)).size == 4 * MiB
    # The same size again changes nothing and announces nothing.
    assert agent.ok(ResizeVolume(pool="p", volume_id=vid, size=4 * MiB)).seq == 2
    shrink = agent.error(ResizeVolume(pool="p", volume_id=vid, size=MiB))
    assert (shrink.code, shrink.details) == ("conflict", {"reason": "shrink"})
    assert agent.path(vid).stat().st_size == 4 * MiB
    assert isinstance(agent.do(DeleteVolume(pool="p", volume_id=vid)), Done)
    assert not agent.path(vid).exists()
    events = agent.events()
    assert [(type(e), e.seq) for e in events] == [
        (VolumeCreated, 1),
        (VolumeResized, 2),
        (VolumeDeleted, 3),
    ]
    resized = events[1]
    assert isinstance(resized, VolumeResized)
    assert (resized.previous_size, resized.size) == (MiB, 4 * MiB)
    # The same id again continues its seq: a subscriber never sees a number twice.
    assert agent.ok(CreateVolume(pool="p", volume_id=vid, size=MiB)).seq == 4


def test_refusals_map_to_error_codes_and_change_nothing(agent: Agent) -> None:
    vid, other = uuid.uuid4(), uuid.uuid4()
    assert agent.error(GetVolumeInfo(pool="p", volume_id=vid)).code == "not_found"
    assert agent.error(DeleteVolume(pool="p", volume_id=vid)).code == "not_found"
    assert agent.error(GetPoolInfo(pool="nope")).code == "not_found"
    assert agent.error(CreateVolume(pool="nope", volume_id=vid, size=MiB)).code == "not_found"
    agent.ok(CreateVolume(pool="p", volume_id=vid, size=MiB))
    exists = agent.error(CreateVolume(pool="p", volume_id=vid, size=2 * MiB))
    assert (exists.code, exists.details) == ("conflict", {"reason": "exists"})
    assert agent.path(vid).stat().st_size == MiB
    huge = agent.error(CreateVolume(pool="p", volume_id=other, size=60 << 40))
    assert huge.code == "no_space"
    assert not agent.path(other).exists()
    assert agent.error(CloneVolume(pool="p", volume_id=vid, source_id=vid)).code == "invalid"
    assert agent.error(CloneVolume(pool="p", volume_id=other, source_id=uuid.uuid4())).code == (
        "not_found"
    )
    assert [type(e) for e in agent.events()] == [VolumeCreated]
    assert list((agent.pool_dir / ".tmp").iterdir()) == []


@pytest.mark.parametrize("size", [0, -512, 1000, (64 << 40) + 512])
def test_bad_sizes_are_refused_by_the_model(size: int) -> None:
    with pytest.raises(ValidationError):
        CreateVolume(pool="p", volume_id=uuid.uuid4(), size=size)


def test_volume_ids_are_uuids_and_pool_names_are_names() -> None:
    with pytest.raises(ValidationError):
        CreateVolume.model_validate({"pool": "p", "volume_id": "../../etc/passwd", "size": 512})
    with pytest.raises(ValidationError):
        CreateVolume.model_validate({"pool": "../x", "volume_id": str(uuid.uuid4()), "size": 512})


def test_a_volume_in_use_is_neither_deleted_nor_wiped_nor_grown(agent: Agent) -> None:
    vid = uuid.uuid4()
    agent.ok(CreateVolume(pool="p", volume_id=vid, size=MiB))
    with agent.path(vid).open("r+b") as f:
        f.write(b"data")
    agent.events()
    fd = os.open(agent.path(vid), os.O_RDWR)
    try:
        lock_volume(fd, read_only=False, what="disk")  # what a VMM holds on its disk
        for command in (
            DeleteVolume(pool="p", volume_id=vid),
            WipeVolume(pool="p", volume_id=vid),
            ResizeVolume(pool="p", volume_id=vid, size=2 * MiB),
        ):
            reply = agent.error(command)
            assert (reply.code, reply.details) == ("conflict", {"reason": "busy"}), command
    finally:
        os.close(fd)
    assert agent.path(vid).read_bytes()[:4] == b"data"
    assert agent.events() == []
    wiped = agent.ok(WipeVolume(pool="p", volume_id=vid))
    assert wiped.size == MiB
    assert agent.path(vid).read_bytes() == bytes(MiB)


def test_start_reconciles_temp_files_a_killed_operation_left(tmp_path: Path) -> None:
    agent = Agent(tmp_path)
    leftover = agent.pool_dir / ".tmp" / "deadbeef"
    leftover.write_bytes(b"half a clone")
    assert agent.service.reconcile() == {"p": ["deadbeef"]}
    assert not leftover.exists()


def test_pools_config_default_env_and_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ComputeConfig(state_dir=tmp_path / "state", allowed_boot_dirs=[])
    (default,) = config.storage_pools()
    assert (default.name, default.path, default.kind) == (
        "default",
        tmp_path / "state" / "pools" / "default",
        "dir",
    )
    shared = tmp_path / "nfs"
    shared.mkdir()
    monkeypatch.setenv(
        "FLOTILLA_POOLS", json.dumps([{"name": "nfs", "path": str(shared), "kind": "shared"}])
    )
    loaded = ComputeConfig.load(state_dir=tmp_path / "state", allowed_boot_dirs=[])
    assert loaded.storage_pools() == [PoolConfig(name="nfs", path=shared, kind="shared")]
    with pytest.raises(ValidationError, match="absolute"):
        PoolConfig(name="x", path=Path("rel"))
    with pytest.raises(ValidationError, match="unique"):
        ComputeConfig(
            pools=[PoolConfig(name="a", path=shared), PoolConfig(name="a", path=shared)],
            allowed_boot_dirs=[],
        )
    # A shared pool whose directory is missing (an unmounted share) is an error at start,
    # never a fresh local directory.
    with pytest.raises(ValueError, match="does not exist"):
        Agent(tmp_path, [PoolConfig(name="s", path=tmp_path / "unmounted", kind="shared")])
    assert not (tmp_path / "unmounted").exists()


REDELIVERED = Context(Envelope(type="t", body={}, source="test"), redelivered=True)


def test_a_redelivered_create_announces_what_its_killed_copy_made(agent: Agent) -> None:
    """The first copy published the file and died before its event and ack: the broker's
    second delivery announces the volume instead of refusing it as existing."""
    vid = uuid.uuid4()
    (agent.pool_dir / "volumes" / str(vid)).write_bytes(bytes(MiB))  # what the copy left
    command = CreateVolume(pool="p", volume_id=vid, size=MiB)
    # A new command for an existing id is a conflict, as ever.
    assert agent.error(command).code == "conflict"
    reply = dispatch(agent.service, command, REDELIVERED)
    assert isinstance(reply, VolumeInfo), reply
    assert (reply.size, reply.seq) == (MiB, 1)
    assert [(type(e), e.seq) for e in agent.events()] == [(VolumeCreated, 1)]
    # Delivered once more (died after the event, before the ack): answered, not announced.
    again = dispatch(agent.service, command, REDELIVERED)
    assert isinstance(again, VolumeInfo)
    assert again.seq == 1
    assert agent.events() == []


def test_a_redelivered_delete_announces_what_its_killed_copy_removed(agent: Agent) -> None:
    vid = uuid.uuid4()
    agent.ok(CreateVolume(pool="p", volume_id=vid, size=2 * MiB))
    agent.events()
    agent.path(vid).unlink()  # the first copy unlinked and died before its event
    command = DeleteVolume(pool="p", volume_id=vid)
    assert agent.error(command).code == "not_found"
    assert isinstance(dispatch(agent.service, command, REDELIVERED), Done)
    (event,) = agent.events()
    assert isinstance(event, VolumeDeleted)
    assert (event.seq, event.size) == (2, 2 * MiB)
    # Announced once: a further delivery finds nothing to finish.
    assert isinstance(dispatch(agent.service, command, REDELIVERED), ErrorReply)
    assert agent.events() == []


def test_a_change_the_storage_service_announces_itself_is_not_announced_here(
    tmp_path: Path,
) -> None:
    """`announce=False` (the storage service drives the agent and publishes the catalog's
    events): the files change, the outbox stays empty, so subscribers see each change once."""
    agent = Agent(tmp_path)
    vid, copy = uuid.uuid4(), uuid.uuid4()
    agent.ok(CreateVolume(pool="p", volume_id=vid, size=MiB, announce=False))
    agent.ok(CloneVolume(pool="p", volume_id=copy, source_id=vid, announce=False))
    agent.ok(ResizeVolume(pool="p", volume_id=copy, size=2 * MiB, announce=False))
    assert isinstance(agent.do(DeleteVolume(pool="p", volume_id=vid, announce=False)), Done)
    assert agent.events() == []
    assert [p.name for p in (tmp_path / "pool" / "volumes").iterdir()] == [str(copy)]
