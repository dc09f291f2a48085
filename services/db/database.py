"""`Database`: one engine and the one way to run SQL on it, `transaction()`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.db.engine import READ_ONLY, create_engine


class DatabaseUnavailable(Exception):
    """The database cannot be reached or cannot take the work now (server down, connection
    lost, SQLite locked past its busy timeout, no pooled connection in time). The transaction
    was rolled back (or never began): nothing was written, and the same work may be retried
    later. Any other database error (a constraint, a bug in a statement) is not this."""


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` (an SQLAlchemy error) means the database is away rather than the work
    being wrong."""
    if isinstance(exc, sa.exc.OperationalError | sa.exc.TimeoutError):
        return True
    return isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated


class Database:
    """`sqlite:////abs/path.db`, `sqlite:///relative.db` or `postgresql://user@host/db`.

    Thread-safe: each transaction takes a pooled connection of its own."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        self.dialect: str = self.engine.dialect.name  # "sqlite" or "postgresql"

    @contextlib.contextmanager
    def transaction(self, *, read_only: bool = False) -> Iterator[Connection]:
        """A connection in a transaction: committed when the block ends, rolled back when it
        raises. On SQLite the write lock is taken at once (see services.db.engine), except
        for a `read_only` transaction: that one reads one snapshot (WAL) without the lock, so
        a long read (a page of 10,000 volumes) neither waits for a writer nor holds one up.
        Writing in a `read_only` transaction is a bug (SQLite may refuse it as busy).

        Raises DatabaseUnavailable (chained to the driver's error) when the database is
        away; every other exception propagates unchanged."""
        try:
            with self.engine.connect() as conn:
                if read_only:
                    conn.execution_options(**{READ_ONLY: True})
                with conn.begin():
                    yield conn
        except sa.exc.SQLAlchemyError as exc:
            if is_unavailable(exc):
                raise DatabaseUnavailable(f"database unavailable: {_reason(exc)}") from exc
            raise

    def close(self) -> None:
        """Close every pooled connection (connections in use are closed when returned)."""
        self.engine.dispose()


def _reason(exc: sa.exc.SQLAlchemyError) -> str:
    original = getattr(exc, "orig", None)
    text = str(original if original is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
