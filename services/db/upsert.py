"""`INSERT … ON CONFLICT`, which SQLAlchemy spells per dialect (same API on both)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection


def upsert(conn: Connection, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
    """An insert into `table` for `conn`'s dialect that takes `.on_conflict_do_nothing()` and
    `.on_conflict_do_update()` (with `.excluded`)."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)
