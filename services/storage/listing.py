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
    `hosts` lacks a host of the page.

    Each volume's JSON is kept beside its row (the `listing` column, written by
    `refresh_listing` in every transaction that changes what the listing shows), so a page is
    one column read and joined: ~8 ms for 10,000 where building the records from their 13
    columns took ~22 (bench/storage_list_stages.py). A page with a row whose JSON is missing
    (written before the column existed, and not yet filled by `fill_listings`) is built from
    the columns instead."""
    columns = (volumes.c.listing,) if hosts is None else (volumes.c.listing, volumes.c.host)
    rows = _tuples(conn, _page_query(columns, project, pool, limit, after))
    more = len(rows) > limit
    del rows[limit:]
    if any(r[0] is None for r in rows):
        return built_listing(conn, project, pool, limit, after, hosts)
    if hosts is None:
        texts = [r[0] for r in rows]
    else:
        page_hosts = {r[1] for r in rows}
        _check_mapped(page_hosts, hosts)
        # The stored JSON names the real host, first of its keys to be "host" (string
        # values are escaped JSON: no `"host":` inside one): the member sees the alias.
        swaps = {
            h: ('"host":' + _JSON.encode(h).decode(), '"host":' + _JSON.encode(hosts[h]).decode())
            for h in page_hosts
            if h is not None
        }
        texts = [text if host is None else text.replace(*swaps[host], 1) for text, host in rows]
    cursor = None
    if more:
        last = _KEY.decode(rows[-1][0])
        cursor = f"{last.project}/{last.name}"
    return VolumeListing.of_json("[" + ",".join(texts) + "]", len(texts), cursor)


class _Key(msgspec.Struct, gc=False):
    """A stored listing JSON's keyset cursor fields (the rest skipped)."""

    name: str
    project: str


_KEY = msgspec.json.Decoder(_Key)


def _check_mapped(page_hosts: set[str | None], hosts: dict[str, str]) -> None:
    unmapped = {h for h in page_hosts if h is not None and h not in hosts}
    if unmapped:
        raise ServiceError(
            "unmapped_host",
            f"{len(unmapped)} host(s) of the page are not in the listing's hosts",
            {"hosts": sorted(unmapped)},
        )


def _view(row: tuple[Any, ...], hosts: dict[str, str] | None) -> VolumeViewRow:
    """A row of `_VIEW_COLUMNS` as its listing record, its host through `hosts` unless None."""
    (
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
    ) = row
    return VolumeViewRow(
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


def built_listing(  # noqa: PLR0917  (the command's fields)
    conn: Connection,
    project: str | None,
    pool: str | None,
    limit: int,
    after: str | None,
    hosts: dict[str, str] | None,
) -> VolumeListing:
    """The listing built from the rows' columns (what `listing` holds, made anew)."""
    rows, cursor = _page(conn, _VIEW_COLUMNS, (2, 1), project, pool, limit, after)
    if hosts is not None:
        _check_mapped({r[4] for r in rows}, hosts)
    views = [_view(r, hosts) for r in rows]
    # msgspec writes UTF-8 bytes; as text the reply carries it as a msgpack str (for ASCII
    # text the decode is a copy).
    return VolumeListing.of_json(_JSON.encode(views).decode(), len(views), cursor)


def refresh_listing(conn: Connection, volume_id: str) -> None:
    """Store the volume's listing JSON (its real host) in its row's `listing` column. Every
    transaction that inserts a volume or changes a column the listing shows calls it after
    the change; tests/unit/test_volume_listing.py checks each such change against a page
    built from the columns."""
    rows = _tuples(conn, sa.select(*_VIEW_COLUMNS).where(volumes.c.id == volume_id))
    if rows:
        conn.execute(
            sa.update(volumes)
            .where(volumes.c.id == volume_id)
            .values(listing=_JSON.encode(_view(rows[0], None)).decode())
        )


def fill_listings(conn: Connection, batch: int = 1000) -> int:
    """Store the listing JSON of up to `batch` volumes that lack it (rows from before the
    column); how many were filled."""
    rows = _tuples(
        conn,
        sa.select(*_VIEW_COLUMNS).where(volumes.c.listing.is_(None)).limit(batch),
    )
    if rows:
        conn.execute(
            sa.update(volumes)
            .where(volumes.c.id == sa.bindparam("vid"))
            .values(listing=sa.bindparam("text")),
            [{"vid": r[0], "text": _JSON.encode(_view(r, None)).decode()} for r in rows],
        )
    return len(rows)


def _page_query(
    columns: tuple[sa.ColumnElement[Any], ...],
    project: str | None,
    pool: str | None,
    limit: int,
    after: str | None,
) -> sa.Select[Any]:
    """The page's query: up to `limit` + 1 rows of `columns` by (project, name) after the
    cursor (one more than the page: whether there is a next one)."""
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
    return query.limit(limit + 1)


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
    rows = _tuples(conn, _page_query(columns, project, pool, limit, after))
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
