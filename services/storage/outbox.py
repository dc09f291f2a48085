"""Publishes the catalog's outbox: each event in order, confirmed by the broker before its
row is deleted. While the broker is away rows wait and go out when it returns.

Several replicas share one PostgreSQL catalog: the publisher takes an advisory lock for its
batch (select, publish, confirm, delete in one transaction), so one replica at a time sends
and events leave in the order they were written; the others find the lock taken and wait
for their next turn. SQLite serves one replica, which needs no such lock.
"""

from __future__ import annotations

import threading
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from protos import routing
from protos.codec import decode
from services.bus import Bus
from services.bus.bus import properties_for
from services.db import Database
from services.storage.tables import outbox

log = structlog.get_logger("flotilla.storage.outbox")
BATCH = 200
CONFIRM_TIMEOUT_S = 30.0
OUTBOX_LOCK = "flotilla-storage-outbox"


class OutboxPublisher:
    """One thread: publish what is in the outbox when woken (`notify()`, after a commit in
    this process) or every `poll_s` (rows another replica wrote)."""

    def __init__(self, db: Database, bus: Bus, poll_s: float = 1.0) -> None:
        self._db = db
        self._bus = bus
        self._poll_s = poll_s
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="storage-outbox", daemon=True)
        self.published = 0

    def start(self) -> OutboxPublisher:
        self._thread.start()
        return self

    def notify(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._poll_s)
            self._wake.clear()
            try:
                while self.publish_batch() == BATCH and not self._stopping.is_set():
                    pass
            except Exception as exc:  # the broker or the database is away: retry later
                log.warning("outbox not published yet", error=str(exc))
                self._stopping.wait(1.0)

    def publish_batch(self) -> int:
        """Publish up to BATCH rows, wait for their confirms and delete them; the count."""
        if self._db.dialect == "postgresql":
            with self._db.transaction() as conn:
                lock = sa.func.pg_try_advisory_xact_lock(sa.func.hashtext(OUTBOX_LOCK))
                if not conn.execute(sa.select(lock)).scalar():
                    return 0  # another replica is publishing
                rows = _oldest(conn)
                self._publish(rows)
                _delete(conn, rows)
                return len(rows)
        # One replica on SQLite: the rows stay ours while they are published, outside a
        # transaction (which would hold the write lock for the confirms' wait).
        with self._db.transaction() as conn:
            rows = _oldest(conn)
        self._publish(rows)
        with self._db.transaction() as conn:
            _delete(conn, rows)
        return len(rows)

    def _publish(self, rows: list[sa.Row[Any, Any, Any]]) -> None:
        futures = [
            self._bus.link.publish(
                routing.EVENTS_EXCHANGE,
                row.routing_key,
                bytes(row.body),
                properties_for(decode(bytes(row.body)), persistent=True),
                mandatory=False,
            )
            for row in rows
        ]
        for future in futures:
            future.result(CONFIRM_TIMEOUT_S)
        self.published += len(rows)


def _oldest(conn: Connection) -> list[sa.Row[Any, Any, Any]]:
    query = sa.select(outbox.c.id, outbox.c.routing_key, outbox.c.body).order_by(outbox.c.id)
    return list(conn.execute(query.limit(BATCH)).all())


def _delete(conn: Connection, rows: list[sa.Row[Any, Any, Any]]) -> None:
    # By id, not `id <= last`: on PostgreSQL a lower id may commit after the rows were read.
    if rows:
        conn.execute(sa.delete(outbox).where(outbox.c.id.in_([row.id for row in rows])))
