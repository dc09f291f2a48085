"""The image store: raw images in a pool's `images/`, named by the sha256 of their content.

An import streams the upload into a temp file, reads its format from its header
(formats.py; qemu-img never guesses), checks a qcow2 with `qemu-img info -f qcow2`, converts
it to raw, hashes the raw result and names it by that hash; importing the same content
again (raw or as qcow2) returns the image already there. Images are read-only (0444) and
volumes made from them are clones, independent of the image afterwards, so an image can be
deleted whatever volumes were made from it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from compute_node.storage import extents, formats, qemu_img
from compute_node.storage.errors import AlreadyExists, BadImage
from compute_node.storage.pool import Pool, TempFile, fsync_dir, no_space_is_clear
from compute_node.storage.volumes import MAX_VOLUME_BYTES, Source, write_stream

ImportFormat = Literal["raw", "qcow2"]


class Image(BaseModel):
    model_config = ConfigDict(frozen=True)

    sha256: str
    size: int
    source_format: ImportFormat | None = None
    """What was imported (None when listing)."""
    deduplicated: bool = False
    """The import found this content already stored; nothing was added."""


class ImageStore:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def path(self, sha256: str) -> Path:
        """The image's file. Raises InvalidName, NotFound."""
        return self.pool.image_file(sha256)

    def list(self) -> list[Image]:
        with os.scandir(self.pool.images_dir) as it:
            return sorted(
                (
                    Image(sha256=e.name, size=e.stat(follow_symlinks=False).st_size)
                    for e in it
                    if e.is_file(follow_symlinks=False)
                ),
                key=lambda i: i.sha256,
            )

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink()
        fsync_dir(self.pool.images_dir)

    def import_image(
        self,
        source: Source,
        *,
        format: ImportFormat | None = None,  # noqa: A002 - the word every image tool uses
        size: int | None = None,
        progress: extents.Progress | None = None,
        check: Callable[[int], None] | None = None,
    ) -> Image:
        """Store the image read from `source`; returns it with the sha256 of its raw content.

        `format`, if given, must match what the image's header says (formats.py); `size`, if
        given, is the exact length of the stream. Raises BadImage (not raw or qcow2; qcow2
        with a backing file, an external data file or encryption — never followed, for
        safety; a declared format that differs; a virtual size past the largest volume),
        Truncated, NoSpace. `check(fd)`, if given, vets the raw content before it is stored
        (e.g. that a kernel image is a kernel) and raises BadImage to refuse it. Nothing stays
        behind on failure.
        """
        if size is not None:
            self.pool.check_space(size, "image import")
        with self.pool.begin() as upload, no_space_is_clear("importing an image"):
            digest = write_stream(upload.fd, source, size, progress, "image upload")
            if digest.size == 0:
                raise BadImage("the image is empty")
            detected = _check_format(formats.sniff(upload.fd), format)
            if detected == "raw":
                if check is not None:
                    check(upload.fd)
                return self._store(upload, digest.sha256, digest.size, detected)
            probed = _check_qcow2(qemu_img.info(upload.path, "qcow2"))
            if probed.virtual_size > MAX_VOLUME_BYTES:
                raise BadImage(
                    f"qcow2 virtual size {probed.virtual_size} is past the largest volume"
                )
            self.pool.check_space(probed.virtual_size, "converting the qcow2 image")
            with self.pool.begin() as raw:
                os.ftruncate(raw.fd, probed.virtual_size)
                qemu_img.convert_qcow2_to_raw(upload.path, raw.path)
                sha256 = extents.sha256_of(raw.fd, probed.virtual_size)
                if check is not None:
                    check(raw.fd)
                return self._store(raw, sha256, probed.virtual_size, detected)

    def _store(self, tmp: TempFile, sha256: str, size: int, fmt: ImportFormat) -> Image:
        dest = self.pool.image_path(sha256)
        if os.path.lexists(dest):
            return Image(sha256=sha256, size=size, source_format=fmt, deduplicated=True)
        try:
            tmp.publish(dest, mode=0o444)
        except AlreadyExists:  # the same content imported at the same moment
            return Image(sha256=sha256, size=size, source_format=fmt, deduplicated=True)
        return Image(sha256=sha256, size=size, source_format=fmt)


def _check_format(sniffed: str, declared: ImportFormat | None) -> ImportFormat:
    if sniffed not in ("raw", "qcow2"):
        raise BadImage(f"image format {sniffed!r} is not supported (raw or qcow2)")
    fmt: ImportFormat = "raw" if sniffed == "raw" else "qcow2"
    if declared is not None and declared != fmt:
        raise BadImage(f"image declared {declared} but its content is {fmt}")
    return fmt


def _check_qcow2(probed: qemu_img.ImageFormat) -> qemu_img.ImageFormat:
    if probed.format != "qcow2":
        raise BadImage(f"qemu-img reads the image as {probed.format!r}, not qcow2")
    if probed.backing_file:
        raise BadImage(f"qcow2 image has a backing file ({probed.backing_file!r}): refused")
    if probed.data_file:
        raise BadImage(f"qcow2 image has an external data file ({probed.data_file!r}): refused")
    if probed.encrypted:
        raise BadImage("encrypted images are not supported")
    return probed
