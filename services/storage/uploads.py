"""The storage service's volume upload and download handlers (a part of StorageService).

An upload is two commands around a stream, like an image import (images.py): `begin`
records the volume `creating` under this replica's lease with its ticket on the pool's host;
the caller streams the bytes there (the file layer writes a temp file, checks the length and
the sha256, syncs, and only then names the volume); `end` asks the host what happened and
records it. A volume left `creating` by a caller or replica that died is settled by
`reconcile()`: while its host says the stream is running it waits, then the file decides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from compute_node.storage_agent import ERROR_CODES
from protos.images import (
    BeginVolumeDownload,
    BeginVolumeUpload,
    EndVolumeUpload,
    OpenTransfer,
    UploadedVolume,
    VolumeDownload,
    VolumeUpload,
)
from protos.storage import VolumeCreated
from services.bus import Context, ServiceError, handles
from services.storage.catalog import event_fields

if TYPE_CHECKING:
    from services.storage.backends import PoolBackend
    from services.storage.catalog import Catalog
    from services.storage.config import StorageConfig

log = structlog.get_logger("flotilla.storage.uploads")


class UploadHandlers:
    """Mixed into StorageService, which provides these."""

    config: StorageConfig
    catalog: Catalog
    notify: Callable[[], None]

    def backend(self, host: str | None) -> PoolBackend:
        raise NotImplementedError

    @handles(BeginVolumeUpload)
    def volume_upload_begin(self, cmd: BeginVolumeUpload, _ctx: Context) -> VolumeUpload:
        pool = self.catalog.pool(cmd.pool or self.config.default_pool)
        volume, new = self.catalog.begin_create(
            volume_id=cmd.volume_id,
            project=cmd.project,
            name=cmd.name,
            pool=pool,
            size=cmd.size,
            source_id=None,
            quota=cmd.quota,
            lease_s=self.config.lease_s,
        )
        if not new:
            raise ServiceError(
                "conflict", f"volume {volume.volume_id} exists", {"reason": "exists"}
            )
        try:
            ticket = self.backend(volume.host).open_transfer(
                OpenTransfer(
                    pool=volume.pool,
                    op="volume_upload",
                    volume_id=volume.volume_id,
                    size=cmd.size,
                    sha256=cmd.sha256,
                )
            )
        except ServiceError:
            self.catalog.forget(volume.volume_id)
            raise
        self.catalog.set_ticket(volume.volume_id, ticket.ticket)
        return VolumeUpload(volume=volume, ticket=ticket)

    @handles(EndVolumeUpload)
    def volume_upload_end(self, cmd: EndVolumeUpload, ctx: Context) -> UploadedVolume:
        volume = self.catalog.get(cmd.volume_id, cmd.project)
        ticket = self.catalog.ticket_of(volume.volume_id)
        if volume.state != "creating" or ticket is None:
            raise ServiceError(
                "conflict",
                f"volume {volume.volume_id} has no upload under way",
                {"reason": "state"},
            )
        result = self.backend(volume.host).transfer_result(ticket)
        if result.state == "running":
            raise ServiceError(
                "conflict", f"volume {volume.volume_id}: its upload is running", {"reason": "busy"}
            )
        if result.state == "unknown":  # the host restarted: reconcile settles it by the file
            self.catalog.release(volume.volume_id)
            raise ServiceError("unavailable", f"the upload of volume {volume.volume_id} was lost")
        if result.state == "failed" or result.sha256 is None or result.size is None:
            self.catalog.forget(volume.volume_id)  # the file layer left nothing
            code = ERROR_CODES.get(result.code or "", "internal")
            field = "sha256" if result.code == "checksum_mismatch" else "body"
            details = {"field": "size" if code == "no_space" else field}
            raise ServiceError(code, result.message or "upload failed", details)
        after = self.catalog.change(
            volume.volume_id,
            {
                "state": "available",
                "size": result.size,
                "ticket": None,
                "lease_owner": None,
                "lease_until": 0,
            },
            lambda v: VolumeCreated(**event_fields(v)),
            ctx.cause,
            expect=("creating",),  # reconcile may have recorded it meanwhile
        )
        self.notify()
        log.info("volume uploaded", volume_id=str(volume.volume_id), sha256=result.sha256)
        return UploadedVolume(volume=after, sha256=result.sha256)

    @handles(BeginVolumeDownload)
    def volume_download(self, cmd: BeginVolumeDownload, _ctx: Context) -> VolumeDownload:
        volume = self.catalog.get(cmd.volume_id, cmd.project)
        if volume.state not in ("available", "attached"):
            raise ServiceError(
                "conflict", f"volume {volume.volume_id} is {volume.state}", {"reason": "state"}
            )
        ticket = self.backend(volume.host).open_transfer(
            OpenTransfer(pool=volume.pool, op="volume_download", volume_id=volume.volume_id)
        )
        return VolumeDownload(volume=volume, ticket=ticket)
