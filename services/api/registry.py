"""The registry: the control plane's database of domains, their event log, hosts and tokens.

It holds the desired spec of every domain (and its project) plus a projection of the compute
nodes' events: power state, task, host, last `seq`, fault. The compute nodes own the truth about
what runs; the registry is what the API answers from.

Projection rules (`apply_event`), each in one transaction with the event's append to the log:
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

Volume events (`log_volume_event`, from the storage service) are logged under the volume's
project and keyed by the volume's id, with no power state; nothing is projected from them (the
storage catalog owns volumes).

Event-log ids only grow in commit order (appends are serialised: SQLite's write lock, an
advisory lock on PostgreSQL), so a reader resuming "after id N" never misses a row that
commits later with a smaller id.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from protos.domain import DomainSpec, Fault, PowerState, TaskState
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
from protos.host import HostHeartbeat, HostInventory, Resources
from protos.migration import FINAL_PHASES, MigrationPhase
from protos.replies import DomainInfo
from protos.storage import VolumeEvent
from services.api.config import Quota, Role
from services.api.saved_states import SavedStates
from services.api.tables import (
    EVENT_LOG_LOCK,
    REGISTRY,
    domains,
    events,
    hosts,
    quotas,
    secrets_table,
    tokens,
)
from services.db import Database, advisory_xact_lock, upgrade, upsert

Row = Sequence[Any]  # a result row: the selected columns in order

# Faults of a create whose outcome the API does not know: the scheduler may have placed the
# domain, so a `domain.started` from a host (or the log, for an orphan) still places it.
OUTCOME_UNKNOWN_FAULTS = frozenset(
    {"schedule_timeout", "broker_unavailable", "schedule_interrupted"}
)
# Faults a `domain.started` from the domain's host ends: it did start.
START_FAULTS = frozenset({"start_failed"})
# Progress rows read back to find a migration's final one: a migration's own progress comes
# at most every MIGRATION_PROGRESS_S, and its final one is its last.
_PROGRESS_SCAN = 50


class Outcome(StrEnum):
    """What `apply_event` did with an event."""

    APPLIED = "applied"  # logged and projected
    REMOVED = "removed"  # logged; the record was removed (undefined during delete)
    LOGGED = "logged"  # logged only: no record, another host's, or placement pending
    STALE = "stale"  # logged; seq not above the stored one, so not projected
    REAP = "reap"  # logged; a domain deleted before it was placed is on this event's host
    DUPLICATE = "duplicate"  # seen before: nothing changed


class QuotaExceeded(Exception):
    def __init__(self, resource: str, limit: int, used: int, requested: int) -> None:
        super().__init__(f"quota for {resource} exceeded: {used} used + {requested} > {limit}")
        self.resource = resource
        self.limit = limit
        self.used = used
        self.requested = requested


class NameInUse(Exception):
    """A domain of that name (or uuid) exists. Names are unique across projects because a
    compute node refuses two domains of one name, and any two may land on the same host."""


@dataclass(frozen=True, slots=True)
class DomainRecord:
    id: uuid.UUID
    project: str
    name: str
    spec: DomainSpec
    host: str | None
    power: PowerState
    task: TaskState
    seq: int
    fault: Fault | None
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class EventRecord:
    """A row of the event log. A volume event's `domain_id` is its volume's id (the entity
    its routing key names) and its `state` None."""

    id: int
    message_id: str
    project: str | None
    domain_id: uuid.UUID
    host: str
    seq: int
    type: str
    routing_key: str
    state: PowerState | None
    ts: float
    body: dict[str, Any]
    correlation_id: str | None = None  # the request (or first command) behind it
    causation_id: str | None = None  # the command that caused it


@dataclass(frozen=True, slots=True)
class HostRecord:
    name: str
    enabled: bool
    kvm: str
    version: str
    interval_s: float
    last_seen: float
    inventory: HostInventory
    usage: Resources
    domains_by_state: dict[str, int]


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: str
    project: str
    role: Role
    description: str
    created_at: float


_DOMAIN_COLUMNS = (
    domains.c.id,
    domains.c.project,
    domains.c.name,
    domains.c.spec,
    domains.c.host,
    domains.c.power,
    domains.c.task,
    domains.c.seq,
    domains.c.fault,
    domains.c.created_at,
    domains.c.updated_at,
)
_EVENT_COLUMNS = (
    events.c.id,
    events.c.message_id,
    events.c.project,
    events.c.domain_id,
    events.c.host,
    events.c.seq,
    events.c.type,
    events.c.routing_key,
    events.c.state,
    events.c.ts,
    events.c.body,
    events.c.correlation_id,
    events.c.causation_id,
)

# Built once: the hot paths (event projection, reads by id) only bind their parameters.
_DOMAIN_BY_ID = sa.select(*_DOMAIN_COLUMNS).where(domains.c.id == sa.bindparam("b_id"))
_PROJECTION_OF = sa.select(
    domains.c.project,
    domains.c.host,
    domains.c.task,
    domains.c.seq,
    domains.c.fault,
    domains.c.power,
).where(domains.c.id == sa.bindparam("b_id"))
_TAKEN = sa.select(sa.literal(1)).where(
    (domains.c.id == sa.bindparam("b_id")) | (domains.c.name == sa.bindparam("b_name"))
)
_USAGE = sa.select(
    sa.func.count(),
    sa.func.coalesce(sa.func.sum(domains.c.vcpus), 0),
    sa.func.coalesce(sa.func.sum(domains.c.memory_mib), 0),
).where(domains.c.project == sa.bindparam("b_project"))
_UPDATE_DOMAIN = domains.update().where(domains.c.id == sa.bindparam("b_id"))
_DELETE_DOMAIN = domains.delete().where(domains.c.id == sa.bindparam("b_id"))

_TOKEN_COLUMNS = (
    tokens.c.id,
    tokens.c.project,
    tokens.c.role,
    tokens.c.description,
    tokens.c.created_at,
)


def _domain(row: Row) -> DomainRecord:
    return DomainRecord(
        id=uuid.UUID(row[0]),
        project=row[1],
        name=row[2],
        spec=DomainSpec.model_validate_json(row[3]),
        host=row[4],
        power=PowerState(row[5]),
        task=TaskState(row[6]),
        seq=int(row[7]),
        fault=Fault.model_validate_json(row[8]) if row[8] else None,
        created_at=float(row[9]),
        updated_at=float(row[10]),
    )


def _event(row: Row) -> EventRecord:
    return EventRecord(
        id=int(row[0]),
        message_id=row[1],
        project=row[2],
        domain_id=uuid.UUID(row[3]),
        host=row[4],
        seq=int(row[5]),
        type=row[6],
        routing_key=row[7],
        state=PowerState(row[8]) if row[8] else None,
        ts=float(row[9]),
        body=json.loads(row[10]),
        correlation_id=row[11],
        causation_id=row[12],
    )


def _unsettled_create(cutoff: float) -> sa.ColumnElement[bool]:
    """A create not placed whose outcome no request will record, unchanged since `cutoff`:
    still `scheduling` (its API replica stopped), or in `error` after the scheduler's answer
    was lost (fault `schedule_timeout`: it did not answer in time; `broker_unavailable`: the
    broker went away mid-call, so the request may have reached it; the fault is stored as
    compact JSON)."""
    return sa.and_(
        domains.c.host.is_(None),
        domains.c.updated_at < cutoff,
        sa.or_(
            domains.c.task == TaskState.SCHEDULING.value,
            sa.and_(
                domains.c.task == TaskState.ERROR.value,
                sa.or_(
                    domains.c.fault.like('%"code":"schedule_timeout"%'),
                    domains.c.fault.like('%"code":"broker_unavailable"%'),
                ),
            ),
        ),
    )


def _append(cur: Connection, values: dict[str, Any]) -> bool:
    """Append a row to the event log (the caller holds EVENT_LOG_LOCK); False when its
    message id is logged already."""
    inserted = cur.execute(
        upsert(cur, events)
        .on_conflict_do_nothing(index_elements=[events.c.message_id])
        .returning(events.c.id),
        values,
    ).first()
    return inserted is not None


class Registry:
    def __init__(self, db: Database) -> None:
        self.db = db
        # Saves, managed saves and snapshot trees (services.api.saved_states).
        self.states = SavedStates(db)

    @classmethod
    def open(cls, url: str) -> Registry:
        registry = cls(Database(url))
        registry.migrate()
        return registry

    def close(self) -> None:
        self.db.close()

    def migrate(self) -> None:
        """Bring the schema to the newest revision (idempotent; safe from several replicas;
        a database made before migrations existed is adopted, see services.db)."""
        upgrade(self.db, REGISTRY)

    # ---- domains ---------------------------------------------------------------------------

    def create_domain(self, spec: DomainSpec, project: str, quota: Quota) -> DomainRecord:
        """Insert a domain in task `scheduling` if the project's quota allows it.

        Raises QuotaExceeded (nothing stored) or NameInUse."""
        now = time.time()
        with self.db.transaction() as cur:
            # Serialise creates per project so two of them cannot both pass the check.
            advisory_xact_lock(cur, project)
            used = self._usage(cur, project)
            wanted = {"domains": 1, "vcpus": spec.vcpus, "memory_mib": spec.memory_mib}
            for resource, requested in wanted.items():
                limit = getattr(quota, resource)
                if limit is not None and used[resource] + requested > limit:
                    raise QuotaExceeded(resource, limit, used[resource], requested)
            taken = cur.execute(_TAKEN, {"b_id": str(spec.uuid), "b_name": spec.name}).first()
            if taken:
                raise NameInUse(f"a domain named {spec.name!r} exists (or its uuid is taken)")
            cur.execute(
                domains.insert(),
                {
                    "id": str(spec.uuid),
                    "project": project,
                    "name": spec.name,
                    "spec": spec.model_dump_json(),
                    "host": None,
                    "power": PowerState.NOSTATE.value,
                    "task": TaskState.SCHEDULING.value,
                    "seq": 0,
                    "fault": None,
                    "created_at": now,
                    "updated_at": now,
                    "vcpus": spec.vcpus,
                    "memory_mib": spec.memory_mib,
                },
            )
        record = self.get_domain(spec.uuid)
        assert record is not None
        return record

    @staticmethod
    def _usage(cur: Connection, project: str) -> dict[str, int]:
        row = cur.execute(_USAGE, {"b_project": project}).one()
        return {"domains": int(row[0]), "vcpus": int(row[1]), "memory_mib": int(row[2])}

    def usage(self, project: str) -> dict[str, int]:
        """What the project's domains hold (every record counts, whatever its state)."""
        with self.db.transaction() as cur:
            return self._usage(cur, project)

    def get_domain(self, domain_id: uuid.UUID) -> DomainRecord | None:
        with self.db.transaction() as cur:
            row = cur.execute(_DOMAIN_BY_ID, {"b_id": str(domain_id)}).first()
        return _domain(row) if row else None

    def list_domains(
        self,
        *,
        project: str | None = None,
        power: PowerState | None = None,
        task: TaskState | None = None,
        host: str | None = None,
        name: str | None = None,
    ) -> list[DomainRecord]:
        """Domains matching every filter given, by project and name."""
        query = sa.select(*_DOMAIN_COLUMNS).order_by(domains.c.project, domains.c.name)
        for column, value in (
            (domains.c.project, project),
            (domains.c.power, power.value if power else None),
            (domains.c.task, task.value if task else None),
            (domains.c.host, host),
            (domains.c.name, name),
        ):
            if value is not None:
                query = query.where(column == value)
        with self.db.transaction() as cur:
            rows = cur.execute(query).all()
        return [_domain(r) for r in rows]

    def set_task(
        self,
        domain_id: uuid.UUID,
        task: TaskState,
        fault: Fault | None = None,
        *,
        unless: TaskState | None = None,
    ) -> DomainRecord | None:
        """Set the task (and the fault, which only `error` keeps); not if the task is
        `unless` (a create's failure does not undo a DELETE that came meanwhile)."""
        query = domains.update().where(domains.c.id == str(domain_id))
        if unless is not None:
            query = query.where(domains.c.task != unless.value)
        with self.db.transaction() as cur:
            cur.execute(
                query.values(
                    task=task.value,
                    fault=fault.model_dump_json() if fault and task is TaskState.ERROR else None,
                    updated_at=time.time(),
                )
            )
        return self.get_domain(domain_id)

    def swap_task(self, domain_id: uuid.UUID, expected: TaskState, task: TaskState) -> bool:
        """Set the task to `task` only if it is `expected` (two requests racing to start a
        migration: one wins); whether it was."""
        with self.db.transaction() as cur:
            changed = cur.execute(
                domains.update()
                .where(domains.c.id == str(domain_id), domains.c.task == expected.value)
                .values(task=task.value, fault=None, updated_at=time.time())
            ).rowcount
        return bool(changed)

    def last_migration(self, domain_id: uuid.UUID) -> EventRecord | None:
        """The newest final `domain.migration_progress` logged for the domain, if any."""
        query = (
            sa.select(*_EVENT_COLUMNS)
            .where(
                events.c.domain_id == str(domain_id),
                events.c.type == DomainMigrationProgress.TYPE,
            )
            .order_by(events.c.id.desc())
            .limit(_PROGRESS_SCAN)
        )
        with self.db.transaction() as cur:
            rows = cur.execute(query).all()
        for row in rows:
            record = _event(row)
            if record.body.get("phase") in FINAL_PHASES:
                return record
        return None

    def set_spec(self, domain_id: uuid.UUID, spec: DomainSpec) -> DomainRecord | None:
        """Replace the domain's spec (a disk attached or detached while it is stopped)."""
        with self.db.transaction() as cur:
            cur.execute(
                domains.update()
                .where(domains.c.id == str(domain_id))
                .values(spec=spec.model_dump_json(), updated_at=time.time())
            )
        return self.get_domain(domain_id)

    def set_placement(
        self, domain_id: uuid.UUID, host: str, info: DomainInfo
    ) -> DomainRecord | None:
        """Record where the scheduler put the domain; None if the record is gone. A domain
        deleted while it was being scheduled (a tombstone) keeps its task `deleting` and gets
        the host, for the caller to destroy and undefine it there (its `domain.undefined`
        then removes the record). Events from `host` that arrived before the placement and
        are newer than `info` win."""
        with self.db.transaction() as cur:
            advisory_xact_lock(cur, EVENT_LOG_LOCK)  # not beside a tombstone's own start
            current = cur.execute(
                sa.select(domains.c.task, domains.c.host).where(domains.c.id == str(domain_id))
            ).first()
            if current is None:
                return None
            if current[0] == TaskState.DELETING.value and current[1] is not None:
                return self.get_domain(domain_id)  # its start placed it already
            task = TaskState(current[0])
            task = task if task is TaskState.DELETING else TaskState.NONE
            power, seq = info.state.value, info.seq
            newest = cur.execute(
                sa.select(events.c.seq, events.c.state)
                .where(events.c.domain_id == str(domain_id), events.c.host == host)
                .order_by(events.c.seq.desc())
                .limit(1)
            ).first()
            if newest and int(newest[0]) > seq:
                seq, power = int(newest[0]), newest[1]
            changed = cur.execute(
                domains.update()
                .where(domains.c.id == str(domain_id))
                .values(
                    host=host,
                    power=power,
                    seq=seq,
                    task=task.value,
                    fault=None,
                    updated_at=time.time(),
                )
            ).rowcount
        return self.get_domain(domain_id) if changed else None

    def tombstone(self, domain_id: uuid.UUID) -> DomainRecord | None:
        """Delete a domain not placed yet: task `deleting` with no host, until the host it
        appears on (if any) undefined it or the orphan sweep settles it (`settle_deletes`).
        It keeps counting against the quota meanwhile. Returns the record as it is now (None
        if gone): a tombstone, or placed meanwhile (then delete it on its host as usual)."""
        with self.db.transaction() as cur:
            advisory_xact_lock(cur, EVENT_LOG_LOCK)
            cur.execute(
                domains.update()
                .where(
                    domains.c.id == str(domain_id),
                    domains.c.host.is_(None),
                    # Once: a DELETE again must not put off the sweep that settles it.
                    domains.c.task != TaskState.DELETING.value,
                )
                .values(task=TaskState.DELETING.value, fault=None, updated_at=time.time())
            )
        return self.get_domain(domain_id)

    def remove_deleted(self, domain_id: uuid.UUID, host: str) -> bool:
        """Remove the record of a domain being deleted from `host` (the host has it no more)."""
        with self.db.transaction() as cur:
            return (
                cur.execute(
                    domains.delete().where(
                        domains.c.id == str(domain_id),
                        domains.c.task == TaskState.DELETING.value,
                        domains.c.host == host,
                    )
                ).rowcount
                > 0
            )

    def settle_deletes(
        self, older_than_s: float
    ) -> tuple[list[tuple[DomainRecord, str]], list[DomainRecord]]:
        """Deletes not done `older_than_s` after their record last changed: the domain's
        create is over by then, and so is any DELETE's own call to the host.

        A tombstone (no host) is put on the host of its newest logged event, unless that
        event is `domain.undefined` or there is none: then the record is removed. A record
        `deleting` on a host is touched (the next try comes `older_than_s` later). Returns
        (record, host) pairs to destroy and undefine the domain on, and the records removed."""
        cutoff = time.time() - older_than_s
        with self.db.transaction() as cur:
            ids = [
                str(i)
                for i in cur.execute(
                    sa.select(domains.c.id).where(
                        domains.c.task == TaskState.DELETING.value,
                        domains.c.updated_at < cutoff,
                    )
                ).scalars()
            ]
        to_reap: list[tuple[DomainRecord, str]] = []
        removed: list[DomainRecord] = []
        for domain_id in ids:
            record = self.get_domain(uuid.UUID(domain_id))
            with self.db.transaction() as cur:
                advisory_xact_lock(cur, EVENT_LOG_LOCK)
                due, host = self._settle_delete(cur, domain_id, cutoff)
            if record is None or not due:
                continue
            if host is None:
                removed.append(record)
            else:
                to_reap.append((record, host))
        return to_reap, removed

    @staticmethod
    def _settle_delete(cur: Connection, domain_id: str, cutoff: float) -> tuple[bool, str | None]:
        """(whether it was still due, the host to clean up or None if the record went)."""
        row = cur.execute(
            sa.select(domains.c.host).where(
                domains.c.id == domain_id,
                domains.c.task == TaskState.DELETING.value,
                domains.c.updated_at < cutoff,
            )
        ).first()
        if row is None:
            return False, None  # done meanwhile
        now = time.time()
        if row[0] is not None:
            cur.execute(_UPDATE_DOMAIN, {"b_id": domain_id, "updated_at": now})
            return True, str(row[0])
        newest = cur.execute(
            sa.select(events.c.host, events.c.type)
            .where(events.c.domain_id == domain_id)
            .order_by(events.c.id.desc())
            .limit(1)
        ).first()
        if newest is None or newest[1] == DomainUndefined.TYPE:
            cur.execute(_DELETE_DOMAIN, {"b_id": domain_id})
            return True, None
        host = str(newest[0])
        seq, state = cur.execute(
            sa.select(events.c.seq, events.c.state)
            .where(events.c.domain_id == domain_id, events.c.host == host)
            .order_by(events.c.seq.desc())
            .limit(1)
        ).one()
        cur.execute(
            domains.update()
            .where(domains.c.id == domain_id)
            .values(host=host, power=state, seq=int(seq), updated_at=now)
        )
        return True, host

    def observe_info(self, info: DomainInfo) -> DomainRecord | None:
        """Project a compute node's answer (`DomainInfo`) like an event: only if it comes from
        the domain's host and its seq is above the stored one."""
        with self.db.transaction() as cur:
            cur.execute(
                domains.update()
                .where(
                    domains.c.id == str(info.domain_id),
                    domains.c.host == info.host,
                    domains.c.seq < info.seq,
                )
                .values(power=info.state.value, seq=info.seq, updated_at=time.time())
            )
        return self.get_domain(info.domain_id)

    def resolve_orphans(self, older_than_s: float) -> list[DomainRecord]:
        """Settle creates whose outcome no request will record, once their record has not
        changed for `older_than_s` (longer than any live create waits): those left in task
        `scheduling` by a create whose API replica stopped (was killed, lost its host)
        before it recorded the scheduler's answer, and those in `error` with fault
        `schedule_timeout` (the scheduler did not answer in time: a 504) or
        `broker_unavailable` (a 503 after the request may have gone out) and no host.

        Each is placed where the event log says it went (the host of its newest logged
        event, unless that event is `domain.undefined`: a refused attempt), with that host's
        newest seq and state, task none and no fault; a domain with no such event goes to
        (or stays in) task `error` with fault `schedule_interrupted`, and a later
        `domain.started` from a host still places it. Returns the records as settled."""
        cutoff = time.time() - older_than_s
        with self.db.transaction() as cur:
            candidates = cur.execute(
                sa.select(domains.c.id).where(_unsettled_create(cutoff))
            ).scalars()
            ids = [str(i) for i in candidates]
        settled = []
        for domain_id in ids:
            with self.db.transaction() as cur:
                # The same lock as apply_event: no event of this domain is projected meanwhile.
                advisory_xact_lock(cur, EVENT_LOG_LOCK)
                if self._settle_orphan(cur, domain_id, cutoff):
                    settled.append(domain_id)
        return [r for r in (self.get_domain(uuid.UUID(i)) for i in settled) if r is not None]

    @staticmethod
    def _settle_orphan(cur: Connection, domain_id: str, cutoff: float) -> bool:
        still = cur.execute(
            sa.select(domains.c.task).where(domains.c.id == domain_id, _unsettled_create(cutoff))
        ).first()
        if still is None:  # settled by its request or by another replica meanwhile
            return False
        timed_out = still[0] == TaskState.ERROR.value
        newest = cur.execute(
            sa.select(events.c.host, events.c.type)
            .where(events.c.domain_id == domain_id)
            .order_by(events.c.id.desc())
            .limit(1)
        ).first()
        now = time.time()
        if newest is None or newest[1] == DomainUndefined.TYPE:
            cause = (
                "the scheduler's answer to the create was lost (it did not answer in time, "
                "or the broker went away)"
                if timed_out
                else "the API replica handling the create stopped before the scheduler answered"
            )
            fault = Fault(
                code="schedule_interrupted",
                message=f"{cause}; nothing was placed as far as the event log shows",
            )
            values: dict[str, Any] = {
                "task": TaskState.ERROR.value,
                "fault": fault.model_dump_json(),
                "updated_at": now,
            }
        else:
            host = newest[0]
            seq, state = cur.execute(
                sa.select(events.c.seq, events.c.state)
                .where(events.c.domain_id == domain_id, events.c.host == host)
                .order_by(events.c.seq.desc())
                .limit(1)
            ).one()
            values = {
                "host": host,
                "power": state,
                "seq": int(seq),
                "task": TaskState.NONE.value,
                "fault": None,
                "updated_at": now,
            }
        cur.execute(domains.update().where(domains.c.id == domain_id).values(**values))
        return True

    def remove_domain(self, domain_id: uuid.UUID) -> bool:
        with self.db.transaction() as cur:
            return cur.execute(domains.delete().where(domains.c.id == str(domain_id))).rowcount > 0

    # ---- events ----------------------------------------------------------------------------

    def apply_event(  # noqa: PLR0911  (one return per outcome reads best)
        self,
        message_id: str,
        routing_key: str,
        event: DomainEvent,
        ts: float | None = None,
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> Outcome:
        """Append `event` to the log and project it onto its domain (see the module's rules)."""
        domain_id = str(event.domain_id)
        now = time.time()
        with self.db.transaction() as cur:
            advisory_xact_lock(cur, EVENT_LOG_LOCK)
            row = cur.execute(_PROJECTION_OF, {"b_id": domain_id}).first()
            appended = _append(
                cur,
                {
                    "message_id": message_id,
                    "project": row[0] if row else None,
                    "domain_id": domain_id,
                    "host": event.host,
                    "seq": event.seq,
                    "type": event.TYPE,
                    "routing_key": routing_key,
                    "state": event.state.value,
                    "ts": ts if ts is not None else now,
                    "body": event.model_dump_json(),
                    "correlation_id": correlation_id,
                    "causation_id": causation_id,
                },
            )
            if not appended:
                return Outcome.DUPLICATE
            if row is None:
                return Outcome.LOGGED
            _, host, task, seq, fault = row[0], row[1], TaskState(row[2]), int(row[3]), row[4]
            row_power = row[5]
            if host is None and task is TaskState.DELETING:
                return self._tombstone_event(cur, domain_id, event, now)
            if host is None:
                # Not placed yet. A start on a host places it, as soon as it is seen: while
                # the create waits for the scheduler (`scheduling`; the API replica waiting
                # may have died, and a live one records the same host from the answer) or
                # after that answer was lost (timeout). Other events (a refused attempt's
                # defined/undefined) leave it to the scheduler's answer.
                unknown = task is TaskState.SCHEDULING or (
                    fault is not None
                    and Fault.model_validate_json(fault).code in OUTCOME_UNKNOWN_FAULTS
                )
                if not (unknown and isinstance(event, DomainStarted)):
                    return Outcome.LOGGED
                host, seq, task = event.host, 0, TaskState.NONE
            if isinstance(event, DomainMigrationProgress):
                return self._migration_ended(cur, domain_id, event, host=host, task=task, now=now)
            if event.host != host:
                if not (_arrived_by_migration(event) and event.seq > seq):
                    return Outcome.LOGGED
                host = event.host  # the target took the domain over
            if event.seq <= seq:
                return Outcome.STALE
            task = _task_after(event, task, fault, host=host, stored_host=row[1])
            if isinstance(event, DomainUndefined):
                if task is TaskState.DELETING:
                    cur.execute(_DELETE_DOMAIN, {"b_id": domain_id})
                    return Outcome.REMOVED
                lost = Fault(
                    code="undefined_on_host", message=event.reason or "undefined", host=host
                )
                cur.execute(
                    _UPDATE_DOMAIN,
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
                _UPDATE_DOMAIN,
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

    @staticmethod
    def _tombstone_event(
        cur: Connection, domain_id: str, event: DomainEvent, now: float
    ) -> Outcome:
        """A domain deleted before it was placed appeared on a host: it is removed again from
        wherever it appears. A start is where the scheduler put it (that becomes its host, so
        the record goes with its `domain.undefined` there); a definition may be a refused
        attempt's, which the scheduler removes itself before trying elsewhere."""
        if isinstance(event, DomainStarted):
            cur.execute(
                _UPDATE_DOMAIN,
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

    @staticmethod
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

    def log_volume_event(
        self,
        message_id: str,
        routing_key: str,
        event: VolumeEvent,
        ts: float | None = None,
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> Outcome:
        """Append a volume event to the log under its project (LOGGED, or DUPLICATE for a
        message id logged already); nothing is projected."""
        with self.db.transaction() as cur:
            advisory_xact_lock(cur, EVENT_LOG_LOCK)
            appended = _append(
                cur,
                {
                    "message_id": message_id,
                    "project": event.project,
                    "domain_id": str(event.volume_id),
                    "host": event.host,
                    "seq": event.seq,
                    "type": event.TYPE,
                    "routing_key": routing_key,
                    "state": "",
                    "ts": ts if ts is not None else time.time(),
                    "body": event.model_dump_json(),
                    "correlation_id": correlation_id,
                    "causation_id": causation_id,
                },
            )
        return Outcome.LOGGED if appended else Outcome.DUPLICATE

    def events_after(
        self,
        after_id: int = 0,
        *,
        project: str | None = None,
        domain_id: uuid.UUID | None = None,
        since_seq: int | None = None,
        limit: int = 500,
    ) -> list[EventRecord]:
        """Log rows with id above `after_id`, oldest first; `project` None means every
        project (and domains the registry does not know)."""
        query = sa.select(*_EVENT_COLUMNS).where(events.c.id > after_id)
        if project is not None:
            query = query.where(events.c.project == project)
        if domain_id is not None:
            query = query.where(events.c.domain_id == str(domain_id))
            if since_seq is not None:
                query = query.where(events.c.seq > since_seq)
        with self.db.transaction() as cur:
            rows = cur.execute(query.order_by(events.c.id).limit(limit)).all()
        return [_event(r) for r in rows]

    def last_event_id(self) -> int:
        with self.db.transaction() as cur:
            last = cur.execute(sa.select(sa.func.coalesce(sa.func.max(events.c.id), 0))).scalar()
        return int(last or 0)

    # ---- hosts -----------------------------------------------------------------------------

    def record_heartbeat(self, beat: HostHeartbeat, seen_at: float | None = None) -> None:
        """Store the host's latest heartbeat (an older one never replaces a newer one)."""
        self.record_heartbeats([(beat, time.time() if seen_at is None else seen_at)])

    def record_heartbeats(self, beats: Sequence[tuple[HostHeartbeat, float]]) -> None:
        """Store each (heartbeat, seen at) as `record_heartbeat` does, all in one statement
        and transaction (services.api.heartbeats coalesces a replica's beats into such
        writes); of several beats of one host, the newest."""
        newest: dict[str, tuple[HostHeartbeat, float]] = {}
        for beat, seen in beats:
            held = newest.get(beat.host)
            if held is None or held[1] <= seen:
                newest[beat.host] = (beat, seen)
        if not newest:
            return
        rows = [
            {
                "name": beat.host,
                "enabled": 1 if beat.enabled else 0,
                "enabled_generation": beat.enabled_generation,
                "kvm": beat.inventory.kvm.value,
                "version": beat.version,
                "interval_s": beat.interval_s,
                "last_seen": seen,
                "inventory": beat.inventory.model_dump_json(),
                "usage": beat.usage.model_dump_json(),
                "domains_by_state": json.dumps(
                    {k.value: v for k, v in beat.domains_by_state.items()}
                ),
            }
            for beat, seen in newest.values()
        ]
        with self.db.transaction() as cur:
            insert = upsert(cur, hosts)
            # A beat sent before the host took the last switch the API wrote down (an older
            # generation) still says how loaded the host is, not whether it is enabled.
            newer = insert.excluded.enabled_generation >= hosts.c.enabled_generation
            switched = {
                hosts.c.enabled.name: sa.case(
                    (newer, insert.excluded.enabled), else_=hosts.c.enabled
                ),
                hosts.c.enabled_generation.name: sa.case(
                    (newer, insert.excluded.enabled_generation),
                    else_=hosts.c.enabled_generation,
                ),
            }
            cur.execute(
                insert.on_conflict_do_update(
                    index_elements=[hosts.c.name],
                    set_={
                        column.name: switched.get(column.name, insert.excluded[column.name])
                        for column in hosts.c
                        if column is not hosts.c.name
                    },
                    where=hosts.c.last_seen <= insert.excluded.last_seen,
                ),
                rows,
            )

    def next_enabled_generation(self, name: str) -> int:
        """A SetHostEnabled generation newer than any `name` took: the microseconds since the
        epoch, so switches from several API replicas order by when they were asked, and one
        past the stored one should a clock lag."""
        with self.db.transaction() as cur:
            stored = cur.execute(
                sa.select(hosts.c.enabled_generation).where(hosts.c.name == name)
            ).scalar()
        return max(int(stored or 0) + 1, time.time_ns() // 1000)

    def set_host_enabled(self, name: str, enabled: bool, generation: int) -> None:
        """Write down the switch the host took with `generation`, unless a newer one was."""
        with self.db.transaction() as cur:
            cur.execute(
                hosts.update()
                .where(hosts.c.name == name, hosts.c.enabled_generation <= generation)
                .values(enabled=1 if enabled else 0, enabled_generation=generation)
            )

    def host_names(self) -> list[str]:
        """The names of every host that has sent a heartbeat."""
        with self.db.transaction() as cur:
            return [str(name) for name in cur.execute(sa.select(hosts.c.name)).scalars()]

    def hosts(self, name: str | None = None) -> list[HostRecord]:
        query = sa.select(
            hosts.c.name,
            hosts.c.enabled,
            hosts.c.kvm,
            hosts.c.version,
            hosts.c.interval_s,
            hosts.c.last_seen,
            hosts.c.inventory,
            hosts.c.usage,
            hosts.c.domains_by_state,
        )
        if name is not None:
            query = query.where(hosts.c.name == name)
        with self.db.transaction() as cur:
            rows = cur.execute(query.order_by(hosts.c.name)).all()
        return [
            HostRecord(
                name=r[0],
                enabled=bool(r[1]),
                kvm=r[2],
                version=r[3],
                interval_s=float(r[4]),
                last_seen=float(r[5]),
                inventory=HostInventory.model_validate_json(r[6]),
                usage=Resources.model_validate_json(r[7]),
                domains_by_state=json.loads(r[8]),
            )
            for r in rows
        ]

    # ---- tokens and quotas -----------------------------------------------------------------

    def add_token(
        self, token_sha256: str, project: str, role: Role, description: str
    ) -> TokenRecord:
        record = TokenRecord(uuid.uuid4().hex, project, role, description, time.time())
        with self.db.transaction() as cur:
            cur.execute(
                tokens.insert().values(
                    id=record.id,
                    token_sha256=token_sha256,
                    project=project,
                    role=role.value,
                    description=description,
                    created_at=record.created_at,
                )
            )
        return record

    def find_token(self, token_sha256: str) -> TokenRecord | None:
        with self.db.transaction() as cur:
            row = cur.execute(
                sa.select(*_TOKEN_COLUMNS).where(tokens.c.token_sha256 == token_sha256)
            ).first()
        return TokenRecord(row[0], row[1], Role(row[2]), row[3], float(row[4])) if row else None

    def list_tokens(self) -> list[TokenRecord]:
        with self.db.transaction() as cur:
            rows = cur.execute(sa.select(*_TOKEN_COLUMNS).order_by(tokens.c.created_at)).all()
        return [TokenRecord(r[0], r[1], Role(r[2]), r[3], float(r[4])) for r in rows]

    def delete_token(self, token_id: str) -> bool:
        with self.db.transaction() as cur:
            return cur.execute(tokens.delete().where(tokens.c.id == token_id)).rowcount > 0

    def set_quota(self, project: str, quota: Quota) -> None:
        with self.db.transaction() as cur:
            insert = upsert(cur, quotas).values(
                project=project,
                domains=quota.domains,
                vcpus=quota.vcpus,
                memory_mib=quota.memory_mib,
                snapshot_bytes=quota.snapshot_bytes,
                images=quota.images,
                image_gib=quota.image_gib,
            )
            cur.execute(
                insert.on_conflict_do_update(
                    index_elements=[quotas.c.project],
                    set_={
                        "domains": insert.excluded.domains,
                        "vcpus": insert.excluded.vcpus,
                        "memory_mib": insert.excluded.memory_mib,
                        "snapshot_bytes": insert.excluded.snapshot_bytes,
                        "images": insert.excluded.images,
                        "image_gib": insert.excluded.image_gib,
                    },
                )
            )

    def secret(self, name: str) -> str:
        """A random 256-bit key by `name`: made on first use, the same for every replica and
        across restarts."""
        with self.db.transaction() as cur:
            cur.execute(
                upsert(cur, secrets_table)
                .values(name=name, value=secrets.token_hex(32))
                .on_conflict_do_nothing(index_elements=[secrets_table.c.name])
            )
            value = cur.execute(
                sa.select(secrets_table.c.value).where(secrets_table.c.name == name)
            ).scalar_one()
        return str(value)

    def get_quota(self, project: str) -> Quota | None:
        """The quota an admin set through the API, if any (it overrides the config file)."""
        with self.db.transaction() as cur:
            row = cur.execute(
                sa.select(
                    quotas.c.domains,
                    quotas.c.vcpus,
                    quotas.c.memory_mib,
                    quotas.c.snapshot_bytes,
                    quotas.c.images,
                    quotas.c.image_gib,
                ).where(quotas.c.project == project)
            ).first()
        if not row:
            return None
        return Quota(
            domains=row[0],
            vcpus=row[1],
            memory_mib=row[2],
            snapshot_bytes=row[3],
            images=row[4],
            image_gib=row[5],
        )


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
