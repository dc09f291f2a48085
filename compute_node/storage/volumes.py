"""Volumes: raw sparse files in a pool's `volumes/`, named by id.

Every operation either completes or leaves the pool as it was: new volumes are built in a
temp file and published by link(); changes to an existing volume (grow, wipe, delete) hold
its exclusive lock, so none of them runs under a guest whose VMM has the disk open.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Literal

from pydantic import BaseModel, ConfigDict

from compute_node.storage import extents
from compute_node.storage.errors import (
    AlreadyExists,
    ChecksumMismatch,
    InvalidSize,
    NotFound,
    ShrinkRefused,
    Truncated,
)
from compute_node.storage.locks import open_volume
from compute_node.storage.pool import Pool, fsync_dir, no_space_is_clear

SECTOR = 512
MAX_VOLUME_BYTES = 64 << 40  # 64 TiB: past what any guest here needs, inside XFS and ext4
STREAM_CHUNK = 1 << 20
_ZEROS = bytes(STREAM_CHUNK)

Source = BinaryIO | Iterable[bytes]
"""An upload's data: a binary file object (read in 1 MiB chunks) or any iterable of bytes."""


class Volume(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    size: int
    allocated: int
    """Bytes of blocks the file has allocated (shared reflinked blocks counted here too)."""


class Digest(BaseModel):
    """What went through a stream: its size and sha256 (hex)."""

    model_config = ConfigDict(frozen=True)

    size: int
    sha256: str


class Cloned(BaseModel):
    model_config = ConfigDict(frozen=True)

    volume: Volume
    method: Literal["reflink", "copy"]


def check_size(size: object) -> int:
    """Return `size` if it is a whole number of 512-byte sectors in (0, 64 TiB]."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidSize(f"size must be an integer number of bytes, not {size!r}")
    if size <= 0:
        raise InvalidSize(f"size must be positive, got {size}")
    if size % SECTOR:
        raise InvalidSize(f"size must be a multiple of {SECTOR} bytes, got {size}")
    if size > MAX_VOLUME_BYTES:
        raise InvalidSize(f"size {size} exceeds the largest volume, {MAX_VOLUME_BYTES} bytes")
    return size


class VolumeStore:
    """The volume operations of one pool. Methods raise StorageError subclasses (errors.py)
    for refusals and failures; on any of them no new file is left in the pool."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def info(self, name: str) -> Volume:
        st = self._existing(name).lstat()
        return Volume(name=name, size=st.st_size, allocated=st.st_blocks * 512)

    def list(self) -> list[Volume]:
        with os.scandir(self.pool.volumes_dir) as it:
            names = sorted(e.name for e in it if e.is_file(follow_symlinks=False))
        return [self.info(n) for n in names]

    def create(self, name: str, size: int) -> Volume:
        """A new sparse volume of `size` bytes reading as zeros.

        Raises InvalidName, InvalidSize, NoSpace (size beyond the pool's free space),
        AlreadyExists.
        """
        dest = self._new(name)
        self.pool.check_space(check_size(size), f"volume {name}")
        with self.pool.begin() as tmp, no_space_is_clear(f"creating volume {name}"):
            os.ftruncate(tmp.fd, size)
            tmp.publish(dest)
        return self.info(name)

    def grow(self, name: str, size: int) -> Volume:
        """Make volume `name` `size` bytes long; the new tail reads as zeros.

        Raises ShrinkRefused if `size` is below the current size (data would be lost), NoSpace
        if the growth exceeds the pool's free space, Busy if a VMM has the volume open.
        """
        path = self._existing(name)
        check_size(size)
        fd = open_volume(path, read_only=False, what=f"volume {name}")
        try:
            current = os.fstat(fd).st_size
            if size < current:
                raise ShrinkRefused(
                    f"volume {name} is {current} bytes; shrinking to {size} would lose data"
                )
            self.pool.check_space(size - current, f"growing volume {name}")
            with no_space_is_clear(f"growing volume {name}"):
                os.ftruncate(fd, size)
                os.fsync(fd)
        finally:
            os.close(fd)
        return self.info(name)

    def delete(self, name: str) -> None:
        """Remove volume `name`. Raises NotFound, Busy (a VMM has it open)."""
        path = self._existing(name)
        fd = open_volume(path, read_only=False, what=f"volume {name}")
        try:
            path.unlink()
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.pool.volumes_dir)

    def wipe(self, name: str) -> str:
        """Make every byte of volume `name` read as zero, size kept; returns how
        (`punch_hole`, `zero_range` or `write_zeros`, see extents.punch). Raises Busy."""
        path = self._existing(name)
        fd = open_volume(path, read_only=False, what=f"volume {name}")
        try:
            how = extents.punch(fd, os.fstat(fd).st_size)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        return how

    def clone(self, source: str, name: str, progress: extents.Progress | None = None) -> Cloned:
        """A new volume `name` with the content of `source`, independent of it afterwards.

        A reflink where the pool supports it (instant, blocks shared until written), else a
        sparse copy (holes stay holes; `progress(position, size)` after each 64 MiB step).
        Raises NotFound, AlreadyExists, Busy (a VMM writes `source`), NoSpace (checked
        up front against the source's allocated bytes for a copy, and if the pool fills
        mid-copy; the partial copy is removed).
        """
        src = self._existing(source)
        dest = self._new(name)
        return self._clone_file(src, dest, f"volume {source}", name, progress=progress)

    def create_from_image(self, name: str, image: str, size: int | None = None) -> Cloned:
        """A new volume holding the pool's image `image` (its sha256), grown to `size` bytes
        if given; a clone, independent of the image afterwards. Raises NotFound, InvalidName,
        ShrinkRefused (`size` below the image's size rounded up to a sector), NoSpace."""
        path = self.pool.image_file(image)
        dest = self._new(name)
        image_size = path.lstat().st_size
        rounded = -(-image_size // SECTOR) * SECTOR
        if size is not None and check_size(size) < rounded:
            raise ShrinkRefused(f"image is {rounded} bytes; volume size {size} is smaller")
        return self._clone_file(path, dest, f"image {image}", name, size=size or rounded)

    def upload(
        self,
        name: str,
        source: Source,
        size: int,
        *,
        sha256: str | None = None,
        progress: extents.Progress | None = None,
    ) -> Digest:
        """A new volume `name` from a stream of exactly `size` bytes; returns its sha256.

        The data goes to a temp file (all-zero chunks left as holes), is synced, its size
        and, if given, `sha256` checked, and only then named: a volume is visible whole or
        not at all. Raises Truncated (fewer or more bytes than `size`), ChecksumMismatch,
        NoSpace, AlreadyExists, InvalidName, InvalidSize.
        """
        dest = self._new(name)
        self.pool.check_space(check_size(size), f"uploading volume {name}")
        with self.pool.begin() as tmp, no_space_is_clear(f"uploading volume {name}"):
            digest = write_stream(tmp.fd, source, size, progress, f"upload of {name}")
            if sha256 is not None and digest.sha256 != sha256.lower():
                raise ChecksumMismatch(
                    f"upload of {name}: sha256 {digest.sha256}, expected {sha256}"
                )
            tmp.publish(dest)
        return digest

    def download(self, name: str, sink: BinaryIO) -> Digest:
        """Write volume `name` to `sink`, holes as zeros; returns size and sha256.

        Holds the shared lock meanwhile: raises Busy if a VMM writes the volume."""
        h = hashlib.sha256()
        size = 0
        for chunk in self.read(name):
            h.update(chunk)
            sink.write(chunk)
            size += len(chunk)
        return Digest(size=size, sha256=h.hexdigest())

    def read(self, name: str) -> Iterator[memoryview]:
        """Volume `name`'s bytes in chunks of up to 1 MiB, under the shared lock (Busy if a
        VMM writes it). Each chunk is valid only until the next is asked for."""
        fd = open_volume(self._existing(name), read_only=True, what=f"volume {name}")
        try:
            size = os.fstat(fd).st_size
            buf = bytearray(STREAM_CHUNK)
            view = memoryview(buf)
            pos = 0
            while pos < size:
                n = os.preadv(fd, [view[: min(STREAM_CHUNK, size - pos)]], pos)
                if n == 0:
                    raise Truncated(f"volume {name} ended at byte {pos} of {size}")
                pos += n
                yield view[:n]
        finally:
            os.close(fd)

    def open(self, name: str, *, read_only: bool) -> int:
        """An fd on volume `name` holding its lock (exclusive, or shared if `read_only`), for
        the caller to hand to a VMM. Raises NotFound, Busy."""
        return open_volume(self._existing(name), read_only=read_only, what=f"volume {name}")

    def _clone_file(
        self,
        src: Path,
        dest: Path,
        what: str,
        name: str,
        *,
        progress: extents.Progress | None = None,
        size: int | None = None,
    ) -> Cloned:
        src_fd = open_volume(src, read_only=True, what=what)
        try:
            src_size = os.fstat(src_fd).st_size
            with self.pool.begin() as tmp, no_space_is_clear(f"cloning {what} to {name}"):
                method: Literal["reflink", "copy"] = "reflink"
                if not (self.pool.capabilities.reflink and extents.reflink(src_fd, tmp.fd)):
                    method = "copy"
                    allocated = os.fstat(src_fd).st_blocks * 512
                    self.pool.check_space(allocated, f"copying {what} to {name}")
                    extents.sparse_copy(src_fd, tmp.fd, src_size, progress)
                if size is not None and size > src_size:
                    os.ftruncate(tmp.fd, size)
                tmp.publish(dest)
        finally:
            os.close(src_fd)
        return Cloned(volume=self.info(name), method=method)

    def _existing(self, name: str) -> Path:
        path = self.pool.volume_path(name)
        if not path.is_file() or path.is_symlink():
            raise NotFound(f"volume {name} does not exist in {self.pool.volumes_dir}")
        return path

    def _new(self, name: str) -> Path:
        path = self.pool.volume_path(name)
        if os.path.lexists(path):
            raise AlreadyExists(f"volume {name} already exists in {self.pool.volumes_dir}")
        return path


def _chunks(source: Source) -> Iterator[bytes | memoryview]:
    readinto = getattr(source, "readinto", None)
    if readinto is None:
        yield from source
        return
    view = memoryview(bytearray(STREAM_CHUNK))
    while True:
        n = readinto(view)
        if not n:
            return
        yield view[:n]


def write_stream(
    fd: int, source: Source, size: int | None, progress: extents.Progress | None, what: str
) -> Digest:
    """Write `source` at the start of the empty file `fd`, hashing it; all-zero chunks are
    skipped (left as holes). With `size`, more or fewer bytes raise Truncated. The file
    ends exactly as long as the data."""
    h = hashlib.sha256()
    pos = 0
    for chunk in _chunks(source):
        n = len(chunk)
        if size is not None and pos + n > size:
            raise Truncated(f"{what}: more than the announced {size} bytes")
        h.update(chunk)
        if chunk != _ZEROS[:n]:
            view = memoryview(chunk)
            done = 0
            while done < n:
                done += os.pwrite(fd, view[done:], pos + done)
        pos += n
        if progress is not None and size is not None:
            progress(pos, size)
    if size is not None and pos != size:
        raise Truncated(f"{what}: the stream ended after {pos} of {size} bytes")
    os.ftruncate(fd, pos)
    return Digest(size=pos, sha256=h.hexdigest())
