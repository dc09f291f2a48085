"""Command replies kept in the catalog's database, so a command executes once whichever
replica gets it, and its reply is committed with its changes.

`SqlIdempotencyStore` is the runner's store (services.bus.idempotency's protocol): a
redelivered command is answered from here. A handler that changes the catalog also records
its reply *in its own transaction* (`claim` at the start, `finish` at the end): a copy of the
command running at once on another replica waits on the claimed row, finds it taken, and
answers from the first one's record (`Recorded`) instead of executing again.
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.db import Database, upsert
from services.network.tables import replies

_PENDING = b""  # a claimed row whose transaction has not committed (never seen committed)


class Recorded(Exception):
    """Another copy of this command already executed: `reply` is its packed reply."""

    def __init__(self, reply: bytes) -> None:
        super().__init__("command already executed")
        self.reply = reply


def claim(conn: Connection, message_id: str) -> None:
    """Take `message_id` for this transaction; raise Recorded if it has been executed."""
    inserted = conn.execute(
        upsert(conn, replies)
        .values(message_id=message_id, reply=_PENDING, ts=time.time())
        .on_conflict_do_nothing(index_elements=[replies.c.message_id])
        .returning(replies.c.message_id)
    ).first()
    if inserted is None:
        reply = conn.execute(
            sa.select(replies.c.reply).where(replies.c.message_id == message_id)
        ).scalar()
        raise Recorded(bytes(reply or b""))


def finish(conn: Connection, message_id: str, reply: bytes) -> None:
    conn.execute(sa.update(replies).where(replies.c.message_id == message_id).values(reply=reply))


class SqlIdempotencyStore:
    """Replies kept `ttl_s` (a day by default) in the catalog's database."""

    def __init__(self, db: Database, ttl_s: float = 86_400.0) -> None:
        self._db = db
        self._ttl = ttl_s
        self._writes = 0

    def get(self, message_id: str) -> bytes | None:
        with self._db.transaction() as conn:
            reply = conn.execute(
                sa.select(replies.c.reply).where(
                    replies.c.message_id == message_id, replies.c.ts > time.time() - self._ttl
                )
            ).scalar()
        return bytes(reply) if reply else None

    def put(self, message_id: str, reply: bytes) -> None:
        with self._db.transaction() as conn:
            conn.execute(
                upsert(conn, replies)
                .values(message_id=message_id, reply=reply, ts=time.time())
                .on_conflict_do_nothing(index_elements=[replies.c.message_id])
            )
            self._writes += 1
            if self._writes % 1000 == 0:
                conn.execute(sa.delete(replies).where(replies.c.ts < time.time() - self._ttl))
