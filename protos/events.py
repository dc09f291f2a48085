"""Domain lifecycle events, with libvirt's event types and details.

Every domain event carries `seq`, a per-domain counter that only grows and travels with the
domain, so a subscriber can order a domain's events and notice a gap. Routing key:
`domain.<event>.<domain uuid>` (see protos.routing).
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import ClassVar

from pydantic import Field

from protos.base import Message
from protos.domain import PowerState


class DefinedDetail(StrEnum):
    ADDED = "added"
    UPDATED = "updated"
    MIGRATED = "migrated"  # a cold migration's target: the definition arrived from another host


class UndefinedDetail(StrEnum):
    REMOVED = "removed"


class StartedDetail(StrEnum):
    BOOTED = "booted"
    MIGRATED = "migrated"
    RESTORED = "restored"
    FROM_SNAPSHOT = "from_snapshot"


class SuspendedDetail(StrEnum):
    PAUSED = "paused"
    MIGRATED = "migrated"
    IOERROR = "ioerror"
    RESTORED = "restored"  # restored from a save, paused
    FROM_SNAPSHOT = "from_snapshot"  # reverted to a snapshot taken while paused


class ResumedDetail(StrEnum):
    UNPAUSED = "unpaused"
    MIGRATED = "migrated"


class StoppedDetail(StrEnum):
    SHUTDOWN = "shutdown"
    DESTROYED = "destroyed"
    CRASHED = "crashed"
    MIGRATED = "migrated"
    SAVED = "saved"
    FAILED = "failed"
    FROM_SNAPSHOT = "from_snapshot"  # a revert stopped the running machine (never the API's)


class ShutdownDetail(StrEnum):
    FINISHED = "finished"
    GUEST = "guest"
    HOST = "host"


class CrashedDetail(StrEnum):
    PANICKED = "panicked"


class DomainEvent(Message):
    """Fields common to every domain lifecycle event. `state` is the power state after it."""

    EVENT: ClassVar[str] = ""
    domain_id: uuid.UUID
    name: str
    host: str
    seq: int = Field(ge=1)
    state: PowerState
    reason: str = ""

    def routing_key(self) -> str:
        # A UUID and a class constant need no re-validation on this hot path.
        return f"domain.{self.EVENT}.{self.domain_id}"


class DomainDefined(DomainEvent):
    TYPE = "domain.defined"
    VERSION = "1.1"  # 1.1: detail migrated
    EVENT = "defined"
    detail: DefinedDetail


class DomainUndefined(DomainEvent):
    TYPE = "domain.undefined"
    EVENT = "undefined"
    detail: UndefinedDetail


class DomainStarted(DomainEvent):
    TYPE = "domain.started"
    VERSION = "1.1"  # 1.1: detail from_snapshot
    EVENT = "started"
    detail: StartedDetail


class DomainSuspended(DomainEvent):
    TYPE = "domain.suspended"
    VERSION = "1.1"  # 1.1: detail from_snapshot, restored
    EVENT = "suspended"
    detail: SuspendedDetail


class DomainResumed(DomainEvent):
    TYPE = "domain.resumed"
    EVENT = "resumed"
    detail: ResumedDetail


class DomainStopped(DomainEvent):
    TYPE = "domain.stopped"
    VERSION = "1.1"  # 1.1: detail from_snapshot
    EVENT = "stopped"
    detail: StoppedDetail


class DomainShutdown(DomainEvent):
    TYPE = "domain.shutdown"
    EVENT = "shutdown"
    detail: ShutdownDetail


class DomainCrashed(DomainEvent):
    TYPE = "domain.crashed"
    EVENT = "crashed"
    detail: CrashedDetail


class DomainRebooted(DomainEvent):
    """The guest was reset (by itself or the host) and restarted in place (libvirt's REBOOT
    event); `reason` says how: `i8042_reset`, `triple_fault`, `host`."""

    TYPE = "domain.rebooted"
    EVENT = "rebooted"


class DomainMigrationProgress(DomainEvent):
    """A migration's progress (protos.migration): bytes of memory sent so far and still
    dirty, at most every MIGRATION_PROGRESS_S, and a final one (`phase` done, failed or
    cancelled) with the pause the target measured. Published by the source; `seq` is that of
    the domain's last lifecycle event (this is none: the registry projects nothing from it but
    the end of the `migrating` task on the final one). A job over its source's limit of
    concurrent migrations is announced `queued` with its `queue_position`, then `preparing`
    when it leaves the queue. `target_claim_seq` (1.3): the target's claim count at which it
    took the domain's resources (MigrationJob.target_claim_seq), once it did."""

    TYPE = "domain.migration_progress"
    VERSION = "1.3"  # 1.1: phase, target and figures; 1.2: queue_position; 1.3: claim seq
    EVENT = "migration_progress"
    iteration: int = Field(ge=0)
    transferred_bytes: int = Field(ge=0)
    remaining_bytes: int = Field(ge=0)
    phase: str = "precopy"  # protos.migration.MigrationPhase
    target: str = ""
    live: bool = True
    dirty_rate: int = Field(default=0, ge=0)
    bandwidth: int = Field(default=0, ge=0)
    predicted_ms: float = Field(default=0.0, ge=0)
    throttle_pct: int = Field(default=0, ge=0, le=100)
    elapsed_ms: float = Field(default=0.0, ge=0)
    downtime_ms: float | None = None
    error: str | None = None
    queue_position: int | None = Field(default=None, ge=1)  # phase `queued`: 1 is next
    target_claim_seq: int | None = Field(default=None, ge=0)


DOMAIN_EVENTS: tuple[type[DomainEvent], ...] = (
    DomainDefined,
    DomainUndefined,
    DomainStarted,
    DomainSuspended,
    DomainResumed,
    DomainStopped,
    DomainShutdown,
    DomainCrashed,
    DomainRebooted,
    DomainMigrationProgress,
)
