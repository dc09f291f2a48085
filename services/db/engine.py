"""Engines from database URLs: SQLite (WAL, busy timeout, foreign keys) or PostgreSQL (psycopg 3).

`sqlite:////abs/path.db` is absolute and `sqlite:///rel.db` relative (SQLAlchemy's
convention); `postgresql://` and `postgres://` mean the `postgresql+psycopg` dialect.

Every SQLite transaction starts with `BEGIN IMMEDIATE`: it takes the write lock at once, so a
read-check-write sequence (a quota check, a migration) is serialised with every other writer
instead of failing at its first write. pysqlite's own transaction handling is switched off
for that (SQLAlchemy's documented recipe), which also makes DDL transactional.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import ConnectionPoolEntry

# One connection per worker thread at most: FastAPI's thread pool has 40 threads.
_POOL = {"pool_size": 5, "max_overflow": 35, "pool_timeout": 30}
_SQLITE_BUSY_TIMEOUT_S = 30
READ_ONLY = "flotilla_read_only"  # the execution option of a read-only transaction
_PG_CONNECT_TIMEOUT_S = 10


def database_url(url: str) -> URL:
    """Parse and check `url`; PostgreSQL URLs get the psycopg 3 driver.

    Raises ValueError for anything but a SQLite file or a PostgreSQL database."""
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError:
        raise ValueError(
            f"unsupported database URL {url!r} (sqlite:/// or postgresql://)"
        ) from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgresql", "postgres") and driver in ("", "psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and driver in ("", "pysqlite"):
        if parsed.database in (None, "", ":memory:"):
            raise ValueError(f"a SQLite URL needs a file path: {url!r} (sqlite:////abs/path.db)")
        return parsed.set(drivername="sqlite+pysqlite")
    raise ValueError(f"unsupported database URL {url!r} (sqlite:/// or postgresql://)")


def create_engine(url: str) -> Engine:
    """An engine for `url` (see `database_url`); a SQLite file's directory is created."""
    parsed = database_url(url)
    if parsed.get_backend_name() == "postgresql":
        return sa.create_engine(
            parsed,
            pool_pre_ping=True,  # a restarted server's dead connections are not handed out
            connect_args={"connect_timeout": _PG_CONNECT_TIMEOUT_S},
            **_POOL,
        )
    assert parsed.database is not None
    Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        parsed,
        connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
        **_POOL,
    )
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    dbapi_connection.isolation_level = None  # transactions are ours (`_sqlite_begin`)
    cursor = dbapi_connection.cursor()
    try:
        _wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _wal(cursor: sqlite3.Cursor) -> None:
    """Put the database in WAL mode (kept in the file: later connections find it set).
    Switching takes the database's exclusive lock, and SQLite answers "database is locked"
    at once rather than wait on its busy timeout while another connection holds a lock (the
    replicas of a fresh database starting together): tried again here for as long."""
    deadline = time.monotonic() + _SQLITE_BUSY_TIMEOUT_S
    delay = 0.005
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _sqlite_begin(connection: Connection) -> None:
    # Straight to the driver: this runs for every transaction. A read-only one (Database.
    # transaction(read_only=True)) begins deferred: it takes no lock.
    driver = connection.connection.driver_connection
    assert driver is not None
    read_only = connection.get_execution_options().get(READ_ONLY, False)
    driver.execute("BEGIN" if read_only else "BEGIN IMMEDIATE")
