"""The registry's schema under Alembic, on SQLite and on a real PostgreSQL: a fresh database
migrates to head, the first revision is exactly the schema the releases before Alembic made,
such a database is adopted (stamped, not re-created) and keeps working, and replicas starting
at once all migrate."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from protos.domain import BootSpec, DomainSpec, PowerState
from protos.events import DomainStarted, StartedDetail
from protos.replies import DomainInfo
from services.api.config import Quota
from services.api.registry import Registry
from services.api.registry.projection import Outcome
from services.api.tables import REGISTRY
from services.db import Database, MigrationError, current_revision, schema_drift, upgrade
from tests.pg import fresh_database

# The schema as the releases before Alembic created it (services/api/registry.py's `_SCHEMA`
# and `_ADDED_COLUMNS`, run by its `migrate()`), kept verbatim as the fixture of the tests
# below. Releases before the last ones had no `secrets` table.
LEGACY_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS domains (
        id TEXT PRIMARY KEY,
        project TEXT NOT NULL,
        name TEXT NOT NULL,
        spec TEXT NOT NULL,
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        host TEXT,
        power TEXT NOT NULL,
        task TEXT NOT NULL,
        seq BIGINT NOT NULL DEFAULT 0,
        fault TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        UNIQUE (name)
    )""",
    "CREATE INDEX IF NOT EXISTS domains_host ON domains (host)",
    """CREATE TABLE IF NOT EXISTS events (
        id {autoid},
        message_id TEXT NOT NULL UNIQUE,
        project TEXT,
        domain_id TEXT NOT NULL,
        host TEXT NOT NULL,
        seq BIGINT NOT NULL,
        type TEXT NOT NULL,
        routing_key TEXT NOT NULL,
        state TEXT NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        body TEXT NOT NULL,
        correlation_id TEXT,
        causation_id TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS events_domain ON events (domain_id, host, seq)",
    "CREATE INDEX IF NOT EXISTS events_project ON events (project, id)",
    """CREATE TABLE IF NOT EXISTS hosts (
        name TEXT PRIMARY KEY,
        enabled INTEGER NOT NULL,
        kvm TEXT NOT NULL,
        version TEXT NOT NULL,
        interval_s DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL,
        inventory TEXT NOT NULL,
        usage TEXT NOT NULL,
        domains_by_state TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS tokens (
        id TEXT PRIMARY KEY,
        token_sha256 TEXT NOT NULL UNIQUE,
        project TEXT NOT NULL,
        role TEXT NOT NULL,
        description TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS quotas (
        project TEXT PRIMARY KEY,
        domains INTEGER,
        vcpus INTEGER,
        memory_mib INTEGER
    )""",
    # Keys the API derives things from (the host alias key), made once, shared by replicas.
    """CREATE TABLE IF NOT EXISTS secrets (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
]
LEGACY_AUTOID = {
    "sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT",
    "postgresql": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
}


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/registry.db"
        return
    with fresh_database(request.getfixturevalue("pg_server")) as found:
        yield found


@pytest.fixture
def other_url(url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A second empty database on the same kind of server."""
    if url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path}/other.db"
        return
    with fresh_database(request.getfixturevalue("pg_server")) as found:
        yield found


def make_legacy(url: str, *, without: tuple[str, ...] = (), secrets: bool = True) -> None:
    """Create the pre-Alembic schema (minus events' columns in `without`, with or without the
    `secrets` table) with one domain and one logged event in it, the way an old release left
    them."""
    db = Database(url)
    try:
        with db.transaction() as conn:
            for statement in LEGACY_SCHEMA if secrets else LEGACY_SCHEMA[:-1]:
                sql = statement.replace("{autoid}", LEGACY_AUTOID[db.dialect])
                for column in without:
                    sql = sql.replace(f",\n        {column} TEXT", "")
                conn.exec_driver_sql(sql)
            conn.exec_driver_sql(
                "INSERT INTO domains (id, project, name, spec, vcpus, memory_mib, host, power, "
                "task, seq, fault, created_at, updated_at) VALUES "
                f"('{OLD.uuid}', 'p', 'old', '{OLD.model_dump_json()}', 1, 64, 'h1', "
                "'running', 'none', 4, NULL, 1.0, 1.0)"
            )
            conn.exec_driver_sql(
                "INSERT INTO events (message_id, project, domain_id, host, seq, type, "
                "routing_key, state, ts, body) VALUES "
                f"('m-old', 'p', '{OLD.uuid}', 'h1', 4, 'domain.started', 'r', 'running', 1.0, "
                "'{}')"
            )
    finally:
        db.close()


OLD = DomainSpec(name="old", vcpus=1, memory_mib=64, boot=BootSpec(kernel="/k"))


def describe(url: str) -> dict[str, Any]:
    """Every registry table as the database reports it: columns (type, nullability, default,
    identity), primary key, unique constraints and indexes."""
    db = Database(url)
    try:
        with db.transaction() as conn:
            inspector = sa.inspect(conn)
            tables: dict[str, Any] = {}
            for table in sorted(REGISTRY.metadata.tables):
                if not inspector.has_table(table):
                    continue  # a legacy database lacks what later revisions add
                pk = inspector.get_pk_constraint(table)["constrained_columns"]
                tables[table] = {
                    "columns": [
                        (
                            c["name"],
                            str(c["type"]),
                            # A non-INTEGER PRIMARY KEY admits NULL on SQLite unless declared
                            # NOT NULL (a quirk the registry never relied on).
                            c["nullable"] and c["name"] not in pk,
                            str(c.get("default")),
                            bool(c.get("identity", {}).get("always")),
                        )
                        for c in inspector.get_columns(table)
                    ],
                    "pk": pk,
                    "unique": sorted(
                        (u["name"] or "", tuple(u["column_names"]))
                        for u in inspector.get_unique_constraints(table)
                    ),
                    "indexes": sorted(
                        (i["name"] or "", tuple(i["column_names"]), bool(i["unique"]))
                        for i in inspector.get_indexes(table)
                    ),
                }
            return tables
    finally:
        db.close()


def test_a_fresh_database_migrates_to_head(url: str) -> None:
    registry = Registry.open(url)
    try:
        with registry.db.transaction() as conn:
            assert current_revision(conn, REGISTRY) == REGISTRY.head()
            assert sa.inspect(conn).has_table("alembic_version_registry")
            # The tables the code queries are the tables the migrations made.
            assert schema_drift(conn, REGISTRY) == []
        registry.domains.create(
            DomainSpec(name="new", vcpus=1, memory_mib=64, boot=BootSpec(kernel="/k")),
            "p",
            Quota(),
        )
        registry.migrate()  # again: nothing to do, nothing lost
        assert [d.name for d in registry.domains.matching()] == ["new"]
    finally:
        registry.close()


def test_the_first_revision_is_the_legacy_schema(url: str, other_url: str) -> None:
    make_legacy(url)
    Registry.open(other_url).close()
    assert legacy_part(describe(other_url)) == legacy_part(describe(url))


def legacy_part(description: dict[str, Any]) -> dict[str, Any]:
    """The tables and columns the releases before Alembic made (later revisions add more)."""
    assert REGISTRY.legacy is not None
    frozen = {**REGISTRY.legacy.tables, "secrets": frozenset({"name", "value"})}
    return {
        name: {**table, "columns": [c for c in table["columns"] if c[0] in frozen[name]]}
        for name, table in description.items()
        if name in frozen
    }


@pytest.mark.parametrize("secrets", [True, False], ids=["last", "older"])
def test_a_legacy_database_is_stamped_and_keeps_working(url: str, secrets: bool) -> None:
    make_legacy(url, secrets=secrets)
    registry = Registry.open(url)
    try:
        with registry.db.transaction() as conn:
            assert current_revision(conn, REGISTRY) == REGISTRY.head()
        old = registry.domains.get(OLD.uuid)
        assert old is not None
        assert (old.name, old.host, old.power, old.seq) == ("old", "h1", PowerState.RUNNING, 4)
        [logged] = registry.events.after(0)
        assert logged.message_id == "m-old"
        event = DomainStarted(
            domain_id=OLD.uuid,
            name="old",
            host="h1",
            seq=5,
            state=PowerState.RUNNING,
            detail=StartedDetail.BOOTED,
        )
        assert registry.events.apply("m-new", event.routing_key(), event) is Outcome.APPLIED
        assert [e.id for e in registry.events.after(logged.id)] == [logged.id + 1]
        new = DomainSpec(name="new", vcpus=1, memory_mib=64, boot=BootSpec(kernel="/k"))
        registry.domains.create(new, "p", Quota(domains=2))
        placed = registry.domains.set_placement(
            new.uuid,
            "h2",
            DomainInfo(
                domain_id=new.uuid,
                name="new",
                host="h2",
                state=PowerState.RUNNING,
                vcpus=1,
                memory_mib=64,
                seq=1,
            ),
        )
        assert placed is not None
        assert registry.domains.usage("p") == {"domains": 2, "vcpus": 2, "memory_mib": 128}
        key = registry.access.secret("host-alias")
        assert len(key) == 64
        assert registry.access.secret("host-alias") == key
    finally:
        registry.close()


def test_a_legacy_database_of_another_shape_is_refused_untouched(url: str) -> None:
    make_legacy(url, without=("correlation_id", "causation_id"))
    db = Database(url)
    try:
        with pytest.raises(MigrationError, match="events lacks causation_id, correlation_id"):
            upgrade(db, REGISTRY)
        with db.transaction() as conn:
            assert current_revision(conn, REGISTRY) is None
            assert "correlation_id" not in {
                c["name"] for c in sa.inspect(conn).get_columns("events")
            }
    finally:
        db.close()


# One replica starting: import everything, say so, wait for the word, migrate.
_REPLICA = """
import sys
from services.api.tables import REGISTRY
from services.db import Database, upgrade
db = Database(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
print(upgrade(db, REGISTRY), flush=True)
db.close()
"""


def test_replicas_migrating_at_once_all_succeed(url: str) -> None:
    """Three replica processes start together on one empty database: one creates the schema,
    the others wait for it and then find head (without the lock they fail or deadlock)."""
    replicas = [
        subprocess.Popen(
            [sys.executable, "-c", _REPLICA, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = []
    try:
        for replica in replicas:  # every interpreter has imported the code
            assert replica.stdout is not None
            assert replica.stdout.readline() == "ready\n"
        for replica in replicas:
            assert replica.stdin is not None
            replica.stdin.write("go\n")
            replica.stdin.flush()
        for replica in replicas:
            out, err = replica.communicate(timeout=60)
            results.append((replica.returncode, out.strip(), err.strip()[-2000:]))
    finally:
        for replica in replicas:
            if replica.poll() is None:
                replica.kill()
                replica.wait()
    assert results == [(0, REGISTRY.head(), "")] * 3
    registry = Registry.open(url)
    try:
        registry.domains.create(
            DomainSpec(name="after", vcpus=1, memory_mib=64, boot=BootSpec(kernel="/k")),
            "p",
            Quota(),
        )
        assert [d.name for d in registry.domains.matching()] == ["after"]
    finally:
        registry.close()
