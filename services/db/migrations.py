"""Alembic migrations per component, run programmatically at start-up.

A component (the API's registry, the storage catalog, the network service) owns some tables
in its own database and one migration history: a script directory (`env.py` calls
`run_env(COMPONENT)`, `versions/` holds the revisions) and its own version table,
`alembic_version_<name>`, so components can share a database without sharing a history.

`upgrade(db, component)` brings the database to head in one transaction: on PostgreSQL under
the component's advisory lock (several replicas starting at once: one migrates, the others
wait and then find head), on SQLite under the write lock every transaction takes. A database
made before the component used Alembic (its tables present, no version table) is checked
against `Legacy.tables` and stamped at `Legacy.revision` instead of re-created.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command, context
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from services.db.database import Database
from services.db.engine import database_url
from services.db.locks import advisory_xact_lock

# Alembic's `context` and `op` are module-level proxies to the running migration: one
# migration at a time per process (other processes are kept out by the database's locks).
_ALEMBIC = threading.Lock()


class MigrationError(Exception):
    """The database cannot be brought to head as it is (nothing was changed)."""


@dataclass(frozen=True, slots=True)
class Legacy:
    """The schema a component's releases before Alembic created: which tables (with which
    columns, at least) mark such a database, and the revision that matches it."""

    revision: str
    tables: Mapping[str, frozenset[str]]


@dataclass(frozen=True, slots=True)
class Component:
    """One migration history. `metadata` is the head schema the code uses (autogenerate
    compares against it); `lock_key` names the PostgreSQL advisory lock migrations take."""

    name: str
    metadata: sa.MetaData
    script_location: Path
    lock_key: int
    legacy: Legacy | None = field(default=None)

    @property
    def version_table(self) -> str:
        return f"alembic_version_{self.name}"

    def config(self, connection: Connection | None = None) -> Config:
        """An Alembic config for this component; with `connection`, commands run on it."""
        config = Config()
        config.set_main_option("script_location", str(self.script_location))
        if connection is not None:
            config.attributes["connection"] = connection
        return config

    def head(self) -> str:
        heads = _heads(self.script_location)
        if len(heads) != 1:
            raise MigrationError(f"{self.name}: migrations have {len(heads)} heads: {heads}")
        return heads[0]


@functools.cache
def _heads(script_location: Path) -> tuple[str, ...]:
    # Revisions ship with the code: read once per process.
    config = Config()
    config.set_main_option("script_location", str(script_location))
    return tuple(ScriptDirectory.from_config(config).get_heads())


def upgrade(db: Database, component: Component) -> str:
    """Bring `db` to the component's head revision and return it (idempotent; safe from
    several processes at once). Raises MigrationError, or DatabaseUnavailable."""
    head = component.head()
    with db.transaction() as conn:
        advisory_xact_lock(conn, component.lock_key)
        current = current_revision(conn, component)
        if current == head:
            return head
        config = component.config(conn)
        with _ALEMBIC:
            if current is None and _is_legacy(conn, component):
                assert component.legacy is not None
                command.stamp(config, component.legacy.revision)
            command.upgrade(config, "head")
    return head


def current_revision(conn: Connection, component: Component) -> str | None:
    """The revision `conn`'s database is at for `component` (None: no version table yet)."""
    if not sa.inspect(conn).has_table(component.version_table):
        return None
    migration = MigrationContext.configure(conn, opts={"version_table": component.version_table})
    return migration.get_current_revision()


def schema_drift(conn: Connection, component: Component) -> list[Any]:
    """What autogenerate would change to make `conn`'s database match the component's
    metadata: empty when the migrations and the tables the code uses agree."""
    migration = MigrationContext.configure(conn, opts=_options(component))
    diffs: list[Any] = compare_metadata(migration, component.metadata)
    return diffs


def _options(component: Component) -> dict[str, Any]:
    return {
        "target_metadata": component.metadata,
        "version_table": component.version_table,
        "transactional_ddl": True,
        "render_as_batch": True,  # ALTERs on SQLite rebuild the table
        "compare_type": _compare_type,
    }


def _compare_type(
    migration: MigrationContext,
    _inspected_column: sa.Column[Any],
    _metadata_column: sa.Column[Any],
    inspected_type: sa.types.TypeEngine[Any],
    metadata_type: sa.types.TypeEngine[Any],
) -> bool | None:
    # SQLite reflects DOUBLE PRECISION as REAL: the same storage, not a change.
    if (
        migration.dialect.name == "sqlite"
        and isinstance(inspected_type, sa.Float)
        and isinstance(metadata_type, sa.Float)
    ):
        return False
    return None  # Alembic's own comparison


def _is_legacy(conn: Connection, component: Component) -> bool:
    """Whether the component's tables exist without a version table; raises MigrationError
    when they do but do not match the legacy schema."""
    legacy = component.legacy
    names = set(sa.inspect(conn).get_table_names())
    if legacy is None or not names & set(legacy.tables):
        return False
    inspector = sa.inspect(conn)
    problems: list[str] = []
    for table, columns in sorted(legacy.tables.items()):
        if table not in names:
            problems.append(f"table {table} is missing")
            continue
        present = {c["name"] for c in inspector.get_columns(table)}
        if missing := sorted(columns - present):
            problems.append(f"{table} lacks {', '.join(missing)}")
    if problems:
        raise MigrationError(
            f"{component.name}: the database has tables made before migrations but not the "
            f"schema of revision {legacy.revision} ({'; '.join(problems)}); "
            "nothing was changed"
        )
    return True


def run_env(component: Component) -> None:
    """The body of a component's `env.py`: migrate the connection `upgrade` passes, or (from
    the `alembic` command line) the database named by `-x url=…` or `sqlalchemy.url`."""
    config = context.config
    options = _options(component)
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, **options)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise MigrationError(f"{component.name}: name the database: alembic -x url=… …")
    if context.is_offline_mode():
        context.configure(url=database_url(url), literal_binds=True, **options)
        with context.begin_transaction():
            context.run_migrations()
        return
    db = Database(url)
    try:
        with db.transaction() as conn:
            advisory_xact_lock(conn, component.lock_key)
            context.configure(connection=conn, **options)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        db.close()
