"""Bodies of the migration endpoints (services.api.routes.migration): what a caller asks
(virsh migrate's options, migrate-setmaxdowntime, migrate-setspeed) and the job it sees
(virsh domjobinfo), with hosts named as the caller may see them."""

from __future__ import annotations

import uuid
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator
from pydantic.json_schema import WithJsonSchema

from protos.domain import NAME_PATTERN
from protos.events import DomainMigrationProgress
from protos.migration import (
    FINAL_PHASES,
    MAX_DOWNTIME_MS,
    MigrationJob,
    MigrationParams,
    MigrationPhase,
    TimeoutAction,
)
from services.api.visibility import HostMask

MAX_BANDWIDTH_MIBPS = 1 << 20


class MigrateRequest(BaseModel):
    """virsh migrate: `live` (true: the guest runs on while its memory streams; false: an
    offline migration of a shut-off domain; absent: live if the domain is active), `host`
    (admin only: the target, still checked by the scheduler's filters; absent: the
    scheduler picks), `max_downtime_ms` (the pause the pre-copy converges to),
    `bandwidth_mibps` (a cap on the stream, 0 for none), `timeout_s` with `timeout_action`
    (abort: the source runs on; pause: the rest copies with the guest paused),
    `auto_converge` (throttle the vCPUs when the dirty rate outruns the stream)."""

    model_config = ConfigDict(extra="forbid")
    live: StrictBool | None = None
    host: str | None = Field(default=None, min_length=1, max_length=63, pattern=NAME_PATTERN)
    max_downtime_ms: float = Field(default=300.0, gt=0, le=MAX_DOWNTIME_MS)
    bandwidth_mibps: int = Field(default=0, ge=0, le=MAX_BANDWIDTH_MIBPS)
    timeout_s: float | None = Field(default=None, gt=0, le=86_400)
    timeout_action: TimeoutAction | None = None
    auto_converge: StrictBool = True

    @model_validator(mode="after")
    def _timeout_action_needs_a_timeout(self) -> Self:
        if self.timeout_action is not None and self.timeout_s is None:
            raise ValueError("timeout_action needs timeout_s")
        return self

    def params(self, live: bool) -> MigrationParams:
        return MigrationParams(
            live=live,
            max_downtime_ms=self.max_downtime_ms,
            bandwidth_mibps=self.bandwidth_mibps,
            timeout_s=self.timeout_s,
            timeout_action=self.timeout_action or TimeoutAction.ABORT,
            auto_converge=self.auto_converge,
        )


class JobUpdate(BaseModel):
    """A running job's new budget or cap (migrate-setmaxdowntime, migrate-setspeed); at least
    one of them. The pre-copy uses them from its next round."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})
    # Absent or a number (an explicit null is refused below): the schema says so, not "or null".
    max_downtime_ms: Annotated[
        float | None,
        WithJsonSchema({"type": "number", "exclusiveMinimum": 0, "maximum": MAX_DOWNTIME_MS}),
    ] = Field(default=None, gt=0, le=MAX_DOWNTIME_MS)
    bandwidth_mibps: Annotated[
        int | None,
        WithJsonSchema({"type": "integer", "minimum": 0, "maximum": MAX_BANDWIDTH_MIBPS}),
    ] = Field(default=None, ge=0, le=MAX_BANDWIDTH_MIBPS)

    @field_validator("max_downtime_ms", "bandwidth_mibps", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:  # absent is fine; an explicit null is no number
            raise ValueError("a number, or leave it out")
        return value

    @model_validator(mode="after")
    def _something(self) -> Self:
        if self.max_downtime_ms is None and self.bandwidth_mibps is None:
            raise ValueError("name max_downtime_ms or bandwidth_mibps")
        return self


class JobView(BaseModel):
    """A domain's migration job (virsh domjobinfo). `running`: the job is under way on
    `source` (its figures are the source's now); otherwise it is the last one that ended,
    from the source or, once the domain left it, from the event log's final
    `domain.migration_progress` (`params` is then unknown). Figures are of the memory
    stream; `downtime_ms` is the pause the target measured (set once `done`), `paused_ms`
    the source's own measure; `error` says why a `failed` job failed. A job over its
    source's limit of concurrent migrations is `queued` (still `running`) with its
    `queue_position` (1: the next to run). `source` and `target` are host names for an admin
    and aliases for a member."""

    domain_id: uuid.UUID
    source: str
    target: str
    live: bool
    phase: MigrationPhase
    running: bool
    started_at: float
    elapsed_ms: float
    iteration: int = 0
    bytes_sent: int = 0
    remaining_bytes: int = 0
    memory_bytes: int = 0
    dirty_rate: int = 0
    bandwidth: int = 0
    predicted_ms: float = 0.0
    throttle_pct: int = 0
    downtime_ms: float | None = None
    paused_ms: float | None = None
    error: str | None = None
    params: MigrationParams | None = None
    queue_position: int | None = None

    @classmethod
    def of(cls, job: MigrationJob, mask: HostMask) -> JobView:
        return cls(
            **job.model_dump(exclude={"source", "target", "error"}),
            source=mask.name(job.source) or "",
            target=mask.name(job.target) or "",
            error=mask.text(job.error) if job.error else None,
            running=job.phase not in FINAL_PHASES,
        )

    @classmethod
    def of_event(cls, event: DomainMigrationProgress, ts: float, mask: HostMask) -> JobView:
        """The job a final progress event (logged at `ts`) reports."""
        return cls(
            domain_id=event.domain_id,
            source=mask.name(event.host) or "",
            target=mask.name(event.target) or "",
            live=event.live,
            phase=MigrationPhase(event.phase),
            running=False,
            started_at=ts - event.elapsed_ms / 1000.0,
            elapsed_ms=event.elapsed_ms,
            iteration=event.iteration,
            bytes_sent=event.transferred_bytes,
            remaining_bytes=event.remaining_bytes,
            dirty_rate=event.dirty_rate,
            bandwidth=event.bandwidth,
            predicted_ms=event.predicted_ms,
            throttle_pct=event.throttle_pct,
            downtime_ms=event.downtime_ms,
            error=mask.text(event.error) if event.error else None,
        )


class EvacuatedDomain(BaseModel):
    """One domain of an evacuated host: `job` when its migration started (`live` says how),
    else the refusal (`code`, `detail`) that kept it there."""

    domain_id: uuid.UUID
    name: str
    state: str
    live: bool | None = None
    job: JobView | None = None
    code: str | None = None
    detail: str | None = None


class Evacuation(BaseModel):
    """What `POST /v1/hosts/{name}/evacuate` started: every domain the registry places on
    `host`, in name order; `started` and `refused` count them."""

    host: str
    started: int
    refused: int
    domains: list[EvacuatedDomain]
