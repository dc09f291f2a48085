"""The storage service's handlers: the closed command set of protos.volumes on the catalog.

Each operation reads top to bottom: check and mark the volume in the catalog (under this
replica's lease), have the file work done (services.storage.backends), then record the
result and its event in one transaction. A definite refusal undoes the mark (a create leaves
no row, no file); an unknown outcome (the host did not answer) leaves the volume mid-state
under a lease that runs out, for `reconcile()` to settle against the host's files.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import structlog

from protos.host import HostHeartbeat
from protos.storage import SECTOR, VolumeCreated, VolumeDeleted, VolumeResized
from protos.volumes import (
    AttachVolume,
    CreateVolume,
    DeleteVolume,
    DetachVolume,
    GetPool,
    GetVolume,
    ListPools,
    ListVolumeListing,
    ListVolumes,
    Pool,
    Pools,
    ResizeVolume,
    Volume,
    VolumeListing,
    VolumePage,
    WipeVolume,
)
from services.bus import Bus, Context, Service, ServiceError, handles, on_event
from services.storage.backends import AgentBackend, LocalBackend, PoolBackend, Unreachable
from services.storage.catalog import Catalog, event_fields
from services.storage.config import StorageConfig
from services.storage.images import ImageHandlers
from services.storage.live_moves import LiveMoveHandlers
from services.storage.moves import MoveHandlers
from services.storage.uploads import UploadHandlers

log = structlog.get_logger("flotilla.storage")
_KEYS = uuid.UUID("6c1f0a4e-58a4-4d0b-9a43-2b7e3c5f1d20")
POOL_REFRESH_S = 30.0
# How long an agent's answer about its pools vouches for its host (its heartbeats then do).
POOL_LIVE_S = 15.0
# The least a heartbeat keeps its host's pools up: three intervals of a fast heartbeat
# (tests beat every 0.3 s) are shorter than a busy host's scheduling stalls.
POOL_LIVE_MIN_S = 3.0


def step_key(ctx: Context, step: str) -> str:
    """The message id of a command's call to an agent: the same for a redelivered copy of
    the command, so the agent answers it from its record instead of running it again."""
    return str(uuid.uuid5(_KEYS, f"{ctx.envelope.id}/{step}"))


class Leases:
    """The volumes this replica is working on; a thread renews their leases in the catalog
    every third of `lease_s`, so reconcile (here or in another replica) leaves them alone."""

    def __init__(self, catalog: Catalog, lease_s: float) -> None:
        self.catalog = catalog
        self.lease_s = lease_s
        self._held: Counter[uuid.UUID] = Counter()
        self._kept: set[uuid.UUID] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="storage-leases", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(5)

    @contextmanager
    def hold(self, volume_id: uuid.UUID) -> Iterator[None]:
        with self._lock:
            self._held[volume_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._held[volume_id] -= 1
                if self._held[volume_id] <= 0:
                    del self._held[volume_id]

    def keep(self, volume_id: uuid.UUID) -> None:
        """Renew the volume's lease from now on, past this call (a live migration's move,
        until its commit or abort): once however often it is asked."""
        with self._lock:
            self._kept.add(volume_id)

    def drop(self, volume_id: uuid.UUID) -> None:
        with self._lock:
            self._kept.discard(volume_id)

    def _run(self) -> None:
        while not self._stopping.wait(self.lease_s / 3):
            with self._lock:
                held, kept = list(self._held), list(self._kept)
            try:
                self.catalog.renew(held, self.lease_s)
                self.catalog.renew(kept, self.lease_s, self.catalog.move_owner)
            except Exception as exc:  # the database is away: the next round retries
                log.warning("leases not renewed", error=str(exc))


class StorageService(ImageHandlers, UploadHandlers, MoveHandlers, LiveMoveHandlers, Service):
    name = "storage"

    def __init__(
        self,
        config: StorageConfig,
        catalog: Catalog,
        bus: Bus | None,
        local: LocalBackend,
        notify: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.bus = bus
        self.local = local
        self.notify = notify  # wakes the outbox publisher after a commit
        self.leases = Leases(catalog, config.lease_s)
        self._agents: dict[str, AgentBackend] = {}
        self._refreshed: dict[str, float] = {}
        self._refresh_lock = threading.Lock()

    # ---- pools ---------------------------------------------------------------------------------

    def backend(self, host: str | None) -> PoolBackend:
        if host is None:
            return self.local
        agent = self._agents.get(host)
        if agent is None:
            if self.bus is None:
                raise ServiceError("unavailable", f"no broker to reach host {host}")
            agent = AgentBackend(
                self.bus, host, self.config.rpc_timeout_s, self.config.long_timeout_s
            )
            self._agents[host] = agent
        return agent

    def agent(self, host: str) -> AgentBackend:
        backend = self.backend(host)
        assert isinstance(backend, AgentBackend)
        return backend

    def refresh_local_pools(self) -> None:
        for info in self.local.pool_infos():
            self.catalog.put_pool(info, None)

    def refresh_host_pools(self, host: str, live_s: float = POOL_LIVE_S) -> None:
        """Ask `host`'s storage agent for its pools and record them, the host live for
        `live_s` more seconds (a shared pool served here keeps its own record)."""
        backend = self.backend(host)
        assert isinstance(backend, AgentBackend)
        for info in backend.pools():
            if info.name in self.local.pools:
                continue
            self.catalog.put_pool(info, host, live_s)

    @on_event("host.heartbeat.*")
    def heartbeat(self, event: HostHeartbeat, _ctx: Context) -> None:
        """Learn (every POOL_REFRESH_S) the pools of a host whose heartbeat arrives; a host
        whose agent did not answer is asked again at its next heartbeat."""
        now = time.monotonic()
        with self._refresh_lock:
            fresh = now - self._refreshed.get(event.host, -POOL_REFRESH_S) < POOL_REFRESH_S
            if not fresh:
                self._refreshed[event.host] = now
        # Down after 3 missed heartbeats, as the scheduler counts (and never sooner than
        # POOL_LIVE_MIN_S): no new volume there then.
        live_s = max(3 * event.interval_s, POOL_LIVE_MIN_S)
        if fresh:
            self.catalog.host_live(event.host, live_s)
            return
        try:
            self.refresh_host_pools(event.host, live_s)
        except ServiceError as exc:
            with self._refresh_lock:
                self._refreshed.pop(event.host, None)
            log.warning("pools of host not refreshed", host=event.host, error=exc.message)

    @handles(ListPools)
    def pool_list(self, _cmd: ListPools, _ctx: Context) -> Pools:
        return Pools(pools=self.catalog.pools())

    @handles(GetPool)
    def pool_info(self, cmd: GetPool, _ctx: Context) -> Pool:
        for pool in self.catalog.pools():
            if pool.name == cmd.pool:
                return pool
        raise ServiceError("not_found", f"no pool {cmd.pool!r}", {"field": "pool"})

    # ---- volumes -------------------------------------------------------------------------------

    @handles(GetVolume)
    def volume_info(self, cmd: GetVolume, _ctx: Context) -> Volume:
        return self.catalog.get(cmd.volume_id, cmd.project)

    @handles(ListVolumes)
    def volume_list(self, cmd: ListVolumes, _ctx: Context) -> VolumePage:
        return self.catalog.page_wire(cmd.project, cmd.pool, cmd.limit, cmd.after)

    @handles(ListVolumeListing)
    def volume_listing(self, cmd: ListVolumeListing, _ctx: Context) -> VolumeListing:
        return self.catalog.listing(cmd.project, cmd.pool, cmd.limit, cmd.after, cmd.hosts)

    @handles(CreateVolume)
    def volume_create(self, cmd: CreateVolume, ctx: Context) -> Volume:
        if cmd.image_id is not None:
            return self._volume_from_image(cmd, ctx)
        source: Volume | None = None
        pool_name = cmd.pool
        if cmd.source_id is not None:
            source = self.catalog.get(cmd.source_id, cmd.project)
            if source.state not in ("available", "attached"):
                raise ServiceError(
                    "conflict",
                    f"volume {source.volume_id} is {source.state}: it cannot be cloned",
                    {"reason": "state", "field": "source_id"},
                )
            if pool_name is not None and pool_name != source.pool:
                raise ServiceError(
                    "invalid",
                    f"a clone is made in its source's pool ({source.pool}), not {pool_name}",
                    {"field": "pool"},
                )
            pool_name = source.pool
        size = cmd.size if cmd.size is not None else (source.size if source else None)
        if size is None:
            raise ServiceError("invalid", "size: required for an empty volume", {"field": "size"})
        if source is not None and size < source.size:
            raise ServiceError(
                "invalid",
                f"size: a clone is at least its source's {source.size} bytes",
                {"field": "size"},
            )
        pool = self.catalog.pool(pool_name or self.config.default_pool)
        volume, new = self.catalog.begin_create(
            volume_id=cmd.volume_id,
            project=cmd.project,
            name=cmd.name,
            pool=pool,
            size=size,
            source_id=cmd.source_id,
            quota=cmd.quota,
            lease_s=self.config.lease_s,
        )
        if not new and (
            volume.state != "creating"
            or not self.catalog.take_lease(volume.volume_id, self.config.lease_s)
        ):
            return volume  # done already, or a copy of this command is still at work
        with self.leases.hold(volume.volume_id):
            return self._make_file(volume, size, ctx)

    def _volume_from_image(self, cmd: CreateVolume, ctx: Context) -> Volume:
        """A volume cloned from a disk image, in the image's pool (on its host)."""
        assert cmd.image_id is not None
        image = self.images.get(cmd.image_id, cmd.project)
        if image.state != "available" or image.sha256 is None or image.size is None:
            raise ServiceError(
                "conflict", f"image {image.name!r} is {image.state}", {"field": "image_id"}
            )
        if image.kind != "disk":
            raise ServiceError(
                "invalid",
                f"image {image.name!r} is a {image.kind} image, not a disk",
                {"field": "image_id"},
            )
        if cmd.pool is not None and cmd.pool != image.pool:
            raise ServiceError(
                "invalid",
                f"a volume from image {image.name!r} is made in its pool ({image.pool})",
                {"field": "pool"},
            )
        least = -(-image.size // SECTOR) * SECTOR
        size = cmd.size if cmd.size is not None else least
        if size < least:
            raise ServiceError(
                "invalid",
                f"size: image {image.name!r} is {image.size} bytes; the volume cannot be smaller",
                {"field": "size"},
            )
        volume, new = self.catalog.begin_create(
            volume_id=cmd.volume_id,
            project=cmd.project,
            name=cmd.name,
            pool=self.catalog.pool_on(image.pool, image.host),
            size=size,
            source_id=None,
            quota=cmd.quota,
            lease_s=self.config.lease_s,
            image=image.sha256,
        )
        if not new and (
            volume.state != "creating"
            or not self.catalog.take_lease(volume.volume_id, self.config.lease_s)
        ):
            return volume
        with self.leases.hold(volume.volume_id):
            return self._make_file(volume, size, ctx)

    def _make_file(self, volume: Volume, size: int, ctx: Context) -> Volume:
        backend = self.backend(volume.host)
        made = False
        try:
            if volume.image is not None:
                got = backend.from_image(
                    volume.pool, volume.volume_id, volume.image, size, step_key(ctx, "image")
                )
            elif volume.source_id is not None:
                got = backend.clone(
                    volume.pool, volume.volume_id, volume.source_id, step_key(ctx, "clone")
                )
                made = True
                if got < size:
                    got = backend.resize(volume.pool, volume.volume_id, size, step_key(ctx, "grow"))
            else:
                got = backend.create(volume.pool, volume.volume_id, size, step_key(ctx, "create"))
        except Unreachable:
            self.catalog.release(volume.volume_id)  # reconcile settles it
            raise
        except ServiceError as exc:
            undone = True
            if made or exc.details.get("reason") == "exists":
                undone = self._undo_file(backend, volume)
            if undone:
                self.catalog.forget(volume.volume_id)
            else:
                # A file may be left on the host: keep the volume, in `error`, to delete.
                self.catalog.change(
                    volume.volume_id,
                    {"state": "error", "fault": exc.message, "lease_owner": None, "lease_until": 0},
                    None,
                    None,
                )
            raise
        after = self.catalog.change(
            volume.volume_id,
            {"state": "available", "size": got, "lease_owner": None, "lease_until": 0},
            lambda v: VolumeCreated(**event_fields(v), source_id=v.source_id),
            ctx.cause,
        )
        self.notify()
        log.info("volume created", volume_id=str(volume.volume_id), pool=volume.pool)
        return after

    def _undo_file(self, backend: PoolBackend, volume: Volume) -> bool:
        """Remove a file a failed create made; whether it is gone."""
        try:
            backend.delete(volume.pool, volume.volume_id, None)
        except ServiceError as exc:
            if exc.code != "not_found":
                log.warning("undo left a file", volume_id=str(volume.volume_id), error=exc.message)
                return False
        return True

    @handles(DeleteVolume)
    def volume_delete(self, cmd: DeleteVolume, ctx: Context) -> Volume:
        volume = self.catalog.guard(
            cmd.volume_id,
            cmd.project,
            states=("available", "error", "deleting"),
            action="delete",
            to_state="deleting",
            lease_s=self.config.lease_s,
        )
        with self.leases.hold(volume.volume_id):
            try:
                self._delete_file(volume, step_key(ctx, "delete"))
            except Unreachable:
                self.catalog.release(volume.volume_id)
                raise
            except ServiceError:
                # Refused (a guest holds the file): the volume is as it was.
                self.catalog.change(
                    volume.volume_id,
                    {"state": "available", "lease_owner": None, "lease_until": 0},
                    None,
                    None,
                )
                raise
            return self._forget_deleted(volume.volume_id, ctx)

    def _delete_file(self, volume: Volume, key: str | None) -> None:
        try:
            self.backend(volume.host).delete(volume.pool, volume.volume_id, key)
        except ServiceError as exc:
            if exc.code != "not_found" or isinstance(exc, Unreachable):
                raise

    def _forget_deleted(self, volume_id: uuid.UUID, ctx: Context | None) -> Volume:
        after = self.catalog.change(
            volume_id,
            {"state": "deleting"},
            lambda v: VolumeDeleted(**event_fields(v)),
            None if ctx is None else ctx.cause,
            remove=True,
        )
        self.notify()
        log.info("volume deleted", volume_id=str(volume_id))
        return after

    @handles(ResizeVolume)
    def volume_resize(self, cmd: ResizeVolume, ctx: Context) -> Volume:
        current = self.catalog.get(cmd.volume_id, cmd.project)
        if cmd.size < current.size:
            raise ServiceError(
                "conflict",
                f"volume {cmd.volume_id} is {current.size} bytes: shrinking is refused",
                {"reason": "shrink", "field": "size"},
            )
        if cmd.size == current.size:
            return current
        volume = self.catalog.guard(
            cmd.volume_id,
            cmd.project,
            states=("available", "attached"),
            action="resize",
            lease_s=self.config.lease_s,
            resize_quota=None if cmd.quota is None else (cmd.quota, cmd.size),
        )
        with self.leases.hold(volume.volume_id):
            try:
                got = self.backend(volume.host).resize(
                    volume.pool, volume.volume_id, cmd.size, step_key(ctx, "resize")
                )
            finally:
                self.catalog.release(volume.volume_id)
            previous = volume.size
            after = self.catalog.change(
                volume.volume_id,
                {"size": got},
                lambda v: VolumeResized(**event_fields(v), previous_size=previous),
                ctx.cause,
            )
        self.notify()
        return after

    @handles(WipeVolume)
    def volume_wipe(self, cmd: WipeVolume, ctx: Context) -> Volume:
        volume = self.catalog.guard(
            cmd.volume_id,
            cmd.project,
            states=("available",),
            action="wipe",
            lease_s=self.config.lease_s,
        )
        with self.leases.hold(volume.volume_id):
            try:
                self.backend(volume.host).wipe(volume.pool, volume.volume_id, step_key(ctx, "wipe"))
            finally:
                self.catalog.release(volume.volume_id)
        return self.catalog.get(volume.volume_id, None)

    @handles(AttachVolume)
    def volume_attach(self, cmd: AttachVolume, ctx: Context) -> Volume:
        volume, changed = self.catalog.attach(cmd.volume_id, cmd.project, cmd.attachment, ctx.cause)
        if changed:
            self.notify()
        return volume

    @handles(DetachVolume)
    def volume_detach(self, cmd: DetachVolume, ctx: Context) -> Volume:
        volume = self.catalog.detach(cmd.volume_id, cmd.project, cmd.domain_id, ctx.cause)
        self.notify()
        return volume

    # ---- reconcile -----------------------------------------------------------------------------

    def reconcile(self) -> dict[uuid.UUID, str]:
        """Settle every volume left mid-state by a replica that died (its lease ran out)
        against its host's files: a `creating` volume whose file exists becomes available
        (and is announced); one without is removed from its host (an operation still at work
        there is waited for) and from the catalog; a `deleting` one is deleted. What it did,
        per volume; a host that does not answer is tried again next time."""
        done: dict[uuid.UUID, str] = {}
        for volume in self.catalog.stuck():
            if not self.catalog.take_lease(volume.volume_id, self.config.lease_s):
                continue
            with self.leases.hold(volume.volume_id):
                try:
                    done[volume.volume_id] = self._settle(volume)
                except ServiceError as exc:
                    self.catalog.release(volume.volume_id)
                    log.warning(
                        "volume not settled yet", volume_id=str(volume.volume_id), error=exc.message
                    )
        if done:
            log.info("volumes reconciled", settled={str(k): v for k, v in done.items()})
        self.reconcile_images()
        return done

    def _settle(self, volume: Volume) -> str:
        backend = self.backend(volume.host)
        if volume.state == "deleting":
            self._delete_file(volume, None)
            self._forget_deleted(volume.volume_id, None)
            return "deleted"
        ticket = self.catalog.ticket_of(volume.volume_id)
        if ticket is not None and backend.transfer_result(ticket).state == "running":
            return "uploading"  # its stream still arrives: settled once it ended
        size = backend.size(volume.pool, volume.volume_id)
        if size is not None:
            self.catalog.change(
                volume.volume_id,
                {
                    "state": "available",
                    "size": size,
                    "ticket": None,
                    "lease_owner": None,
                    "lease_until": 0,
                },
                lambda v: VolumeCreated(**event_fields(v), source_id=v.source_id),
                None,
                expect=("creating",),  # an upload's end may have recorded it meanwhile
            )
            self.notify()
            return "created"
        # No file: remove whatever an operation still at work there publishes (the agent
        # runs the delete after it, under the volume's lock), then the row.
        self._delete_file(volume, None)
        self.catalog.forget(volume.volume_id)
        return "removed"
