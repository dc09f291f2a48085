"""A page of the volume catalog, from SQL straight to the reply's wire data.

A page is up to 10,000 volumes (protos.volumes.MAX_PAGE), so nothing here is done per row
that need not be: one keyset query over the `(project, name)` index for the reply's columns
only, read through the driver's own cursor as plain tuples (SQLAlchemy's Row objects and
their result processing cost more than the query), and each tuple made into the record the
encoder writes as Volume's JSON form (protos.volume_wire.VolumeRow).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from protos.volume_wire import AttachmentRow, VolumeRow
from protos.volumes import VolumePage
from services.storage.tables import volumes

# The reply's columns, in VolumeRow's order (the attachment is its three columns).
_COLUMNS = (
    volumes.c.id,
    volumes.c.project,
    volumes.c.name,
    volumes.c.pool,
    volumes.c.host,
    volumes.c.size,
    volumes.c.state,
    volumes.c.domain_id,
    volumes.c.target,
    volumes.c.readonly,
    volumes.c.source_id,
    volumes.c.image,
    volumes.c.fault,
    volumes.c.seq,
    volumes.c.created_at,
)


def volume_page(
    conn: Connection, project: str | None, pool: str | None, limit: int, after: str | None
) -> VolumePage:
    """Volumes by (project, name) after cursor `after` (the last one's `project/name`:
    names hold no `/`), at most `limit`, only `project`'s unless None, only `pool`'s if
    given; `next` is the cursor when there are more."""
    query = sa.select(*_COLUMNS).order_by(volumes.c.project, volumes.c.name)
    if project is not None:
        query = query.where(volumes.c.project == project)
    if pool is not None:
        query = query.where(volumes.c.pool == pool)
    if after:
        last_project, _, last_name = after.partition("/")
        query = query.where(
            sa.tuple_(volumes.c.project, volumes.c.name) > (last_project, last_name)
        )
    rows = _tuples(conn, query.limit(limit + 1))
    cursor = None
    if len(rows) > limit:
        del rows[limit:]
        cursor = f"{rows[-1][1]}/{rows[-1][2]}"
    return VolumePage.of_wire(
        [
            VolumeRow(
                volume_id,
                project_,
                name,
                pool_,
                host,
                size,
                state,
                None if domain_id is None else AttachmentRow(domain_id, target, bool(readonly)),
                source_id,
                image,
                fault,
                seq,
                created_at,
            )
            for (
                volume_id,
                project_,
                name,
                pool_,
                host,
                size,
                state,
                domain_id,
                target,
                readonly,
                source_id,
                image,
                fault,
                seq,
                created_at,
            ) in rows
        ],
        cursor,
    )


def _tuples(conn: Connection, query: sa.Select[Any]) -> list[tuple[Any, ...]]:
    """The rows of `query` as the driver returns them, in the connection's transaction.
    Only for columns whose driver values are what the caller wants as they are (SQLite's
    booleans are 0/1, so `readonly` is made a bool by the caller)."""
    compiled = query.compile(dialect=conn.dialect)
    params = compiled.params
    args: Any = (
        tuple(params[name] for name in compiled.positiontup or ())
        if compiled.positional
        else params
    )
    cursor = conn.connection.cursor()
    try:
        cursor.execute(str(compiled), args)
        return list(cursor.fetchall())
    finally:
        cursor.close()
