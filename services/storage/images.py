"""The storage service's image handlers (a part of StorageService): import by stream or
from a host file, list, find by name, delete.

An import is two commands around a stream: `BeginImageImport` records the image
`importing` and gets a ticket from the pool's host; the caller streams the bytes to the host;
`EndImageImport` asks the host what it stored (never the caller) and records it. An import
whose caller went away is settled the same way by `reconcile_images` once its lease runs
out: the host's outcome decides (stored: available; failed or unknown: forgotten).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from compute_node.storage_agent import ERROR_CODES
from protos.images import (
    BeginImageImport,
    DeleteImage,
    EndImageImport,
    FindImage,
    GetImage,
    GetImageUsage,
    Image,
    ImageImport,
    ImageList,
    ImageUsage,
    ImportImageFile,
    ImportImageFromHost,
    ListImages,
    OpenTransfer,
    TransferResult,
)
from services.bus import Context, ServiceError, handles
from services.storage.backends import PoolBackend, Unreachable
from services.storage.catalog import GiB
from services.storage.image_catalog import ImageCatalog, ImageOverQuota

if TYPE_CHECKING:
    from services.storage.catalog import Catalog, PoolRow
    from services.storage.config import StorageConfig

log = structlog.get_logger("flotilla.storage.images")


class ImageHandlers:
    """Mixed into StorageService, which provides these."""

    config: StorageConfig
    catalog: Catalog
    notify: Callable[[], None]

    def backend(self, host: str | None) -> PoolBackend:
        raise NotImplementedError

    @property
    def images(self) -> ImageCatalog:
        return ImageCatalog(self.catalog)

    def _image_pool(self, name: str | None) -> PoolRow:
        return self.catalog.pool(name or self.config.default_pool)

    @handles(BeginImageImport)
    def image_import_begin(self, cmd: BeginImageImport, _ctx: Context) -> ImageImport:
        pool = self._image_pool(cmd.pool)
        if cmd.size is not None and cmd.size > pool.available:
            raise ServiceError(
                "no_space",
                f"{cmd.size} bytes, pool {pool.name} has {pool.available} free",
                {"field": "size", "available": pool.available},
            )
        image, _new = self.images.begin(
            image_id=cmd.image_id,
            project=cmd.project,
            name=cmd.name,
            kind=cmd.kind,
            visibility=cmd.visibility,
            pool=pool,
            lease_s=self.config.lease_s,
            quota=cmd.quota,
            size=cmd.size,
        )
        if image.state != "importing":
            raise ServiceError("conflict", f"image {image.image_id} is imported already")
        try:
            ticket = self.backend(image.host).open_transfer(
                OpenTransfer(
                    pool=image.pool,
                    op="image_import",
                    size=cmd.size,
                    format=cmd.format,
                    kind=cmd.kind,
                )
            )
        except ServiceError:
            self.images.forget(image.image_id)
            raise
        self.images.set_ticket(image.image_id, ticket.ticket)
        return ImageImport(image=image, ticket=ticket)

    @handles(EndImageImport)
    def image_import_end(self, cmd: EndImageImport, ctx: Context) -> Image:
        image = self.images.get(cmd.image_id, cmd.project, own=True)
        if image.state == "available":
            return image
        ticket = self.images.ticket_of(image.image_id)
        if ticket is None:
            raise ServiceError("conflict", f"image {image.image_id} has no stream under way")
        result = self.backend(image.host).transfer_result(ticket)
        if result.state == "running":
            raise ServiceError(
                "conflict",
                f"image {image.image_id}: its stream is still running",
                {"reason": "busy"},
            )
        return self._record(image, result, ctx)

    @handles(ImportImageFromHost)
    def image_import_host(self, cmd: ImportImageFromHost, ctx: Context) -> Image:
        pool = self._image_pool(cmd.pool)
        image, _new = self.images.begin(
            image_id=cmd.image_id,
            project=cmd.project,
            name=cmd.name,
            kind=cmd.kind,
            visibility=cmd.visibility,
            pool=pool,
            lease_s=self.config.long_timeout_s,
            quota=cmd.quota,
        )
        if image.state == "available":
            return image
        try:
            result = self.backend(image.host).import_file(
                ImportImageFile(pool=image.pool, path=cmd.path, format=cmd.format, kind=cmd.kind)
            )
        except Unreachable:
            raise  # the import row stays under its lease; reconcile forgets it
        except ServiceError:
            self.images.forget(image.image_id)
            raise
        return self._record(image, result, ctx)

    def _record(self, image: Image, result: TransferResult, ctx: Context | None) -> Image:
        """The host's outcome of an import, into the catalog."""
        if result.state != "done" or result.sha256 is None or result.size is None:
            self.images.forget(image.image_id)
            if result.state == "unknown":
                raise ServiceError("unavailable", f"the import of image {image.image_id} was lost")
            code = ERROR_CODES.get(result.code or "", "internal")
            details = {"field": "body"} if code == "invalid" else {}
            raise ServiceError(code, result.message or "import failed", details)
        try:
            after = self.images.finish(
                image.image_id,
                sha256=result.sha256,
                size=result.size,
                source_format=result.source_format,
                deduplicated=result.deduplicated,
                cause=None if ctx is None else ctx.cause,
            )
        except ImageOverQuota as refused:
            if refused.remove_file:
                self._remove_file(image.pool, image.host, result.sha256)
            raise
        self.notify()
        log.info(
            "image imported",
            image_id=str(image.image_id),
            sha256=result.sha256,
            deduplicated=result.deduplicated,
        )
        return after

    def _remove_file(self, pool: str, host: str | None, sha256: str) -> None:
        try:
            self.backend(host).delete_image(pool, sha256)
        except ServiceError as exc:  # the next reconcile's sweep removes it
            log.warning("image file not removed yet", sha256=sha256, error=exc.message)

    @handles(GetImageUsage)
    def image_usage(self, cmd: GetImageUsage, _ctx: Context) -> ImageUsage:
        count, size = self.images.usage(cmd.project)
        return ImageUsage(images=count, image_bytes=size, image_gib=-(-size // GiB))

    @handles(GetImage)
    def image_info(self, cmd: GetImage, _ctx: Context) -> Image:
        return self.images.get(cmd.image_id, cmd.project)

    @handles(FindImage)
    def image_find(self, cmd: FindImage, _ctx: Context) -> Image:
        return self.images.find(cmd.name, cmd.project)

    @handles(ListImages)
    def image_list(self, cmd: ListImages, _ctx: Context) -> ImageList:
        return ImageList(images=self.images.visible(cmd.project))

    @handles(DeleteImage)
    def image_delete(self, cmd: DeleteImage, ctx: Context) -> Image:
        image, last = self.images.delete(cmd.image_id, cmd.project, ctx.cause)
        self.notify()
        if last and image.sha256 is not None:
            self._remove_file(image.pool, image.host, image.sha256)
        return image

    def reconcile_images(self) -> dict[uuid.UUID, str]:
        """Settle imports whose caller and replica went away (lease run out) by their host's
        outcome; remove image files no image names (a file whose last name went while its
        host was away). What it did, per image."""
        done: dict[uuid.UUID, str] = {}
        for image, ticket in self.images.stuck():
            if not self.images.take_lease(image.image_id, self.config.lease_s):
                continue
            try:
                result = (
                    self.backend(image.host).transfer_result(ticket)
                    if ticket
                    else TransferResult(state="unknown")
                )
                if result.state == "running":
                    self.images.renew(image.image_id, self.config.lease_s)
                    continue
                self._record(image, result, None)
                done[image.image_id] = "imported"
            except ServiceError as exc:
                done[image.image_id] = f"forgotten: {exc.message}"
        for pool in self.catalog.pools():
            self._sweep(pool.name, pool.host)
        if done:
            log.info("imports reconciled", settled={str(k): v for k, v in done.items()})
        return done

    def _sweep(self, pool: str, host: str | None) -> None:
        if self.images.importing(pool, host):
            return  # an import under way may store any file
        try:
            files = self.backend(host).image_files(pool)
        except ServiceError:
            return
        named = self.images.names_of(pool, host)
        for sha256 in files:
            if sha256 not in named and not self.images.importing(pool, host):
                log.info("removing an unnamed image file", pool=pool, host=host, sha256=sha256)
                try:
                    self.backend(host).delete_image(pool, sha256)
                except ServiceError as exc:
                    log.warning("image file not removed", sha256=sha256, error=exc.message)
