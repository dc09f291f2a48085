"""Idempotency records: the reply a command got, kept by its message id.

A redelivered (or retried) command with an id already recorded is answered from here instead
of being executed again. The record is written before the delivery is acked, so a crash between
the two still finds it. A record, once written, is never replaced (until it expires): the
first answer is the answer.

Two copies of one command can also arrive together (a caller that lost its connection resends
while the first copy still runs): `InFlight` makes the second wait for the first and then take
its recorded answer, so a message id executes once.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol


class IdempotencyStore(Protocol):
    def get(self, message_id: str) -> bytes | None: ...

    def put(self, message_id: str, reply: bytes) -> None: ...


class MemoryIdempotencyStore:
    """Bounded LRU in memory: for processes whose commands need no memory across restarts."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def get(self, message_id: str) -> bytes | None:
        with self._lock:
            reply = self._items.get(message_id)
            if reply is not None:
                self._items.move_to_end(message_id)
            return reply

    def put(self, message_id: str, reply: bytes) -> None:
        with self._lock:
            self._items.setdefault(message_id, reply)  # the first answer stays
            self._items.move_to_end(message_id)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)


class SqliteIdempotencyStore:
    """Records in a SQLite file, kept for `ttl_s` (a day by default): survives restarts."""

    def __init__(self, path: Path, ttl_s: float = 86_400.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # the record must outlive a power loss
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS replies (id TEXT PRIMARY KEY, reply BLOB, ts REAL)"
        )
        self._ttl = ttl_s
        self._lock = threading.Lock()
        self._writes = 0

    def get(self, message_id: str) -> bytes | None:
        with self._lock:
            row = self._db.execute(
                "SELECT reply FROM replies WHERE id = ? AND ts > ?",
                (message_id, time.time() - self._ttl),
            ).fetchone()
        return None if row is None else bytes(row[0])

    def put(self, message_id: str, reply: bytes) -> None:
        with self._lock:
            now = time.time()
            # The first answer stays; only an expired record is replaced.
            self._db.execute(
                "INSERT INTO replies (id, reply, ts) VALUES (?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET reply = excluded.reply, ts = excluded.ts "
                "WHERE replies.ts <= ?",
                (message_id, reply, now, now - self._ttl),
            )
            self._writes += 1
            if self._writes % 1000 == 0:
                self._db.execute("DELETE FROM replies WHERE ts < ?", (time.time() - self._ttl,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class InFlight:
    """The message ids being handled in this process. `claim(id)` returns at once for the
    first copy of a command; a second copy waits there until the first is done and is told it
    waited, so it can answer from the first one's record."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, threading.Event] = {}

    @contextmanager
    def claim(self, message_id: str) -> Iterator[bool]:
        """Hold `message_id` for the block; yields True if another copy ran first."""
        waited = False
        while True:
            with self._lock:
                running = self._running.get(message_id)
                if running is None:
                    done = self._running[message_id] = threading.Event()
                    break
            waited = True
            running.wait()
        try:
            yield waited
        finally:
            with self._lock:
                del self._running[message_id]
            done.set()
