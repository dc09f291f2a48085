"""The storage agent: the file work of this host's pools over the bus (`storage.<host>`).

A closed command set (protos.storage) on the file layer (compute_node.storage). Each volume
command holds the volume's lock for the file work and the event it produces, so a volume's
events leave in the order its changes happened, each with the next `seq` (compute_node.store,
the same outbox as domain events). Refusals are `ErrorReply`s (`invalid`, `not_found`,
`conflict` with `details.reason`, `no_space`); nothing half-done stays in a pool: a temp file
a killed operation left is removed by `reconcile()` when the agent starts, and a command the
broker delivers again after a kill finishes what its first copy did without announcing
(the file made or removed, the event not yet in the outbox).
"""

from __future__ import annotations

import os
import stat
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import structlog

from compute_node.config import PoolConfig
from compute_node.storage import ImageStore, Pool, StorageError, VolumeStore
from compute_node.storage_transfer import TransferServer, image_check, job_for, push_volume
from compute_node.store import Store
from protos.images import (
    CreateVolumeFromImage,
    DeleteImageFile,
    GetImageFile,
    GetTransferResult,
    ImageFile,
    ImageFiles,
    ImportImageFile,
    ListImageFiles,
    OpenTransfer,
    PushVolume,
    TransferResult,
    TransferTicket,
)
from protos.storage import (
    CloneVolume,
    CreateVolume,
    DeleteVolume,
    GetPoolInfo,
    GetVolumeInfo,
    ListPools,
    ListVolumes,
    PoolCapabilities,
    PoolInfo,
    PoolList,
    ResizeVolume,
    VolumeCreated,
    VolumeDeleted,
    VolumeEvent,
    VolumeInfo,
    VolumeList,
    VolumeResized,
    WipeVolume,
)
from services.bus import Cause, Context, Service, ServiceError, handles

log = structlog.get_logger("flotilla.compute.storage")

# The file layer's codes → the ErrorReply code a caller branches on (docs/storage.md).
ERROR_CODES: dict[str, str] = {
    "invalid_name": "invalid",
    "invalid_size": "invalid",
    "truncated": "invalid",
    "checksum_mismatch": "invalid",
    "bad_image": "invalid",
    "not_found": "not_found",
    "exists": "conflict",
    "busy": "conflict",
    "shrink_refused": "conflict",
    "no_space": "no_space",
    "io_error": "internal",
}
# `details.reason` of a conflict, in the agent's words.
CONFLICT_REASONS = {"exists": "exists", "busy": "busy", "shrink_refused": "shrink"}


