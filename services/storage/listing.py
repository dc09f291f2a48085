"""A page of the volume catalog, from SQL straight to the reply's wire data.

A page is up to 10,000 volumes (protos.volumes.MAX_PAGE), so nothing here is done per row
that need not be: one keyset query over the `(project, name)` index for the reply's columns
only, read through the driver's own cursor as plain tuples (SQLAlchemy's Row objects and
their result processing cost more than the query), and each tuple made into the record the
encoder writes as Volume's JSON form (protos.volume_wire.VolumeRow).

`volume_listing` answers the API's listing (cmd.catalog.volume_listing): the same query,
each tuple made into the API's view of a volume (protos.volume_wire.VolumeViewRow) and the
page written as its JSON in one call of msgspec's encoder, so the API sends it on without
reading each volume. Rendering the rows' JSON in SQLite instead (`json_object`,
`json_quote` and `||` per row, `printf('%!.17g')` for `created_at`, whose `json_object`
rendering keeps only 15 digits) was measured and cost more than this (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from protos.volume_wire import AttachmentRow, VolumeRow, VolumeViewRow
from protos.volumes import VolumeListing, VolumePage
from services.bus import ServiceError
from services.storage.tables import volumes

# Where a row's field is not the column of its name: VolumeRow's `volume_id` is `id`, and an
# attachment is its three columns.
_FIELD_COLUMNS: dict[str, tuple[sa.Column[Any], ...]] = {
    "volume_id": (volumes.c.id,),
    "attachment": (volumes.c.domain_id, volumes.c.target, volumes.c.readonly),
}


def _columns(row: type[msgspec.Struct]) -> tuple[sa.Column[Any], ...]:
    """The columns that fill `row`'s fields, in the row's order."""
    return tuple(
        column
        for field in row.__struct_fields__
        for column in _FIELD_COLUMNS.get(field) or (volumes.c[field],)
    )


# The reply's columns (VolumeRow) and the listing's (VolumeViewRow: the name before the
# project, no `image`, no `fault`), each in its row's order.
_COLUMNS = _columns(VolumeRow)
_VIEW_COLUMNS = _columns(VolumeViewRow)
_JSON = msgspec.json.Encoder()


def volume_page(
    conn: Connection, project: str | None, pool: str | None, limit: int, after: str | None
) -> VolumePage:
    """Volumes by (project, name) after cursor `after` (the last one's `project/name`:
    names hold no `/`), at most `limit`, only `project`'s unless None, only `pool`'s if
    given; `next` is the cursor when there are more."""
    rows, cursor = _page(conn, _COLUMNS, (1, 2), project, pool, limit, after)
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


def volume_listing(  # noqa: PLR0917  (the command's fields)
    conn: Connection,
    project: str | None,
    pool: str | None,
    limit: int,
    after: str | None,
    hosts: dict[str, str] | None,
) -> VolumeListing:
    """`volume_page`'s page as the API's listing JSON (protos.volumes.VolumeListing), each
    host through `hosts` unless None; ServiceError `unmapped_host` (`details.hosts`) when
    `hosts` lacks a host of the page."""
    rows, cursor = _page(conn, _VIEW_COLUMNS, (2, 1), project, pool, limit, after)
    if hosts is not None:
        unmapped = {r[4] for r in rows if r[4] is not None and r[4] not in hosts}
        if unmapped:
            raise ServiceError(
                "unmapped_host",
                f"{len(unmapped)} host(s) of the page are not in the listing's hosts",
                {"hosts": sorted(unmapped)},
            )
    views = [
        VolumeViewRow(
            volume_id,
            name,
            project_,
            pool_,
            host if hosts is None or host is None else hosts[host],
            size,
            state,
            None if domain_id is None else AttachmentRow(domain_id, target, bool(readonly)),
            source_id,
            seq,
            created_at,
        )
        for (
            volume_id,
            name,
            project_,
            pool_,
            host,
            size,
            state,
            domain_id,
            target,
            readonly,
            source_id,
            seq,
            created_at,
        ) in rows
    ]
    # msgspec writes UTF-8 bytes; as text the reply carries it as a msgpack str (for ASCII
    # text the decode is a copy).
    return VolumeListing.of_json(_JSON.encode(views).decode(), len(views), cursor)


def _page(  # noqa: PLR0917  (the query's parts)
    conn: Connection,
    columns: tuple[sa.ColumnElement[Any], ...],
    key: tuple[int, int],
    project: str | None,
    pool: str | None,
    limit: int,
    after: str | None,
) -> tuple[list[tuple[Any, ...]], str | None]:
    """The page's rows of `columns` and the next page's cursor (None after the last);
    `key` is where the project and the name are in a row."""
    query = sa.select(*columns).order_by(volumes.c.project, volumes.c.name)
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
        cursor = f"{rows[-1][key[0]]}/{rows[-1][key[1]]}"
    return rows, cursor


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
