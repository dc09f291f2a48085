"""The registry's event log: every domain event the compute nodes publish, in the order the
registry took them, each projected onto its domain as it is appended
(services.api.registry.projection); the API's event stream and history read it.

Volume events (`log_volume`, from the storage service) are logged under the volume's
project and keyed by the volume's id, with no power state; nothing is projected from them (the
storage catalog owns volumes).

Event-log ids only grow in commit order (appends are serialised: SQLite's write lock, an
advisory lock on PostgreSQL), so a reader resuming "after id N" never misses a row that
commits later with a smaller id.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from protos.domain import PowerState
from protos.events import DomainDefined, DomainEvent, DomainMigrationProgress, DomainStarted
from protos.migration import FINAL_PHASES
from protos.storage import VolumeEvent
from services.api.registry.domains import reap_pending, was_removed
from services.api.registry.projection import PROJECTION_OF, Outcome, project
from services.api.tables import EVENT_LOG_LOCK, events
from services.db import Database, advisory_xact_lock, upsert

Row = Sequence[Any]  # a result row: the selected columns in order
# Progress rows read back to find a migration's final one: a migration's own progress comes
# at most every MIGRATION_PROGRESS_S, and its final one is its last.
_PROGRESS_SCAN = 50


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


def _unrecorded(cur: Connection, domain_id: str, event: DomainEvent) -> Outcome:
    """An event of a domain with no record: logged only, unless it defines or starts a
    domain whose record was removed (deleted, or its tombstone settled before a create's
    retry placed it elsewhere): that host has a guest nobody asked for, reaped there. The
    reap is remembered with the event, so the orphan sweep runs it again if this replica
    does not live to, or the host does not answer (a redelivered event is a duplicate)."""
    if isinstance(event, DomainDefined | DomainStarted) and was_removed(cur, domain_id):
        reap_pending(cur, domain_id, event.host)
        return Outcome.REAP
    return Outcome.LOGGED


class EventLog:
    """The event log (one table, `events`); appending a domain event projects it."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def apply(
        self,
        message_id: str,
        routing_key: str,
        event: DomainEvent,
        ts: float | None = None,
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> Outcome:
        """Append `event` to the log and project it onto its domain (the rules are
        services.api.registry.projection's)."""
        domain_id = str(event.domain_id)
        now = time.time()
        with self.db.transaction() as cur:
            advisory_xact_lock(cur, EVENT_LOG_LOCK)
            row = cur.execute(PROJECTION_OF, {"b_id": domain_id}).first()
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
                return _unrecorded(cur, domain_id, event)
            return project(cur, event, row, now)

    def log_volume(
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

    def after(
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

    def last_id(self) -> int:
        with self.db.transaction() as cur:
            last = cur.execute(sa.select(sa.func.coalesce(sa.func.max(events.c.id), 0))).scalar()
        return int(last or 0)

    def last_host_besides(self, domain_id: uuid.UUID, host: str) -> str | None:
        """The host of the newest event logged for the domain from a host other than
        `host`: where it lived (or migrated from) last before it came to `host`."""
        query = (
            sa.select(events.c.host)
            .where(events.c.domain_id == str(domain_id), events.c.host != host)
            .order_by(events.c.id.desc())
            .limit(1)
        )
        with self.db.transaction() as cur:
            found = cur.execute(query).scalar()
        return None if found is None else str(found)

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