class StorageAgent(Service):
    name = "storage-agent"

    def __init__(
        self,
        host: str,
        store: Store,
        pools: list[PoolConfig],
        transfers: TransferServer | None = None,
    ) -> None:
        self.host = host
        self.store = store
        self.transfers = transfers  # byte streams in and out (storage_transfer.py)
        self.pools: dict[str, Pool] = {}
        for config in pools:
            if config.kind == "dir" and not config.path.exists():
                config.path.mkdir(parents=True, mode=0o700)
            try:
                self.pools[config.name] = Pool(config.path, config.kind)
            except StorageError as exc:
                raise ValueError(f"pool {config.name}: {exc.message}") from None
        self._locks: defaultdict[tuple[str, uuid.UUID], threading.Lock] = defaultdict(
            threading.Lock
        )
        self._locks_guard = threading.Lock()

    def reconcile(self) -> dict[str, list[str]]:
        """Remove what operations killed mid-way left in each pool; the names removed, per
        pool (logged with the pool's name). Run before serving."""
        removed: dict[str, list[str]] = {}
        for name, pool in self.pools.items():
            gone = pool.reconcile()
            if gone:
                log.info("pool reconciled", pool=name, removed=gone)
            removed[name] = gone
        return removed

    # ---- helpers ---------------------------------------------------------------------------

    def _pool(self, name: str) -> Pool:
        pool = self.pools.get(name)
        if pool is None:
            raise ServiceError("not_found", f"no pool {name!r} on host {self.host}")
        return pool

    @contextmanager
    def _volume(self, pool: str, volume_id: uuid.UUID) -> Iterator[VolumeStore]:
        """The pool's volumes, holding `volume_id`'s lock; file-layer errors become replies."""
        store = VolumeStore(self._pool(pool))
        with self._locks_guard:
            lock = self._locks[(pool, volume_id)]
        with lock, _replies():
            yield store

    def _info(self, pool: str, volumes: VolumeStore, volume_id: uuid.UUID) -> VolumeInfo:
        volume = volumes.info(str(volume_id))
        return VolumeInfo(
            volume_id=volume_id,
            pool=pool,
            host=self.host,
            size=volume.size,
            allocation=volume.allocated,
            seq=self.store.volume_seq(volume_id),
        )

    def _finish_create(
        self,
        pool: str,
        volumes: VolumeStore,
        volume_id: uuid.UUID,
        ctx: Context,
        *,
        source_id: uuid.UUID | None = None,
        announce: bool = True,
    ) -> VolumeInfo | None:
        """For a create or clone the broker delivers again (its first copy died before its
        ack) that finds its volume made: the volume, announced now if the first copy died
        before its event. None when there is nothing to finish."""
        if not ctx.redelivered or not os.path.lexists(volumes.pool.volume_path(str(volume_id))):
            return None
        _, last, _ = self.store.volume_last(volume_id)
        if announce and last in ("", VolumeDeleted.TYPE):
            log.info("finishing an interrupted create", volume_id=str(volume_id))
            size = volumes.info(str(volume_id)).size
            self.store.emit_volume(
                volume_id,
                lambda seq: VolumeCreated(
                    volume_id=volume_id,
                    pool=pool,
                    host=self.host,
                    seq=seq,
                    size=size,
                    source_id=source_id,
                ),
                ctx.cause,
            )
        return self._info(pool, volumes, volume_id)

    def _emit(
        self,
        announce: bool,
        volume_id: uuid.UUID,
        make: Callable[[int], VolumeEvent],
        cause: Cause | None,
    ) -> None:
        """Put the volume's event in the outbox, unless the caller (the storage service)
        announces the change itself."""
        if announce:
            self.store.emit_volume(volume_id, make, cause)

    def _pool_info(self, name: str) -> PoolInfo:
        pool = self._pool(name)
        usage = pool.usage()
        return PoolInfo(
            name=name,
            kind=pool.kind,
            host=self.host,
            capacity=usage.capacity,
            allocation=usage.allocation,
            available=usage.available,
            capabilities=PoolCapabilities(
                reflink=pool.capabilities.reflink, punch_hole=pool.capabilities.punch_hole
            ),
        )

    # ---- pools -------------------------------------------------------------------------------

    @handles(GetPoolInfo)
    def pool_info(self, cmd: GetPoolInfo, _ctx: Context) -> PoolInfo:
        return self._pool_info(cmd.pool)

    @handles(ListPools)
    def pool_list(self, _cmd: ListPools, _ctx: Context) -> PoolList:
        return PoolList(pools=[self._pool_info(name) for name in sorted(self.pools)])

    # ---- volumes -----------------------------------------------------------------------------

    @handles(CreateVolume)
    def volume_create(self, cmd: CreateVolume, ctx: Context) -> VolumeInfo:
        with self._volume(cmd.pool, cmd.volume_id) as volumes:
            finished = self._finish_create(
                cmd.pool, volumes, cmd.volume_id, ctx, announce=cmd.announce
            )
            if finished is not None:
                return finished
            created = volumes.create(str(cmd.volume_id), cmd.size)
            self._emit(
                cmd.announce,
                cmd.volume_id,
                lambda seq: VolumeCreated(
                    volume_id=cmd.volume_id,
                    pool=cmd.pool,
                    host=self.host,
                    seq=seq,
                    size=created.size,
                ),
                ctx.cause,
            )
            return self._info(cmd.pool, volumes, cmd.volume_id)

    @handles(CloneVolume)
    def volume_clone(self, cmd: CloneVolume, ctx: Context) -> VolumeInfo:
        if cmd.source_id == cmd.volume_id:
            raise ServiceError("invalid", "a volume cannot be cloned onto itself")
        with self._volume(cmd.pool, cmd.volume_id) as volumes:
            finished = self._finish_create(
                cmd.pool,
                volumes,
                cmd.volume_id,
                ctx,
                source_id=cmd.source_id,
                announce=cmd.announce,
            )
            if finished is not None:
                return finished
            cloned = volumes.clone(str(cmd.source_id), str(cmd.volume_id))
            self._emit(
                cmd.announce,
                cmd.volume_id,
                lambda seq: VolumeCreated(
                    volume_id=cmd.volume_id,
                    pool=cmd.pool,
                    host=self.host,
                    seq=seq,
                    size=cloned.volume.size,
                    source_id=cmd.source_id,
                    method=cloned.method,
                ),
                ctx.cause,
            )
            return self._info(cmd.pool, volumes, cmd.volume_id)

    @handles(ResizeVolume)
    def volume_resize(self, cmd: ResizeVolume, ctx: Context) -> VolumeInfo:
        with self._volume(cmd.pool, cmd.volume_id) as volumes:
            before = volumes.info(str(cmd.volume_id)).size
            after = volumes.grow(str(cmd.volume_id), cmd.size)
            if after.size != before:  # the same size again: nothing happened, no event
                self._emit(
                    cmd.announce,
                    cmd.volume_id,
                    lambda seq: VolumeResized(
                        volume_id=cmd.volume_id,
                        pool=cmd.pool,
                        host=self.host,
                        seq=seq,
                        size=after.size,
                        previous_size=before,
                    ),
                    ctx.cause,
                )
            return self._info(cmd.pool, volumes, cmd.volume_id)

    @handles(DeleteVolume)
    def volume_delete(self, cmd: DeleteVolume, ctx: Context) -> None:
        with self._volume(cmd.pool, cmd.volume_id) as volumes:
            _, last, size = self.store.volume_last(cmd.volume_id)
            exists = os.path.lexists(volumes.pool.volume_path(str(cmd.volume_id)))
            if ctx.redelivered and not exists and last not in ("", VolumeDeleted.TYPE):
                # A copy of this command deleted the file and died before announcing it.
                log.info("finishing an interrupted delete", volume_id=str(cmd.volume_id))
            else:
                size = volumes.info(str(cmd.volume_id)).size
                volumes.delete(str(cmd.volume_id))
            self._emit(
                cmd.announce,
                cmd.volume_id,
                lambda seq: VolumeDeleted(
                    volume_id=cmd.volume_id, pool=cmd.pool, host=self.host, seq=seq, size=size
                ),
                ctx.cause,
            )

    @handles(WipeVolume)
    def volume_wipe(self, cmd: WipeVolume, _ctx: Context) -> VolumeInfo:
        with self._volume(cmd.pool, cmd.volume_id) as volumes:
            how = volumes.wipe(str(cmd.volume_id))
            log.info("volume wiped", volume_id=str(cmd.volume_id), pool=cmd.pool, how=how)
            return self._info(cmd.pool, volumes, cmd.volume_id)

    @handles(GetVolumeInfo)
    def volume_info(self, cmd: GetVolumeInfo, _ctx: Context) -> VolumeInfo:
        with _replies():
            return self._info(cmd.pool, VolumeStore(self._pool(cmd.pool)), cmd.volume_id)

    @handles(ListVolumes)
    def volume_list(self, cmd: ListVolumes, _ctx: Context) -> VolumeList:
        volumes = VolumeStore(self._pool(cmd.pool))
        found = []
        with _replies():
            for volume in volumes.list():
                try:
                    volume_id = uuid.UUID(volume.name)
                except ValueError:
                    continue  # not a file this agent made (its names are UUIDs)
                if str(volume_id) != volume.name:
                    continue
                found.append(
                    VolumeInfo(
                        volume_id=volume_id,
                        pool=cmd.pool,
                        host=self.host,
                        size=volume.size,
                        allocation=volume.allocated,
                        seq=self.store.volume_seq(volume_id),
                    )
                )
        return VolumeList(volumes=found)

    # ---- images and transfers ------------------------------------------------------------------

    @handles(OpenTransfer)
    def transfer_open(self, cmd: OpenTransfer, _ctx: Context) -> TransferTicket:
        return open_transfer(self.transfers, self._pool(cmd.pool), cmd, self.host)

    @handles(PushVolume)
    def volume_push(self, cmd: PushVolume, _ctx: Context) -> TransferResult:
        with _replies():
            return push_volume(self._pool(cmd.pool), cmd)

    @handles(GetTransferResult)
    def transfer_result(self, cmd: GetTransferResult, _ctx: Context) -> TransferResult:
        if self.transfers is None:
            return TransferResult(state="unknown")
        return self.transfers.result(cmd.ticket)

    @handles(ImportImageFile)
    def image_import_file(self, cmd: ImportImageFile, _ctx: Context) -> TransferResult:
        return import_file(self._pool(cmd.pool), cmd)

    @handles(GetImageFile)
    def image_info(self, cmd: GetImageFile, _ctx: Context) -> ImageFile:
        with _replies():
            path = ImageStore(self._pool(cmd.pool)).path(cmd.sha256)
            return ImageFile(pool=cmd.pool, sha256=cmd.sha256, size=path.lstat().st_size)

    @handles(ListImageFiles)
    def image_list(self, cmd: ListImageFiles, _ctx: Context) -> ImageFiles:
        with _replies():
            found = ImageStore(self._pool(cmd.pool)).list()
        return ImageFiles(
            images=[ImageFile(pool=cmd.pool, sha256=i.sha256, size=i.size) for i in found]
        )

    @handles(DeleteImageFile)
    def image_delete(self, cmd: DeleteImageFile, _ctx: Context) -> None:
        images = ImageStore(self._pool(cmd.pool))
        try:
            with _replies():
                images.delete(cmd.sha256)
        except ServiceError as exc:
            if exc.code != "not_found":  # gone already: a delete again is done
                raise

    @handles(CreateVolumeFromImage)
    def volume_from_image(self, cmd: CreateVolumeFromImage, ctx: Context) -> VolumeInfo:
        with self._volume(cmd.pool, cmd.volume_id) as volumes:
            finished = self._finish_create(cmd.pool, volumes, cmd.volume_id, ctx, announce=False)
            if finished is not None:
                return finished
            cloned = volumes.create_from_image(str(cmd.volume_id), cmd.sha256, cmd.size)
            log.info("volume from image", volume_id=str(cmd.volume_id), method=cloned.method)
            return self._info(cmd.pool, volumes, cmd.volume_id)


