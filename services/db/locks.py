"""PostgreSQL advisory locks held until the end of the current transaction.

On SQLite there is nothing to take: every transaction already holds the database's write
lock (`BEGIN IMMEDIATE`, services.db.engine), which serialises more than any key would.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection


def advisory_xact_lock(conn: Connection, key: int | str) -> None:
    """Wait for the transaction-scoped advisory lock `key` (a 64-bit integer, or a string
    hashed by PostgreSQL's `hashtext`) on PostgreSQL; do nothing on SQLite."""
    if conn.dialect.name != "postgresql":
        return
    lock_id = sa.func.hashtext(key) if isinstance(key, str) else sa.literal(key, sa.BigInteger)
    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(lock_id)))
