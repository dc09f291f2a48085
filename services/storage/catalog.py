"""The storage catalog in SQL: pools, volumes, their events' outbox, command replies.

Every state change and its event are written in one transaction (the event into the outbox
with the volume's next `seq`), so the catalog and what subscribers learn never disagree.
Refusals are `ServiceError`s with the codes of protos.volumes. A volume being worked on
holds a lease (`lease_owner`, `lease_until`) its replica renews; `stuck()` returns the
volumes mid-state whose lease ran out (their replica died) for reconcile.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from protos.codec import decode, envelope_for, pack, parse_body
from protos.images import ImageEvent
from protos.storage import (
    PoolCapabilities,
    PoolInfo,
    VolumeAttached,
    VolumeDetached,
    VolumeEvent,
    VolumeMoved,
)
from protos.volumes import Attachment, Pool, Volume, VolumeListing, VolumePage, VolumeQuota
from services.bus import Cause, ServiceError
from services.db import Database, advisory_xact_lock, upgrade, upsert
from services.storage.listing import fill_listings, refresh_listing, volume_listing, volume_page
from services.storage.tables import CATALOG, outbox, pools, replies, volumes

GiB = 1 << 30
MID_STATES = ("creating", "deleting")


@dataclass(frozen=True, slots=True)
class PoolRow:
    name: str
    kind: str
    host: str | None
    available: int


class Catalog:
    """The catalog on `db` for replica `replica` (the owner name of its leases)."""

    def __init__(self, db: Database, replica: str) -> None:
        self.db = db
        self.replica = replica

    @classmethod
    def open(cls, url: str, replica: str) -> Catalog:
        db = Database(url)
        upgrade(db, CATALOG)
        return cls(db, replica)

    def close(self) -> None:
        self.db.close()

    # ---- pools -----------------------------------------------------------------------------

    def put_pool(self, info: PoolInfo, host: str | None, live_s: float = 0.0) -> None:
        """Record what a pool's host reported (`host` None: a shared pool served here); the
        host, which has just answered, is live for `live_s` more seconds."""
        now = time.time()
        values = {
            "name": info.name,
            "kind": info.kind,
            "host": host or "",
            "capacity": info.capacity,
            "allocation": info.allocation,
            "available": info.available,
            "reflink": info.capabilities.reflink,
            "punch_hole": info.capabilities.punch_hole,
            "updated_at": now,
            "live_until": now + live_s,
        }
        with self.db.transaction() as conn:
            stmt = upsert(conn, pools).values(**values)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[pools.c.name, pools.c.host],
                    set_={k: stmt.excluded[k] for k in values if k not in ("name", "host")},
                )
            )

    def host_live(self, host: str, live_s: float) -> None:
        """`host` was heard from: its pools take new volumes for `live_s` more seconds."""
        with self.db.transaction() as conn:
            conn.execute(
                pools.update().where(pools.c.host == host).values(live_until=time.time() + live_s)
            )

    def pool(self, name: str) -> PoolRow:
        """The pool `name`; of several hosts' pools of that name, the one with the most free
        space whose host is live (a `dir` pool's volumes live on its host: this is where a new
        one goes). A pool whose every host is silent is `unavailable`, not a wait on a host
        that will not answer."""
        live = sa.or_(pools.c.host == "", pools.c.live_until > time.time())
        query = (
            sa.select(pools, live.label("live"))
            .where(pools.c.name == name)
            .order_by(live.desc(), pools.c.available.desc(), pools.c.host)
            .limit(1)
        )
        with self.db.transaction() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise ServiceError("not_found", f"no pool {name!r}", {"field": "pool"})
        if not row.live:
            raise ServiceError(
                "unavailable",
                f"pool {name!r}: no host of it is up (last heard from {row.host})",
                {"field": "pool"},
            )
        return PoolRow(row.name, row.kind, row.host or None, row.available)

    def pool_on(self, name: str, host: str | None) -> PoolRow:
        """The pool `name` of `host` (None: the shared pool served by the service)."""
        query = sa.select(pools).where(pools.c.name == name, pools.c.host == (host or ""))
        with self.db.transaction() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise ServiceError("not_found", f"no pool {name!r} on {host or 'the service'}")
        return PoolRow(row.name, row.kind, row.host or None, row.available)

    def pools(self) -> list[Pool]:
        host = sa.func.coalesce(volumes.c.host, "")
        counts = (
            sa.select(volumes.c.pool, host.label("host"), sa.func.count().label("n"))
            .group_by(volumes.c.pool, host)
            .subquery()
        )
        joined = pools.outerjoin(
            counts, sa.and_(counts.c.pool == pools.c.name, counts.c.host == pools.c.host)
        )
        query = (
            sa.select(pools, sa.func.coalesce(counts.c.n, 0).label("volumes"))
            .select_from(joined)
            .order_by(pools.c.name, pools.c.host)
        )
        with self.db.transaction() as conn:
            rows = conn.execute(query).all()
        return [
            Pool(
                name=r.name,
                kind=r.kind,
                host=r.host or None,
                capacity=r.capacity,
                allocation=r.allocation,
                available=r.available,
                capabilities=PoolCapabilities(reflink=r.reflink, punch_hole=r.punch_hole),
                volumes=r.volumes,
                updated_at=r.updated_at,
            )
            for r in rows
        ]

    # ---- volumes: reads ----------------------------------------------------------------------

    def get(self, volume_id: uuid.UUID, project: str | None) -> Volume:
        """The volume, if `project` may see it (None: any); `not_found` otherwise."""
        with self.db.transaction() as conn:
            row = _row(conn, volume_id, project)
        return _volume(row)

    def page(
        self, project: str | None, pool: str | None, limit: int, after: str | None
    ) -> VolumePage:
        """The page `page_wire` sends, as its reader validates it (for reading in this
        process)."""
        wire = self.page_wire(project, pool, limit, after)
        page = parse_body(decode(pack(envelope_for(wire, source=self.replica))))
        assert isinstance(page, VolumePage)
        return page

    def page_wire(
        self, project: str | None, pool: str | None, limit: int, after: str | None
    ) -> VolumePage:
        """Volumes by (project, name), ready to send (services.storage.listing); read
        without the write lock, which a page of 10,000 would hold up writers with."""
        with self.db.transaction(read_only=True) as conn:
            return volume_page(conn, project, pool, limit, after)

    def listing(
        self,
        project: str | None,
        pool: str | None,
        limit: int,
        after: str | None,
        hosts: dict[str, str] | None,
    ) -> VolumeListing:
        """`page_wire`'s page as the API's listing JSON (services.storage.listing), read the
        same way."""
        with self.db.transaction(read_only=True) as conn:
            return volume_listing(conn, project, pool, limit, after, hosts)

    def fill_listings(self) -> int:
        """Store the listing JSON of every volume without it (rows from before the
        `listing` column), a thousand a transaction; how many were filled."""
        filled = 0
        while True:
            with self.db.transaction() as conn:
                n = fill_listings(conn)
            filled += n
            if n == 0:
                return filled

    def stuck(self, now: float | None = None) -> list[Volume]:
        """Volumes in `creating` or `deleting` whose operation's lease has run out."""
        now = time.time() if now is None else now
        query = sa.select(volumes).where(
            volumes.c.state.in_(MID_STATES), volumes.c.lease_until < now
        )
        with self.db.transaction() as conn:
            return [_volume(r) for r in conn.execute(query).all()]

    # ---- leases ------------------------------------------------------------------------------

    def take_lease(self, volume_id: uuid.UUID, lease_s: float) -> bool:
        """Take the volume's lease if it has run out or is this replica's already."""
        now = time.time()
        with self.db.transaction() as conn:
            done = conn.execute(
                sa.update(volumes)
                .where(
                    volumes.c.id == str(volume_id),
                    sa.or_(volumes.c.lease_until < now, volumes.c.lease_owner == self.replica),
                )
                .values(lease_owner=self.replica, lease_until=now + lease_s)
            )
        return done.rowcount == 1

    @property
    def move_owner(self) -> str:
        """The owner of the leases of this replica's prepared live moves: another owner than
        the replica's, so its own other operations on the volume are refused (busy) too."""
        return f"{self.replica}/live-move"

    def renew(
        self, volume_ids: Iterable[uuid.UUID], lease_s: float, owner: str | None = None
    ) -> None:
        ids = [str(v) for v in volume_ids]
        if not ids:
            return
        with self.db.transaction() as conn:
            conn.execute(
                sa.update(volumes)
                .where(volumes.c.id.in_(ids), volumes.c.lease_owner == (owner or self.replica))
                .values(lease_until=time.time() + lease_s)
            )

    def release(self, volume_id: uuid.UUID, owner: str | None = None) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                sa.update(volumes)
                .where(
                    volumes.c.id == str(volume_id), volumes.c.lease_owner == (owner or self.replica)
                )
                .values(lease_owner=None, lease_until=0)
            )

    def hand_lease(self, volume_id: uuid.UUID, owner: str) -> None:
        """This replica's lease on the volume goes to `owner` (same term)."""
        with self.db.transaction() as conn:
            conn.execute(
                sa.update(volumes)
                .where(volumes.c.id == str(volume_id), volumes.c.lease_owner == self.replica)
                .values(lease_owner=owner)
            )

    # ---- volumes: changes --------------------------------------------------------------------

    def begin_create(
        self,
        *,
        volume_id: uuid.UUID,
        project: str,
        name: str,
        pool: PoolRow,
        size: int,
        source_id: uuid.UUID | None,
        quota: VolumeQuota | None,
        lease_s: float,
        image: str | None = None,
    ) -> tuple[Volume, bool]:
        """Insert the volume in `creating` under this replica's lease; (volume, True). A
        volume of that id already there (the command again) is returned with False.
        Refuses a name in use, a quota exceeded and a size beyond the pool's free space."""
        try:
            return self._insert(
                volume_id=volume_id,
                project=project,
                name=name,
                pool=pool,
                size=size,
                source_id=source_id,
                quota=quota,
                lease_s=lease_s,
                image=image,
            )
        except sa.exc.IntegrityError:
            # Another replica inserted the same id or name between the checks and the insert.
            with self.db.transaction() as conn:
                row = conn.execute(sa.select(volumes).where(volumes.c.id == str(volume_id))).first()
            if row is not None and row.project == project:
                return _volume(row), False
            raise ServiceError(
                "conflict",
                f"a volume named {name!r} exists in project {project}",
                {"reason": "name_in_use", "field": "name"},
            ) from None

    def _insert(
        self,
        *,
        volume_id: uuid.UUID,
        project: str,
        name: str,
        pool: PoolRow,
        size: int,
        source_id: uuid.UUID | None,
        quota: VolumeQuota | None,
        lease_s: float,
        image: str | None,
    ) -> tuple[Volume, bool]:
        now = time.time()
        with self.db.transaction() as conn:
            # One create per project at a time across replicas: the quota check holds.
            advisory_xact_lock(conn, f"flotilla-storage-project:{project}")
            existing = conn.execute(
                sa.select(volumes).where(volumes.c.id == str(volume_id))
            ).first()
            if existing is not None:
                if existing.project != project:
                    raise ServiceError("conflict", f"volume id {volume_id} is taken")
                return _volume(existing), False
            taken = conn.execute(
                sa.select(volumes.c.id).where(volumes.c.project == project, volumes.c.name == name)
            ).first()
            if taken is not None:
                raise ServiceError(
                    "conflict",
                    f"a volume named {name!r} exists in project {project}",
                    {"reason": "name_in_use", "field": "name"},
                )
            if quota is not None:
                _check_quota(conn, project, quota, count=1, size=size)
            if size > pool.available:
                raise ServiceError(
                    "no_space",
                    f"{size} bytes asked, pool {pool.name} has {pool.available} free",
                    {"field": "size", "available": pool.available},
                )
            values: dict[str, Any] = {
                "id": str(volume_id),
                "project": project,
                "name": name,
                "pool": pool.name,
                "host": pool.host,
                "size": size,
                "state": "creating",
                "source_id": None if source_id is None else str(source_id),
                "image": image,
                "seq": 0,
                "lease_owner": self.replica,
                "lease_until": now + lease_s,
                "created_at": now,
                "updated_at": now,
            }
            conn.execute(sa.insert(volumes).values(**values))
            refresh_listing(conn, str(volume_id))
            row = _row(conn, volume_id, None)
        return _volume(row), True

    def ticket_of(self, volume_id: uuid.UUID) -> str | None:
        """The ticket of the volume's upload, if it is being created from one."""
        with self.db.transaction() as conn:
            row = conn.execute(
                sa.select(volumes.c.ticket).where(volumes.c.id == str(volume_id))
            ).first()
        return None if row is None else row.ticket

    def set_ticket(self, volume_id: uuid.UUID, ticket: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                sa.update(volumes).where(volumes.c.id == str(volume_id)).values(ticket=ticket)
            )

    def forget(self, volume_id: uuid.UUID) -> None:
        """Remove a volume that was never announced (its create was refused or undone)."""
        with self.db.transaction() as conn:
            conn.execute(
                sa.delete(volumes).where(
                    volumes.c.id == str(volume_id), volumes.c.state == "creating"
                )
            )

    def change(
        self,
        volume_id: uuid.UUID,
        values: dict[str, Any],
        event: Callable[[Volume], VolumeEvent] | None,
        cause: Cause | None,
        *,
        remove: bool = False,
        expect: tuple[str, ...] | None = None,
    ) -> Volume:
        """Apply `values` to the volume and put `event(volume after)` in the outbox with the
        volume's next seq, in one transaction; `remove` deletes the row after its event.
        With `expect`, only while the volume is in one of those states (read in the same
        transaction): else ServiceError(conflict), nothing changed and nothing announced."""
        with self.db.transaction() as conn:
            row = _row(conn, volume_id, None, for_update=True)
            if expect is not None and row.state not in expect:
                raise ServiceError(
                    "conflict",
                    f"volume {volume_id} is {row.state} now",
                    {"reason": "state", "state": row.state},
                )
            seq = row.seq + (1 if event is not None else 0)
            values = {**values, "seq": seq, "updated_at": time.time()}
            conn.execute(sa.update(volumes).where(volumes.c.id == str(volume_id)).values(values))
            refresh_listing(conn, str(volume_id))
            after = _volume(_row(conn, volume_id, None))
            if event is not None:
                self._enqueue(conn, event(after), cause)
            if remove:
                conn.execute(sa.delete(volumes).where(volumes.c.id == str(volume_id)))
        return after

    def guard(
        self,
        volume_id: uuid.UUID,
        project: str | None,
        *,
        states: tuple[str, ...],
        action: str,
        to_state: str | None = None,
        lease_s: float = 0.0,
        resize_quota: tuple[VolumeQuota, int] | None = None,
    ) -> Volume:
        """Check the volume may take `action` (its state is one of `states`), then take its
        lease and move it to `to_state`, in one transaction."""
        now = time.time()
        with self.db.transaction() as conn:
            row = _row(conn, volume_id, project, for_update=True)
            if row.state not in states:
                reason = "attached" if row.state == "attached" else "state"
                raise ServiceError(
                    "conflict",
                    f"volume {volume_id} is {row.state}: cannot {action} it",
                    {"reason": reason, "state": row.state},
                )
            if row.lease_until >= now and row.lease_owner not in (None, self.replica):
                raise ServiceError(
                    "conflict",
                    f"volume {volume_id} is busy with another operation",
                    {"reason": "busy", "state": row.state},
                )
            if resize_quota is not None:
                quota, size = resize_quota
                _check_quota(conn, row.project, quota, count=0, size=size - row.size)
            values: dict[str, Any] = {"lease_owner": self.replica, "lease_until": now + lease_s}
            if to_state is not None:
                values["state"] = to_state
            conn.execute(sa.update(volumes).where(volumes.c.id == str(volume_id)).values(values))
            if to_state is not None:
                refresh_listing(conn, str(volume_id))
            return _volume(_row(conn, volume_id, None))

    def attach(
        self, volume_id: uuid.UUID, project: str | None, attachment: Attachment, cause: Cause | None
    ) -> tuple[Volume, bool]:
        """Mark attached (event `volume.attached`); (volume, False) if it already was, to
        the same attachment. Refused while attached elsewhere or not available."""
        with self.db.transaction() as conn:
            row = _row(conn, volume_id, project, for_update=True)
            current = _volume(row)
            if current.attachment == attachment:
                return current, False
            if row.state != "available" or row.lease_owner is not None:
                raise ServiceError(
                    "conflict",
                    f"volume {volume_id} is {row.state}"
                    + (f" to domain {row.domain_id}" if row.domain_id else "")
                    + ": cannot attach it",
                    {"reason": "attached" if row.state == "attached" else "state"},
                )
            values = {
                "state": "attached",
                "domain_id": str(attachment.domain_id),
                "target": attachment.target,
                "readonly": attachment.readonly,
                "seq": row.seq + 1,
                "updated_at": time.time(),
            }
            conn.execute(sa.update(volumes).where(volumes.c.id == str(volume_id)).values(values))
            refresh_listing(conn, str(volume_id))
            after = _volume(_row(conn, volume_id, None))
            self._enqueue(
                conn,
                VolumeAttached(
                    **event_fields(after),
                    domain_id=attachment.domain_id,
                    target=attachment.target,
                    readonly=attachment.readonly,
                ),
                cause,
            )
        return after, True

    def detach(
        self, volume_id: uuid.UUID, project: str | None, domain_id: uuid.UUID, cause: Cause | None
    ) -> Volume:
        """Mark available (event `volume.detached`); detaching a volume that is not attached
        to `domain_id` is answered as it is when it is available, refused otherwise."""
        with self.db.transaction() as conn:
            row = _row(conn, volume_id, project, for_update=True)
            if row.state == "available":
                return _volume(row)
            if row.state != "attached" or row.domain_id != str(domain_id):
                raise ServiceError(
                    "conflict",
                    f"volume {volume_id} is not attached to domain {domain_id}",
                    {"reason": "state", "state": row.state},
                )
            values = {
                "state": "available",
                "domain_id": None,
                "target": None,
                "readonly": False,
                "seq": row.seq + 1,
                "updated_at": time.time(),
            }
            conn.execute(sa.update(volumes).where(volumes.c.id == str(volume_id)).values(values))
            refresh_listing(conn, str(volume_id))
            after = _volume(_row(conn, volume_id, None))
            self._enqueue(
                conn,
                VolumeDetached(**event_fields(after), domain_id=domain_id, target=row.target),
                cause,
            )
        return after

    # ---- outbox ------------------------------------------------------------------------------

    def enqueue(
        self, conn: Connection, event: VolumeEvent | ImageEvent, cause: Cause | None
    ) -> None:
        """Put `event` in the outbox within `conn`'s transaction."""
        self._enqueue(conn, event, cause)

    def _enqueue(
        self, conn: Connection, event: VolumeEvent | ImageEvent, cause: Cause | None
    ) -> None:
        cause = cause or Cause()
        envelope = envelope_for(
            event,
            source=f"storage:{self.replica}",
            correlation_id=cause.correlation_id,
            causation_id=cause.causation_id,
        )
        conn.execute(
            sa.insert(outbox).values(
                message_id=envelope.id, routing_key=event.routing_key(), body=pack(envelope)
            )
        )

    # ---- command replies (services.bus IdempotencyStore) --------------------------------------

    def reply_of(self, message_id: str, ttl_s: float) -> bytes | None:
        with self.db.transaction() as conn:
            row = conn.execute(
                sa.select(replies.c.reply).where(
                    replies.c.message_id == message_id, replies.c.ts > time.time() - ttl_s
                )
            ).first()
        return None if row is None else bytes(row.reply)

    def record_reply(self, message_id: str, reply: bytes) -> None:
        with self.db.transaction() as conn:
            stmt = upsert(conn, replies).values(message_id=message_id, reply=reply, ts=time.time())
            conn.execute(stmt.on_conflict_do_nothing(index_elements=[replies.c.message_id]))

    def expire_replies(self, ttl_s: float) -> int:
        with self.db.transaction() as conn:
            gone = conn.execute(sa.delete(replies).where(replies.c.ts < time.time() - ttl_s))
        return gone.rowcount


