"""The catalog's event outbox: an event is a row written in the transaction that made the
change, so a change and its event are committed together or not at all; `OutboxPublisher`
publishes rows in order, confirmed by the broker, then deletes them.

Each replica publishes the rows it wrote as soon as it wrote them, and any row older than
`takeover_s` (its writer died before publishing). Two replicas may then both publish a row:
delivery is at least once, and a copy keeps its message id (subscribers deduplicate by it and
order an object's events by `seq`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pika
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from protos import routing
from protos.base import Message
from protos.codec import decode, envelope_for, pack, parse_body
from services.bus import Bus, Cause
from services.bus.bus import extra_routing_headers, properties_for
from services.db import Database, DatabaseUnavailable
from services.network.tables import outbox

log = structlog.get_logger("flotilla.network.outbox")
CONFIRM_TIMEOUT_S = 10.0
_BATCH = 200


def emit(conn: Connection, event: Message, *, source: str, cause: Cause | None) -> None:
    """Write `event` to the outbox in `conn`'s transaction, with `cause`'s ids."""
    routing_key: str = event.routing_key()  # type: ignore[attr-defined]
    envelope = envelope_for(
        event,
        source=source,
        correlation_id=None if cause is None else cause.correlation_id,
        causation_id=None if cause is None else cause.causation_id,
    )
    conn.execute(
        sa.insert(outbox).values(
            source=source,
            created_at=time.time(),
            routing_key=routing_key,
            envelope=pack(envelope),
        )
    )


def _properties(packed: bytes) -> pika.BasicProperties:
    envelope = decode(packed)
    return properties_for(envelope, headers=extra_routing_headers(parse_body(envelope)))


@dataclass(frozen=True, slots=True)
class _Row:
    id: int
    routing_key: str
    envelope: bytes


class OutboxPublisher:
    """A thread publishing the outbox; `wake()` after a commit that wrote events."""

    def __init__(self, db: Database, bus: Bus, source: str, *, takeover_s: float = 5.0) -> None:
        self._db = db
        self._bus = bus
        self._source = source
        self._takeover_s = takeover_s
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="network-outbox", daemon=True)
        self.published = 0

    def start(self) -> OutboxPublisher:
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wakeup.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wakeup.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            self._wakeup.clear()
            try:
                done = self.publish_once()
            except DatabaseUnavailable as exc:
                log.warning("outbox unreadable; will retry", error=str(exc))
                done = False
            if done:
                backoff = 0.1
                self._wakeup.wait(1.0)
            else:
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def publish_once(self) -> bool:
        """Publish what is due; True when all of it was confirmed (and deleted)."""
        while True:
            rows = self._due()
            if not rows:
                return True
            if not self._bus.link.wait_connected(1.0):
                return False
            futures = [
                self._bus.link.publish(
                    routing.EVENTS_EXCHANGE,
                    row.routing_key,
                    row.envelope,
                    _properties(row.envelope),
                )
                for row in rows
            ]
            confirmed: list[int] = []
            for row, future in zip(rows, futures, strict=True):
                try:
                    future.result(CONFIRM_TIMEOUT_S)
                except Exception as exc:
                    log.warning("event not confirmed; will resend", error=str(exc))
                    break
                confirmed.append(row.id)
            if confirmed:
                with self._db.transaction() as conn:
                    conn.execute(sa.delete(outbox).where(outbox.c.id.in_(confirmed)))
                self.published += len(confirmed)
            if len(confirmed) < len(rows):
                return False

    def _due(self) -> list[_Row]:
        cutoff = time.time() - self._takeover_s
        with self._db.transaction() as conn:
            result = conn.execute(
                sa.select(outbox.c.id, outbox.c.routing_key, outbox.c.envelope)
                .where(sa.or_(outbox.c.source == self._source, outbox.c.created_at < cutoff))
                .order_by(outbox.c.id)
                .limit(_BATCH)
            )
            return [_Row(r.id, r.routing_key, bytes(r.envelope)) for r in result]
