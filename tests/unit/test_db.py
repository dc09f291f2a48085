"""The SQL layer (services/db): URLs, SQLite's settings, transactions, and how a database
that is away is told apart from a statement that is wrong."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from protos.codec import Envelope
from protos.domain import PowerState
from protos.events import DomainStarted, StartedDetail
from services.api.metrics import ApiMetrics
from services.api.projection import EventProjector
from services.api.registry import Registry
from services.bus import Context
from services.bus.service import Retry
from services.db import Database, DatabaseUnavailable, database_url

scratch = sa.Table("scratch", sa.MetaData(), sa.Column("k", sa.Text, primary_key=True))


def test_urls_name_sqlite_files_or_postgresql() -> None:
    assert str(database_url("postgresql://u@h/db")) == "postgresql+psycopg://u@h/db"
    assert str(database_url("postgres://u@h:5433/db")) == "postgresql+psycopg://u@h:5433/db"
    assert database_url("sqlite:////var/lib/r.db").database == "/var/lib/r.db"
    assert database_url("sqlite:///rel.db").database == "rel.db"
    for bad in ("mysql://u@h/db", "sqlite://", "sqlite:///:memory:", "not a url"):
        with pytest.raises(ValueError, match=r"database URL|file path"):
            database_url(bad)


def test_sqlite_runs_in_wal_with_foreign_keys_and_a_busy_timeout(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/new/dir/x.db")  # the directory is created
    try:
        with db.transaction() as conn:
            pragma = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "foreign_keys", "busy_timeout")
            }
        assert pragma == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 30000}
    finally:
        db.close()


def test_a_transaction_commits_or_rolls_back_as_a_whole(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/x.db")
    try:
        with db.transaction() as conn:
            scratch.create(conn)
            conn.execute(scratch.insert().values(k="kept"))

        def change_of_mind() -> None:
            with db.transaction() as conn:
                conn.execute(scratch.insert().values(k="lost"))
                raise RuntimeError("the caller changed its mind")

        def duplicate() -> None:
            with db.transaction() as conn:
                conn.execute(scratch.insert().values(k="again"))
                conn.execute(scratch.insert().values(k="kept"))

        with pytest.raises(RuntimeError):
            change_of_mind()
        # A wrong statement is the caller's error, not an unavailable database.
        with pytest.raises(sa.exc.IntegrityError):
            duplicate()
        with db.transaction() as conn:
            assert conn.execute(sa.select(scratch.c.k)).scalars().all() == ["kept"]
    finally:
        db.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nothing listens on it once the socket is closed


def test_a_database_that_is_away_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "a-directory.db").mkdir()
    for url in (
        f"postgresql://flotilla@127.0.0.1:{closed_port()}/registry",
        f"sqlite:///{tmp_path}/a-directory.db",  # cannot be opened as a file
    ):
        db = Database(url)
        try:
            with pytest.raises(DatabaseUnavailable, match=r"database unavailable: .+"):
                Registry(db).events.last_id()
        finally:
            db.close()


def test_the_projection_has_an_event_redelivered_while_the_database_is_away() -> None:
    db = Database(f"postgresql://flotilla@127.0.0.1:{closed_port()}/registry")
    projector = EventProjector(Registry(db), ApiMetrics(), lambda: None)
    event = DomainStarted(
        domain_id=uuid.uuid4(),
        name="g",
        host="h1",
        seq=1,
        state=PowerState.RUNNING,
        detail=StartedDetail.BOOTED,
    )
    ctx = Context(Envelope(type=event.TYPE, body={}, source="compute:h1"))
    try:
        with pytest.raises(Retry, match="registry unavailable: database unavailable"):
            projector.domain_event(event, ctx)
    finally:
        db.close()