def event_fields(volume: Volume) -> dict[str, Any]:
    """The fields every volume event takes from the volume (after the change)."""
    return {
        "volume_id": volume.volume_id,
        "pool": volume.pool,
        "host": volume.host or "",
        "seq": volume.seq,
        "size": volume.size,
        "project": volume.project,
        "name": volume.name,
    }


def moved_from(source: str) -> Callable[[Volume], VolumeEvent]:
    """The event of a volume the catalog now names another host for (`Catalog.change`)."""
    return lambda after: VolumeMoved(**event_fields(after), from_host=source)


def _check_quota(
    conn: Connection, project: str, quota: VolumeQuota, *, count: int, size: int
) -> None:
    used_count, used_bytes = conn.execute(
        sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(volumes.c.size), 0)).where(
            volumes.c.project == project
        )
    ).one()
    if count and quota.volumes is not None and used_count + count > quota.volumes:
        raise ServiceError(
            "over_quota",
            f"project {project} has {used_count} of {quota.volumes} volumes",
            {"resource": "volumes", "limit": quota.volumes, "used": used_count, "requested": 1},
        )
    used_gib = -(-int(used_bytes) // GiB)
    wanted_gib = -(-(int(used_bytes) + size) // GiB)
    if size > 0 and quota.gib is not None and wanted_gib > quota.gib:
        raise ServiceError(
            "over_quota",
            f"project {project} uses {used_gib} of {quota.gib} GiB of volumes",
            {
                "resource": "gib",
                "limit": quota.gib,
                "used": used_gib,
                "requested": wanted_gib - used_gib,
            },
        )


def _row(
    conn: Connection, volume_id: uuid.UUID, project: str | None, *, for_update: bool = False
) -> Any:
    query = sa.select(volumes).where(volumes.c.id == str(volume_id))
    if for_update and conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None or (project is not None and row.project != project):
        raise ServiceError("not_found", f"no volume {volume_id}")
    return row


def _volume(row: Any) -> Volume:
    attachment = (
        None
        if row.domain_id is None
        else Attachment(domain_id=row.domain_id, target=row.target, readonly=row.readonly)
    )
    return Volume.model_construct(
        volume_id=uuid.UUID(row.id),
        project=row.project,
        name=row.name,
        pool=row.pool,
        host=row.host,
        size=row.size,
        state=row.state,
        attachment=attachment,
        source_id=None if row.source_id is None else uuid.UUID(row.source_id),
        image=row.image,
        fault=row.fault,
        seq=row.seq,
        created_at=row.created_at,
    )
