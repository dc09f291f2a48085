"""The storage agent's wire contract: file work on one host's pools (`storage.<host>`).

Commands name a pool by its configured name and a volume by its UUID; the agent derives the
file name from the UUID, so no caller ever names a path. Refusals are `ErrorReply`s:
`invalid` (bad size, unknown pool kind), `not_found` (pool or volume), `conflict` (volume
exists, is in use, or a shrink; `details.reason` says which), `no_space`.

Volume events carry `seq`, a per-volume counter that only grows (kept across delete and
re-create of the same id), routed `volume.<event>.<volume id>` like domain events.
"""

from __future__ import annotations

import uuid
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from protos.base import Message
from protos.commands import Command
from protos.domain import NAME_PATTERN
from protos.replies import Done

SECTOR = 512
MAX_VOLUME_BYTES = 64 << 40  # 64 TiB, the file layer's limit (compute_node.storage.volumes)

PoolKindName = Literal["dir", "shared"]


# ---- replies -----------------------------------------------------------------------------


class PoolCapabilities(BaseModel):
    """What the pool's file system can do (probed when the agent opens the pool)."""

    model_config = ConfigDict(frozen=True)

    reflink: bool
    punch_hole: bool


class PoolInfo(Message):
    """A pool as its host sees it; bytes: `capacity` of the file system, `allocation` of
    the pool's files, `available` for new data."""

    TYPE = "reply.pool_info"
    name: str
    kind: PoolKindName
    host: str
    capacity: int = Field(ge=0)
    allocation: int = Field(ge=0)
    available: int = Field(ge=0)
    capabilities: PoolCapabilities


class PoolList(Message):
    TYPE = "reply.pool_list"
    pools: list[PoolInfo]


class VolumeInfo(Message):
    """A volume: `size` its length in bytes, `allocation` the bytes of blocks it holds
    (sparse: below `size` until written), `seq` its last event's number (0: none yet)."""

    TYPE = "reply.volume_info"
    volume_id: uuid.UUID
    pool: str
    host: str
    size: int = Field(ge=0)
    allocation: int = Field(ge=0)
    seq: int = Field(ge=0)


class VolumeList(Message):
    TYPE = "reply.volume_list"
    volumes: list[VolumeInfo]


# ---- commands ----------------------------------------------------------------------------

Size = Field(gt=0, le=MAX_VOLUME_BYTES, multiple_of=SECTOR)


class PoolCommand(Command):
    pool: str = Field(pattern=NAME_PATTERN)


class VolumeCommand(PoolCommand):
    volume_id: uuid.UUID
    RESULT: ClassVar[type[Message]] = VolumeInfo


class GetPoolInfo(PoolCommand):
    TYPE = "cmd.storage.pool_info"
    RESULT = PoolInfo


class ListPools(Command):
    TYPE = "cmd.storage.pool_list"
    RESULT = PoolList


class AnnouncedCommand(VolumeCommand):
    """A command whose change is announced as a volume event, unless `announce` is false:
    the storage service, which owns the catalog, sets it false and publishes the one event
    stream itself (docs/storage.md, "whose events"), so no subscriber sees a change twice."""

    announce: bool = True


class CreateVolume(AnnouncedCommand):
    """A new sparse volume of `size` bytes (a multiple of 512) reading as zeros."""

    TYPE = "cmd.storage.volume_create"
    VERSION = "1.1"  # 1.1: announce
    size: int = Size


class DeleteVolume(AnnouncedCommand):
    """Remove a volume; refused (`conflict`, reason `busy`) while a guest has it open."""

    TYPE = "cmd.storage.volume_delete"
    VERSION = "1.1"  # 1.1: announce
    RESULT = Done


class ResizeVolume(AnnouncedCommand):
    """Grow a volume to `size` bytes; a smaller size is refused (`conflict`, `shrink`)."""

    TYPE = "cmd.storage.volume_resize"
    VERSION = "1.1"  # 1.1: announce
    size: int = Size


class CloneVolume(AnnouncedCommand):
    """A new volume `volume_id` with the content of `source_id` (same pool), independent of
    it afterwards: a reflink where the pool has them, else a sparse copy."""

    TYPE = "cmd.storage.volume_clone"
    VERSION = "1.1"  # 1.1: announce
    source_id: uuid.UUID


class WipeVolume(VolumeCommand):
    """Make every byte of the volume read as zero, size kept (refused while in use)."""

    TYPE = "cmd.storage.volume_wipe"


class GetVolumeInfo(VolumeCommand):
    TYPE = "cmd.storage.volume_info"


class ListVolumes(PoolCommand):
    TYPE = "cmd.storage.volume_list"
    RESULT = VolumeList


STORAGE_COMMANDS: tuple[type[Command], ...] = (
    GetPoolInfo,
    ListPools,
    CreateVolume,
    DeleteVolume,
    ResizeVolume,
    CloneVolume,
    WipeVolume,
    GetVolumeInfo,
    ListVolumes,
)


# ---- events ------------------------------------------------------------------------------


class VolumeEvent(Message):
    """Fields common to every volume event; `size` is the volume's size after it. `host` is
    the pool's host ("" for a `shared` pool); `project` and `name` are the catalog's (set
    when the storage service publishes; None from an agent used on its own)."""

    EVENT: ClassVar[str] = ""
    VERSION = "1.1"  # 1.1: project, name
    volume_id: uuid.UUID
    pool: str
    host: str
    seq: int = Field(ge=1)
    size: int = Field(ge=0)
    project: str | None = None
    name: str | None = None

    def routing_key(self) -> str:
        return f"volume.{self.EVENT}.{self.volume_id}"


class VolumeCreated(VolumeEvent):
    """A new volume: empty, or a clone of `source_id` (`method` reflink or copy)."""

    TYPE = "volume.created"
    EVENT = "created"
    source_id: uuid.UUID | None = None
    method: Literal["", "reflink", "copy"] = ""


class VolumeDeleted(VolumeEvent):
    TYPE = "volume.deleted"
    EVENT = "deleted"


class VolumeResized(VolumeEvent):
    TYPE = "volume.resized"
    EVENT = "resized"
    previous_size: int = Field(ge=0)


class VolumeAttached(VolumeEvent):
    """The catalog marked the volume attached to `domain_id` as disk `target`."""

    TYPE = "volume.attached"
    EVENT = "attached"
    domain_id: uuid.UUID
    target: str
    readonly: bool = False


class VolumeDetached(VolumeEvent):
    TYPE = "volume.detached"
    EVENT = "detached"
    domain_id: uuid.UUID
    target: str


class VolumeMoved(VolumeEvent):
    """A host-local volume changed hosts (a domain's cold migration moved it, or a live
    migration's block copy committed): `host` is where it is now, `from_host` where it was.
    Its id, size, attachment and name stay; `seq` goes on from the last event's."""

    TYPE = "volume.moved"
    EVENT = "moved"
    from_host: str


VOLUME_EVENTS: tuple[type[VolumeEvent], ...] = (
    VolumeCreated,
    VolumeDeleted,
    VolumeResized,
    VolumeAttached,
    VolumeDetached,
    VolumeMoved,
)
