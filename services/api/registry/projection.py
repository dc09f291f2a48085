"""Domain events projected onto the domain records (services.api.registry.domains): the
compute nodes own the truth about what runs, the records follow their events.

Projection rules (`project`, under services.api.registry.events.EventLog.apply), each in one
transaction with the event's append to the log:
- an event already logged (same message id) is a duplicate and changes nothing;
- an event from a host other than the domain's host is logged, not projected (a refused
  placement attempt's leftovers);
- an event whose `seq` is not above the stored seq is stale: logged, not projected;
- `domain.undefined` while the task is `deleting` removes the record;
- a domain not yet placed (no host) is placed by a `domain.started` while it is `scheduling`
  or its create's outcome is unknown: the create's own API replica may be gone;
- a domain deleted before it was placed (task `deleting`, no host: a tombstone) is not placed
  by its events: a `domain.started` from a host records that host (task still `deleting`)
  and, like a `domain.defined`, answers `REAP`: the caller destroys and undefines it there.

Migration (protos.migration) adds, and changes nothing else:
- an event from another host is projected when it is `domain.started` or `domain.defined`
  with detail `migrated` and a seq above the stored one: the domain's host switches to it
  (the target took over; a `migrating` task ends);
- the source's `domain.stopped/migrated` advances seq but leaves the power state as it was
  (the guest runs on, on the target);
- a final `domain.migration_progress` (phase failed or cancelled) from the domain's host or
  naming it as target ends a `migrating` task, and `done` once the host switched to its
  target (nothing else of it is projected); so does `domain.resumed/migrated` (the source
  runs on after a failed attempt).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from protos.domain import Fault, PowerState, TaskState
from protos.events import (
    DefinedDetail,
    DomainDefined,
    DomainEvent,
    DomainMigrationProgress,
    DomainResumed,
    DomainStarted,
    DomainStopped,
    DomainUndefined,
    ResumedDetail,
    StartedDetail,
    StoppedDetail,
)
from protos.migration import FINAL_PHASES, MigrationPhase
from services.api.registry.domains import UPDATE_DOMAIN, delete_domain
from services.api.tables import domains

# Faults of a create whose outcome the API does not know: the scheduler may have placed the
# domain, so a `domain.started` from a host (or the log, for an orphan) still places it.
OUTCOME_UNKNOWN_FAULTS = frozenset(
    {"schedule_timeout", "broker_unavailable", "schedule_interrupted"}
)
# Faults a `domain.started` from the domain's host ends: it did start.
START_FAULTS = frozenset({"start_failed"})


class Outcome(StrEnum):
    """What `EventLog.apply` (services.api.registry.events) did with an event."""

    APPLIED = "applied"  # logged and projected
    REMOVED = "removed"  # logged; the record was removed (undefined during delete)
    LOGGED = "logged"  # logged only: no record, another host's, or placement pending
    STALE = "stale"  # logged; seq not above the stored one, so not projected
    # logged; a domain deleted before it was placed (or whose record is gone: removed after
    # its delete) is on this event's host
    REAP = "reap"
    DUPLICATE = "duplicate"  # seen before: nothing changed


# What a domain's projection starts from: its project, host, task, seq, fault, power.
PROJECTION_OF = sa.select(
    domains.c.project,
    domains.c.host,
    domains.c.task,
    domains.c.seq,
    domains.c.fault,
    domains.c.power,
).where(domains.c.id == sa.bindparam("b_id"))


def project(  # noqa: PLR0911  (one return per outcome reads best)
    cur: Connection, event: DomainEvent, row: Sequence[Any], now: float
) -> Outcome:
    """Project `event`, logged already, onto its domain, whose `PROJECTION_OF` is `row`
    (see the module's rules)."""
    domain_id = str(event.domain_id)
    _, host, task, seq, fault = row[0], row[1], TaskState(row[2]), int(row[3]), row[4]
    row_power = row[5]
    if host is None and task is TaskState.DELETING:
        return _tombstone_event(cur, domain_id, event, now)
    if host is None:
        # Not placed yet. A start on a host places it, as soon as it is seen: while
        # the create waits for the scheduler (`scheduling`; the API replica waiting
        # may have died, and a live one records the same host from the answer) or
        # after that answer was lost (timeout). Other events (a refused attempt's
        # defined/undefined) leave it to the scheduler's answer.
        unknown = task is TaskState.SCHEDULING or (
            fault is not None and Fault.model_validate_json(fault).code in OUTCOME_UNKNOWN_FAULTS
        )
        if not (unknown and isinstance(event, DomainStarted)):
            return Outcome.LOGGED
        host, seq, task = event.host, 0, TaskState.NONE
    if isinstance(event, DomainMigrationProgress):
        return _migration_ended(cur, domain_id, event, host=host, task=task, now=now)
    if event.host != host:
        if not (_arrived_by_migration(event) and event.seq > seq):
            return Outcome.LOGGED
        host = event.host  # the target took the domain over
    if event.seq <= seq:
        return Outcome.STALE
    task = _task_after(event, task, fault, host=host, stored_host=row[1])
    if isinstance(event, DomainUndefined):
        if task is TaskState.DELETING:
            delete_domain(cur, domain_id)
            return Outcome.REMOVED
        lost = Fault(code="undefined_on_host", message=event.reason or "undefined", host=host)
        cur.execute(
            UPDATE_DOMAIN,
            {
                "b_id": domain_id,
                "power": PowerState.NOSTATE.value,
                "seq": event.seq,
                "task": TaskState.ERROR.value,
                "fault": lost.model_dump_json(),
                "updated_at": now,
            },
        )
        return Outcome.APPLIED
    # The source's machine ended because the target runs the guest: not shut off.
    moved_away = isinstance(event, DomainStopped) and event.detail is StoppedDetail.MIGRATED
    cur.execute(
        UPDATE_DOMAIN,
        {
            "b_id": domain_id,
            "host": host,
            "power": row_power if moved_away else event.state.value,
            "seq": event.seq,
            "task": task.value,
            "fault": fault if task is TaskState.ERROR else None,
            "updated_at": now,
        },
    )
    return Outcome.APPLIED


def _tombstone_event(cur: Connection, domain_id: str, event: DomainEvent, now: float) -> Outcome:
    """A domain deleted before it was placed appeared on a host: it is removed again from
    wherever it appears. A start is where the scheduler put it (that becomes its host, so
    the record goes with its `domain.undefined` there); a definition may be a refused
    attempt's, which the scheduler removes itself before trying elsewhere."""
    if isinstance(event, DomainStarted):
        cur.execute(
            UPDATE_DOMAIN,
            {
                "b_id": domain_id,
                "host": event.host,
                "power": event.state.value,
                "seq": event.seq,
                "updated_at": now,
            },
        )
        return Outcome.REAP
    return Outcome.REAP if isinstance(event, DomainDefined) else Outcome.LOGGED


def _migration_ended(
    cur: Connection,
    domain_id: str,
    event: DomainMigrationProgress,
    *,
    host: str,
    task: TaskState,
    now: float,
) -> Outcome:
    """Progress is logged; a final one about this domain's host (its source, or the
    target it switched to) ends the `migrating` task, except a `done` that arrives
    before the target's arrival event: that event switches the host and ends the task,
    so the domain never shows no task under way on the host it left (a migrate asked in
    that window would go to the source, which no longer has it)."""
    if event.phase == MigrationPhase.DONE:
        final = host == event.target
    else:
        final = event.phase in FINAL_PHASES and host in (event.host, event.target)
    if not (final and task is TaskState.MIGRATING):
        return Outcome.LOGGED
    cur.execute(
        domains.update()
        .where(domains.c.id == domain_id, domains.c.task == TaskState.MIGRATING.value)
        .values(task=TaskState.NONE.value, updated_at=now)
    )
    return Outcome.APPLIED


def _task_after(
    event: DomainEvent, task: TaskState, fault: str | None, *, host: str, stored_host: str
) -> TaskState:
    """The task once `event` from the domain's host is applied: a migration's end ends
    `migrating`; a start ends an `error` whose fault was about starting (a start that failed,
    or whose answer never came, for the sweep finishing an interrupted create, happened after
    all); anything else leaves the task as it is."""
    if task is TaskState.MIGRATING and _ends_migration(event, host, stored_host):
        return TaskState.NONE
    started = task is TaskState.ERROR and isinstance(event, DomainStarted)
    if started and fault is not None and Fault.model_validate_json(fault).code in START_FAULTS:
        return TaskState.NONE
    return task


def _arrived_by_migration(event: DomainEvent) -> bool:
    """The target's first event of a migration: the guest runs there (live) or its
    definition arrived there (cold)."""
    if isinstance(event, DomainStarted):
        return event.detail is StartedDetail.MIGRATED
    return isinstance(event, DomainDefined) and event.detail is DefinedDetail.MIGRATED


def _ends_migration(event: DomainEvent, host: str, stored_host: str) -> bool:
    """Whether `event` (already projected onto `host`) ends a `migrating` task: the switch to
    the target, or the source resuming after a failed attempt."""
    if host != stored_host:
        return True
    return isinstance(event, DomainResumed) and event.detail is ResumedDetail.MIGRATED
