"""Settling what no request finished: creates whose outcome no request will record (their
API replica stopped, or the scheduler's answer was lost) and deletes whose calls to the host
were cut short. The orphan sweep (services.api.orphans) calls these on every replica; each
domain is settled in a transaction of its own under the event log's lock, so no event of it
is projected meanwhile.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from protos.domain import Fault, TaskState
from protos.events import DomainUndefined
from services.api.registry.domains import UPDATE_DOMAIN, DomainRecord, Domains, delete_domain
from services.api.tables import EVENT_LOG_LOCK, domains, events
from services.db import Database, advisory_xact_lock


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


class Settling:
    """The sweeps' settling of unfinished creates and deletes (`resolve_orphans`,
    `settle_deletes`)."""

    def __init__(self, db: Database, records: Domains) -> None:
        self.db = db
        self.records = records

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
        return [r for r in (self.records.get(uuid.UUID(i)) for i in settled) if r is not None]

    @staticmethod
    def _settle_orphan(cur: Connection, domain_id: str, cutoff: float) -> bool:
        still = cur.execute(
            sa.select(domains.c.task).where(domains.c.id == domain_id, _unsettled_create(cutoff))
        ).first()
        if still is None:  # settled by its request or by another replica meanwhile
            return False
        timed_out = still[0] == TaskState.ERROR.value
        host = _logged_host(cur, domain_id)
        now = time.time()
        if host is None:
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
            seq, state = _newest_from(cur, domain_id, host)
            values = {
                "host": host,
                "power": state,
                "seq": seq,
                "task": TaskState.NONE.value,
                "fault": None,
                "updated_at": now,
            }
        cur.execute(domains.update().where(domains.c.id == domain_id).values(**values))
        return True

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
            record = self.records.get(uuid.UUID(domain_id))
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
            cur.execute(UPDATE_DOMAIN, {"b_id": domain_id, "updated_at": now})
            return True, str(row[0])
        host = _logged_host(cur, domain_id)
        if host is None:
            delete_domain(cur, domain_id)
            return True, None
        seq, state = _newest_from(cur, domain_id, host)
        cur.execute(
            domains.update()
            .where(domains.c.id == domain_id)
            .values(host=host, power=state, seq=seq, updated_at=now)
        )
        return True, host


def _logged_host(cur: Connection, domain_id: str) -> str | None:
    """The host of the domain's newest logged event; None when there is none or it is
    `domain.undefined` (a refused attempt's, or the domain is gone from there)."""
    newest = cur.execute(
        sa.select(events.c.host, events.c.type)
        .where(events.c.domain_id == domain_id)
        .order_by(events.c.id.desc())
        .limit(1)
    ).first()
    if newest is None or newest[1] == DomainUndefined.TYPE:
        return None
    return str(newest[0])


def _newest_from(cur: Connection, domain_id: str, host: str) -> tuple[int, str]:
    """The seq and power state of the domain's newest event from `host` (one is logged)."""
    seq, state = cur.execute(
        sa.select(events.c.seq, events.c.state)
        .where(events.c.domain_id == domain_id, events.c.host == host)
        .order_by(events.c.seq.desc())
        .limit(1)
    ).one()
    return int(seq), str(state)
