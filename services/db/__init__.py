"""One SQL layer for the services that keep a catalog: SQLAlchemy Core on SQLite (the
embedded default) or PostgreSQL (several replicas), with Alembic migrations per component.

    db = Database("sqlite:////var/lib/flotilla/api/registry.db")
    upgrade(db, REGISTRY)                 # at start-up: to head, safe from several replicas
    with db.transaction() as conn:        # the one way to run SQL
        advisory_xact_lock(conn, "project-a")
        conn.execute(sa.select(domains.c.name))

See docs/database.md.
"""

from services.db.database import Database, DatabaseUnavailable, is_unavailable
from services.db.engine import create_engine, database_url
from services.db.locks import advisory_xact_lock
from services.db.migrations import (
    Component,
    Legacy,
    MigrationError,
    current_revision,
    run_env,
    schema_drift,
    upgrade,
)
from services.db.upsert import upsert

__all__ = [
    "Component",
    "Database",
    "DatabaseUnavailable",
    "Legacy",
    "MigrationError",
    "advisory_xact_lock",
    "create_engine",
    "current_revision",
    "database_url",
    "is_unavailable",
    "run_env",
    "schema_drift",
    "upgrade",
    "upsert",
]
