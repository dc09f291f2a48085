"""A thin database layer: the same SQL on SQLite (WAL) and PostgreSQL (psycopg 3).

SQL is written with `?` placeholders and portable types; `Database` rewrites placeholders for
PostgreSQL and keeps one connection per thread (FastAPI runs blocking endpoints on a thread
pool, the event consumer has its own thread). `transaction()` is the only way to run SQL: it
commits on success, rolls back on an exception, and on SQLite takes the write lock at once
(`BEGIN IMMEDIATE`) so read-check-write sequences (quotas) are serialised.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import psycopg

Row = tuple[Any, ...]


class Cursor(Protocol):
    """What a transaction offers: portable `?`-style statements."""

    dialect: str

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; return the number of rows it changed."""
        ...

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None: ...

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...


class _SqliteCursor:
    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, tuple(params)).rowcount

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        row: Row | None = self._conn.execute(sql, tuple(params)).fetchone()
        return row

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return list(self._conn.execute(sql, tuple(params)).fetchall())


class _PgCursor:
    dialect = "postgresql"

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    @staticmethod
    def _sql(sql: str) -> str:
        # Our statements never contain a literal `?` or `%`, so this rewrite is exact.
        return sql.replace("?", "%s")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        cur = self._conn.execute(self._sql(sql), tuple(params))
        return cur.rowcount

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        row: Row | None = self._conn.execute(self._sql(sql), tuple(params)).fetchone()
        return row

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return list(self._conn.execute(self._sql(sql), tuple(params)).fetchall())


class Database:
    """`sqlite:////abs/path.db`, `sqlite:///relative.db` or `postgresql://user@host/db`."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite:///"):
            self.dialect = "sqlite"
            # SQLAlchemy's convention: sqlite:///rel.db is relative, sqlite:////abs.db absolute.
            self.path = Path(url.removeprefix("sqlite:///"))
        elif url.startswith(("postgresql://", "postgres://")):
            self.dialect = "postgresql"
        else:
            raise ValueError(f"unsupported database URL {url!r} (sqlite:/// or postgresql://)")
        self._local = threading.local()
        self._all: list[Any] = []
        self._all_lock = threading.Lock()

    def _connect(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self.dialect == "sqlite":
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
        else:
            conn = psycopg.connect(self.url, autocommit=True)
        self._local.conn = conn
        with self._all_lock:
            self._all.append(conn)
        return conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Cursor]:
        conn = self._connect()
        if self.dialect == "sqlite":
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteCursor(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        else:
            try:
                with conn.transaction():
                    yield _PgCursor(conn)
            except psycopg.OperationalError:
                # A broken connection is not reused by this thread's next transaction.
                self._local.conn = None
                raise

    def close(self) -> None:
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()
        self._local = threading.local()
