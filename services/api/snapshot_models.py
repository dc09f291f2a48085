"""Request and response bodies of the save, managed-save and snapshot endpoints."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, ConfigDict, Field

from protos.domain import NAME_PATTERN, PowerState
from services.api.models import DomainView
from services.api.saved_states import StateRecord
from services.api.visibility import HostMask

SNAPSHOT_NAME = Field(
    min_length=1,
    max_length=63,
    pattern=NAME_PATTERN,
    description="letters, digits, '.', '_', '-'; unique among the domain's snapshots",
)


class SaveRequest(BaseModel):
    """`pool`: keep the save in this storage pool's state area (a `shared` pool lets
    another host restore it); default: the domain's host's own state dir."""

    model_config = ConfigDict(extra="forbid")
    pool: str | None = Field(default=None, pattern=NAME_PATTERN, max_length=63)


class RestoreRequest(BaseModel):
    """`paused`: leave the restored domain paused (default: as it was saved)."""

    model_config = ConfigDict(extra="forbid")
    paused: bool = False


class SnapshotCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = SNAPSHOT_NAME
    description: str = Field(default="", max_length=1024)
    memory: bool = Field(
        default=True, description="save the running machine too (an active domain's)"
    )


class SnapshotRevert(BaseModel):
    """`start`: null -- as taken (running or paused when the snapshot has memory, else shut
    off); false -- leave it shut off; true -- start it (booting a disk-only snapshot)."""

    model_config = ConfigDict(extra="forbid")
    start: bool | None = None


class SavedView(BaseModel):
    """A save or managed save of a domain."""

    domain_id: uuid.UUID
    kind: str
    state_id: uuid.UUID
    host: str | None
    pool: str | None
    memory: bool
    power: PowerState
    bytes: int
    created_at: float
    domain: DomainView | None = None

    @classmethod
    def of(cls, record: StateRecord, mask: HostMask, domain: DomainView | None) -> SavedView:
        return cls(
            domain_id=record.domain_id,
            kind=record.kind,
            state_id=record.id,
            host=mask.name(record.host),
            pool=record.pool,
            memory=record.memory,
            power=record.power,
            bytes=record.bytes,
            created_at=record.created_at,
            domain=domain,
        )


class SnapshotView(BaseModel):
    """A domain snapshot and its place in the domain's tree."""

    name: str
    domain_id: uuid.UUID
    description: str
    parent: str | None
    children: list[str]
    current: bool
    memory: bool
    power: PowerState
    disks: list[str]
    bytes: int
    created_at: float


class SnapshotList(BaseModel):
    domain_id: uuid.UUID
    current: str | None
    snapshots: list[SnapshotView]


def snapshot_views(records: list[StateRecord]) -> list[SnapshotView]:
    """Views of a domain's snapshots (oldest first) with parent and children by name."""
    names = {r.id: r.name or "" for r in records}
    children: dict[uuid.UUID, list[str]] = {r.id: [] for r in records}
    for r in records:
        if r.parent in children:
            children[r.parent].append(names[r.id])
    return [
        SnapshotView(
            name=names[r.id],
            domain_id=r.domain_id,
            description=r.description,
            parent=None if r.parent is None else names.get(r.parent),
            children=children[r.id],
            current=r.current,
            memory=r.memory,
            power=r.power,
            disks=r.disks,
            bytes=r.bytes,
            created_at=r.created_at,
        )
        for r in records
    ]