def open_transfer(
    transfers: TransferServer | None, pool: Pool, cmd: OpenTransfer, host: str
) -> TransferTicket:
    """A ticket for `cmd`'s stream; refusals before any byte moves (no server, a volume
    that exists for an upload or is missing for a download, no room for `size`)."""
    if transfers is None:
        raise ServiceError("unavailable", f"host {host} takes no transfers")
    try:
        job = job_for(pool, cmd)
    except ValueError as exc:
        raise ServiceError("invalid", str(exc)) from None
    with _replies():
        if cmd.volume_id is not None:
            exists = os.path.lexists(pool.volume_path(str(cmd.volume_id)))
            if cmd.op == "volume_upload" and exists:
                raise ServiceError(
                    "conflict", f"volume {cmd.volume_id} exists", {"reason": "exists"}
                )
            if cmd.op == "volume_download" and not exists:
                raise ServiceError("not_found", f"no volume {cmd.volume_id}")
        if cmd.size is not None and cmd.op != "volume_download":
            pool.check_space(cmd.size, cmd.op.replace("_", " "))
    return transfers.issue(job)


def import_file(pool: Pool, cmd: ImportImageFile) -> TransferResult:
    """Import the host file `cmd.path` into the pool's image store."""
    try:
        fd = os.open(cmd.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ServiceError(
            "invalid", f"cannot open {cmd.path}: {exc.strerror}", {"field": "path"}
        ) from None
    with os.fdopen(fd, "rb") as source:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ServiceError("invalid", f"{cmd.path} is not a regular file", {"field": "path"})
        with _replies():
            image = ImageStore(pool).import_image(
                source, format=cmd.format, check=image_check(cmd.kind)
            )
    return TransferResult(
        state="done",
        size=image.size,
        sha256=image.sha256,
        source_format=image.source_format,
        deduplicated=image.deduplicated,
    )


@contextmanager
def _replies() -> Iterator[None]:
    """A file-layer refusal as the ServiceError the caller gets."""
    try:
        yield
    except StorageError as exc:
        code = ERROR_CODES.get(exc.code, "internal")
        details = {"reason": CONFLICT_REASONS[exc.code]} if exc.code in CONFLICT_REASONS else {}
        raise ServiceError(code, exc.message, details) from None
