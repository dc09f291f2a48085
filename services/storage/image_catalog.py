"""The catalog's images: names in projects for raw files in pools' image stores.

An image row is `importing` (under its replica's lease, with the ticket of its stream)
until the pool's host says what it stored, then `available` with its sha256 and size. Many
rows may name one file (the same bytes imported twice); `delete` says whether the row was
the file's last name, for the caller to remove the file then. Events (`image.imported`,
`image.deleted`) go to the catalog's outbox in the change's transaction.

Quotas (`ImageQuota`) hold per project: the count of image names when an import begins (an
import under way holds its name), the sum of raw sizes when it begins with a known size
and again when it ends with the real one. Each check is in the transaction that inserts or
finishes the row, under the project's lock, so two imports cannot pass a limit together.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from protos.images import Image, ImageDeleted, ImageImported, ImageQuota
from services.bus import Cause, ServiceError
from services.db import advisory_xact_lock
from services.storage.catalog import Catalog, GiB, PoolRow
from services.storage.tables import images


class ImageOverQuota(ServiceError):
    """An import refused at its end for the project's `image_gib`: its row is gone, and
    `remove_file` says whether its file is the caller's to remove (no other name holds it
    and no import into the pool is under way; otherwise the reconcile sweep removes it
    once nothing names it)."""

    def __init__(self, refused: ServiceError, *, remove_file: bool) -> None:
        super().__init__(refused.code, refused.message, refused.details)
        self.remove_file = remove_file


class ImageCatalog:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.db = catalog.db
        self.replica = catalog.replica

    # ---- reads -------------------------------------------------------------------------------

    def get(self, image_id: uuid.UUID, project: str | None, *, own: bool = False) -> Image:
        """The image if `project` may see it: its own, or a public one unless `own` (None:
        an admin, any); `not_found` otherwise, as for one that does not exist."""
        with self.db.transaction() as conn:
            return _image(_row(conn, image_id, project, own=own))

    def find(self, name: str, project: str | None) -> Image:
        """The available image `name` the project may use: its own, else a public one."""
        query = sa.select(images).where(images.c.name == name, images.c.state == "available")
        if project is not None:
            query = query.where(
                sa.or_(images.c.project == project, images.c.visibility == "public")
            )
        # The project's own first, then the oldest public one.
        mine = sa.case((images.c.project == (project or ""), 0), else_=1)
        with self.db.transaction() as conn:
            row = conn.execute(query.order_by(mine, images.c.created_at).limit(1)).first()
        if row is None:
            raise ServiceError("not_found", f"no image {name!r}", {"field": "image"})
        return _image(row)

    def visible(self, project: str | None) -> list[Image]:
        query = sa.select(images).order_by(images.c.project, images.c.name)
        if project is not None:
            query = query.where(
                sa.or_(images.c.project == project, images.c.visibility == "public")
            )
        with self.db.transaction() as conn:
            return [_image(r) for r in conn.execute(query).all()]

    def usage(self, project: str) -> tuple[int, int]:
        """The number of the project's image names (imports under way included) and the
        sum of their known raw sizes in bytes."""
        with self.db.transaction() as conn:
            return _usage(conn, project)

    def stuck(self, now: float | None = None) -> list[tuple[Image, str | None]]:
        """Imports whose lease ran out (their replica died), with their tickets."""
        now = time.time() if now is None else now
        query = sa.select(images).where(images.c.state == "importing", images.c.lease_until < now)
        with self.db.transaction() as conn:
            return [(_image(r), r.ticket) for r in conn.execute(query).all()]

    def importing(self, pool: str, host: str | None) -> bool:
        """Whether an import into the pool is under way (its outcome may be any file)."""
        query = sa.select(images.c.id).where(
            images.c.state == "importing",
            images.c.pool == pool,
            sa.func.coalesce(images.c.host, "") == (host or ""),
        )
        with self.db.transaction() as conn:
            return conn.execute(query.limit(1)).first() is not None

    def names_of(self, pool: str, host: str | None) -> set[str]:
        """The sha256 of every image row of the pool."""
        query = sa.select(images.c.sha256).where(
            images.c.pool == pool,
            sa.func.coalesce(images.c.host, "") == (host or ""),
            images.c.sha256.is_not(None),
        )
        with self.db.transaction() as conn:
            return {r.sha256 for r in conn.execute(query).all()}

    # ---- changes -----------------------------------------------------------------------------

    def begin(
        self,
        *,
        image_id: uuid.UUID,
        project: str,
        name: str,
        kind: str,
        visibility: str,
        pool: PoolRow,
        lease_s: float,
        quota: ImageQuota | None = None,
        size: int | None = None,
    ) -> tuple[Image, bool]:
        """Insert the image `importing` under this replica's lease; (image, True). The same
        id again (the command redelivered) is (image, False); a name in use is refused, and
        so (`over_quota`) is one name more than `quota.images` or, with `size`, more than
        `quota.image_gib` GiB."""
        now = time.time()
        try:
            with self.db.transaction() as conn:
                advisory_xact_lock(conn, f"flotilla-storage-images:{project}")
                existing = conn.execute(
                    sa.select(images).where(images.c.id == str(image_id))
                ).first()
                if existing is not None:
                    if existing.project != project:
                        raise ServiceError("conflict", f"image id {image_id} is taken")
                    return _image(existing), False
                _name_free(conn, project, name)
                if quota is not None:
                    _check_quota(conn, project, quota, count=1, size=size or 0)
                conn.execute(
                    sa.insert(images).values(
                        id=str(image_id),
                        project=project,
                        name=name,
                        kind=kind,
                        visibility=visibility,
                        pool=pool.name,
                        host=pool.host,
                        state="importing",
                        lease_owner=self.replica,
                        lease_until=now + lease_s,
                        created_at=now,
                        quota_gib=None if quota is None else quota.image_gib,
                    )
                )
                return _image(_row(conn, image_id, None)), True
        except sa.exc.IntegrityError:
            raise ServiceError(
                "conflict",
                f"an image named {name!r} exists in project {project}",
                {"reason": "name_in_use", "field": "name"},
            ) from None

    def ticket_of(self, image_id: uuid.UUID) -> str | None:
        with self.db.transaction() as conn:
            row = conn.execute(
                sa.select(images.c.ticket).where(images.c.id == str(image_id))
            ).first()
        return None if row is None else row.ticket

    def set_ticket(self, image_id: uuid.UUID, ticket: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                sa.update(images).where(images.c.id == str(image_id)).values(ticket=ticket)
            )

    def take_lease(self, image_id: uuid.UUID, lease_s: float) -> bool:
        now = time.time()
        with self.db.transaction() as conn:
            done = conn.execute(
                sa.update(images)
                .where(
                    images.c.id == str(image_id),
                    sa.or_(images.c.lease_until < now, images.c.lease_owner == self.replica),
                )
                .values(lease_owner=self.replica, lease_until=now + lease_s)
            )
        return done.rowcount == 1

    def renew(self, image_id: uuid.UUID, lease_s: float) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                sa.update(images)
                .where(images.c.id == str(image_id), images.c.state == "importing")
                .values(lease_owner=self.replica, lease_until=time.time() + lease_s)
            )

    def finish(
        self,
        image_id: uuid.UUID,
        *,
        sha256: str,
        size: int,
        source_format: str | None,
        deduplicated: bool,
        cause: Cause | None,
    ) -> Image:
        """The import stored `sha256`: the image is available; event `image.imported`.
        Past the `image_gib` limit the import began under, the row is removed instead and
        `ImageOverQuota` raised."""
        refused: ImageOverQuota | None = None
        with self.db.transaction() as conn:
            project = _row(conn, image_id, None).project
            # Under the project's lock, so a concurrent import's end counts this one's size.
            advisory_xact_lock(conn, f"flotilla-storage-images:{project}")
            row = _row(conn, image_id, None)
            if row.state == "available":
                return _image(row)
            if row.quota_gib is not None:
                refused = _refuse_past_quota(conn, row, sha256, size)
            if refused is None:
                conn.execute(
                    sa.update(images)
                    .where(images.c.id == str(image_id))
                    .values(
                        state="available",
                        sha256=sha256,
                        size=size,
                        source_format=source_format,
                        ticket=None,
                        lease_owner=None,
                        lease_until=0,
                    )
                )
                after = _image(_row(conn, image_id, None))
                self.catalog.enqueue(
                    conn, ImageImported(**event_fields(after), deduplicated=deduplicated), cause
                )
        if refused is not None:
            raise refused
        return after

    def forget(self, image_id: uuid.UUID) -> None:
        """Remove an import that stored nothing (never announced)."""
        with self.db.transaction() as conn:
            conn.execute(
                sa.delete(images).where(images.c.id == str(image_id), images.c.state == "importing")
            )

    def delete(
        self, image_id: uuid.UUID, project: str | None, cause: Cause | None
    ) -> tuple[Image, bool]:
        """Remove the image's name (event `image.deleted`); whether it was its file's last
        name (the caller removes the file then). Refused while importing."""
        with self.db.transaction() as conn:
            row = _row(conn, image_id, project, own=True)
            image = _image(row)
            if row.state != "available":
                raise ServiceError(
                    "conflict",
                    f"image {image_id} is {row.state}: cannot delete it",
                    {"reason": "state", "state": row.state},
                )
            conn.execute(sa.delete(images).where(images.c.id == str(image_id)))
            others = conn.execute(
                sa.select(images.c.id).where(
                    images.c.sha256 == row.sha256,
                    images.c.pool == row.pool,
                    sa.func.coalesce(images.c.host, "") == (row.host or ""),
                )
            ).first()
            last = others is None
            self.catalog.enqueue(
                conn, ImageDeleted(**event_fields(image), file_removed=last), cause
            )
        return image, last


def event_fields(image: Image) -> dict[str, Any]:
    assert image.sha256 is not None
    assert image.size is not None
    return {
        "image_id": image.image_id,
        "project": image.project,
        "name": image.name,
        "kind": image.kind,
        "visibility": image.visibility,
        "pool": image.pool,
        "host": image.host or "",
        "sha256": image.sha256,
        "size": image.size,
    }


def _usage(conn: Connection, project: str) -> tuple[int, int]:
    count, size = conn.execute(
        sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(images.c.size), 0)).where(
            images.c.project == project
        )
    ).one()
    return int(count), int(size)


def _gib(size: int) -> int:
    return -(-size // GiB)


def _check_quota(
    conn: Connection, project: str, quota: ImageQuota, *, count: int, size: int
) -> None:
    used_count, used_bytes = _usage(conn, project)
    if count and quota.images is not None and used_count + count > quota.images:
        raise ServiceError(
            "over_quota",
            f"project {project} has {used_count} of {quota.images} images",
            {"resource": "images", "limit": quota.images, "used": used_count, "requested": count},
        )
    used, wanted = _gib(used_bytes), _gib(used_bytes + size)
    if size > 0 and quota.image_gib is not None and wanted > quota.image_gib:
        raise ServiceError(
            "over_quota",
            f"project {project} uses {used} of {quota.image_gib} GiB of images",
            {
                "resource": "image_gib",
                "limit": quota.image_gib,
                "used": used,
                "requested": wanted - used,
            },
        )


def _refuse_past_quota(conn: Connection, row: Any, sha256: str, size: int) -> ImageOverQuota | None:
    """None if the import's `size` fits the limit it began under (its own row's size is not
    set yet, so it is not counted twice); else its row is deleted and the refusal returned."""
    try:
        _check_quota(conn, row.project, ImageQuota(image_gib=row.quota_gib), count=0, size=size)
    except ServiceError as exc:
        conn.execute(sa.delete(images).where(images.c.id == row.id))
        on_host = (
            images.c.pool == row.pool,
            sa.func.coalesce(images.c.host, "") == (row.host or ""),
        )
        held = conn.execute(
            sa.select(images.c.id)
            .where(*on_host, sa.or_(images.c.sha256 == sha256, images.c.state == "importing"))
            .limit(1)
        ).first()
        return ImageOverQuota(exc, remove_file=held is None)
    return None


def _name_free(conn: Connection, project: str, name: str) -> None:
    taken = conn.execute(
        sa.select(images.c.id).where(images.c.project == project, images.c.name == name)
    ).first()
    if taken is not None:
        raise ServiceError(
            "conflict",
            f"an image named {name!r} exists in project {project}",
            {"reason": "name_in_use", "field": "name"},
        )


def _row(conn: Connection, image_id: uuid.UUID, project: str | None, *, own: bool = False) -> Any:
    row = conn.execute(sa.select(images).where(images.c.id == str(image_id))).first()
    visible = row is not None and (
        project is None
        or row.project == project
        or (not own and row.visibility == "public" and row.state == "available")
    )
    if not visible:
        raise ServiceError("not_found", f"no image {image_id}")
    return row


def _image(row: Any) -> Image:
    return Image(
        image_id=uuid.UUID(row.id),
        project=row.project,
        name=row.name,
        kind=row.kind,
        visibility=row.visibility,
        pool=row.pool,
        host=row.host,
        state=row.state,
        sha256=row.sha256,
        size=row.size,
        source_format=row.source_format,
        created_at=row.created_at,
    )
