"""A storage pool: a directory of volumes and images on one host (`dir`) or on all (`shared`).

Layout (docs/storage.md):

    <root>/volumes/<volume id>     raw sparse files, 0600
    <root>/images/<sha256>         raw images, content-addressed, 0444
    <root>/.tmp/<op id>            files of operations in progress

Every operation that takes more than one step writes into `.tmp/<op id>`, holding an OFD
lock on it, and publishes with link() (never replacing an existing name) + unlink + fsync of
the directory, so a name either does not exist or holds the whole, synced result.
`reconcile()` removes temp files whose lock nobody holds: what a killed worker left.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import structlog
from pydantic import BaseModel, ConfigDict

from compute_node.storage import extents
from compute_node.storage.errors import AlreadyExists, NoSpace, NotFound, StorageError
from compute_node.storage.locks import lock_op
from compute_node.storage.names import check_name, check_sha256, contained

log = structlog.get_logger(__name__)

PoolKind = Literal["dir", "shared"]
VOLUMES = "volumes"
IMAGES = "images"
TMP = ".tmp"
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class PoolCapabilities(BaseModel):
    """What the pool's file system can do, probed on a scratch file when the pool opens."""

    model_config = ConfigDict(frozen=True)

    reflink: bool
    """FICLONE works: clones are instant and share blocks until written."""
    punch_hole: bool
    """FALLOC_FL_PUNCH_HOLE works: wipe frees blocks instead of writing zeros."""


class PoolUsage(BaseModel):
    """Bytes: `capacity` of the file system, `allocation` of the pool's volumes and images
    (blocks each file has allocated; blocks that reflinked files share count once per file),
    `available` to this pool (free blocks an unprivileged writer may use)."""

    model_config = ConfigDict(frozen=True)

    capacity: int
    allocation: int
    available: int


class TempFile:
    """A file being built by one operation in `.tmp/`, locked by it while it lives.

    Use as a context manager: leaving it by an exception (or without publish) removes the
    file. `fd` is open read-write.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.published = False

    def publish(self, dest: Path, *, mode: int = 0o600) -> None:
        """Sync the data and give it the name `dest` atomically; raises AlreadyExists if
        `dest` exists (then nothing changed). The temp name is gone afterwards."""
        os.fchmod(self.fd, mode)
        os.fdatasync(self.fd)
        try:
            os.link(self.path, dest, follow_symlinks=False)
        except FileExistsError:
            raise AlreadyExists(f"{dest.name} already exists in {dest.parent}") from None
        self.path.unlink()
        self.published = True
        fsync_dir(dest.parent)
        fsync_dir(self.path.parent)

    def discard(self) -> None:
        if not self.published:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> TempFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def no_space_is_clear(what: str) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT/EFBIG from inside the block into NoSpace naming `what`."""
    try:
        yield
    except OSError as e:
        if e.errno in NO_SPACE:
            raise NoSpace(f"{what}: the pool ran out of space ({os.strerror(e.errno)})") from e
        raise


class Pool:
    """One pool directory. Opening it creates the layout if missing and probes capabilities.

    `kind` is `dir` (one host's directory; its file work runs on that host) or `shared`
    (a directory every host mounts, NFS in production): the file work is the same, and
    OFD locks keep operations of different hosts apart on a shared pool.
    """

    def __init__(self, path: str | os.PathLike[str], kind: PoolKind = "dir") -> None:
        if kind not in ("dir", "shared"):
            raise StorageError(f"pool kind {kind!r} is not 'dir' or 'shared'")
        root = Path(path)
        if not root.is_dir():
            raise StorageError(f"pool directory {root} does not exist")
        self.root = root.resolve()
        self.kind: PoolKind = kind
        self.volumes_dir = self.root / VOLUMES
        self.images_dir = self.root / IMAGES
        self.tmp_dir = self.root / TMP
        for d in (self.volumes_dir, self.images_dir, self.tmp_dir):
            d.mkdir(mode=0o700, exist_ok=True)
        self.capabilities = self._probe()

    def volume_path(self, name: str) -> Path:
        """The path of volume `name` (checked: an id, inside the pool); may not exist."""
        return contained(self.volumes_dir, check_name(name))

    def image_path(self, sha256: str) -> Path:
        return contained(self.images_dir, check_sha256(sha256))

    def image_file(self, sha256: str) -> Path:
        """The stored image's file (never a symlink). Raises InvalidName, NotFound."""
        path = self.image_path(sha256)
        if not path.is_file() or path.is_symlink():
            raise NotFound(f"image {sha256} does not exist in {self.images_dir}")
        return path

    def begin(self) -> TempFile:
        """A new locked temp file in `.tmp/` for one operation."""
        for _ in range(8):
            path = self.tmp_dir / uuid.uuid4().hex
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            # reconcile() of another process may have taken the lock between create and
            # lock and removed the file: then start over with a new name.
            if lock_op(fd) and os.fstat(fd).st_nlink > 0:
                return TempFile(path, fd)
            os.close(fd)
        raise StorageError(f"could not claim a temp file in {self.tmp_dir}")

    def available(self) -> int:
        """Free bytes for unprivileged writers (statvfs, no scan of the pool)."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def usage(self) -> PoolUsage:
        st = os.statvfs(self.root)
        allocation = 0
        for d in (self.volumes_dir, self.images_dir):
            with os.scandir(d) as it:
                for entry in it:
                    with contextlib.suppress(FileNotFoundError):
                        allocation += entry.stat(follow_symlinks=False).st_blocks * 512
        return PoolUsage(
            capacity=st.f_blocks * st.f_frsize,
            allocation=allocation,
            available=st.f_bavail * st.f_frsize,
        )

    def check_space(self, nbytes: int, what: str) -> None:
        """Raise NoSpace when `nbytes` more would not fit in the pool's free space."""
        available = self.available()
        if nbytes > available:
            raise NoSpace(f"{what} needs {nbytes} bytes, the pool has {available} free")

    def reconcile(self) -> list[str]:
        """Remove what operations killed mid-way left in `.tmp/`; return the names removed.

        An entry is removed only if no live process holds its lock (a lock dies with its
        holder), so running operations, on this host or another of a shared pool, are
        untouched. Published volumes and images are complete by construction and stay.
        """
        removed: list[str] = []
        with os.scandir(self.tmp_dir) as it:
            entries = list(it)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.name)
                continue
            if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink()
                removed.append(entry.name)
                continue
            try:
                fd = os.open(entry.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # finished meanwhile
            try:
                if lock_op(fd):
                    Path(entry.path).unlink()
                    removed.append(entry.name)
            finally:
                os.close(fd)
        if removed:
            fsync_dir(self.tmp_dir)
            log.info("storage.reconciled", pool=str(self.root), removed=removed)
        return removed

    def _probe(self) -> PoolCapabilities:
        with self.begin() as a, self.begin() as b:
            os.pwrite(a.fd, b"flotilla" * 512, 0)
            os.fdatasync(a.fd)
            try:
                reflink = extents.reflink(a.fd, b.fd)
            except OSError:
                reflink = False
            try:
                extents.fallocate(
                    a.fd, extents.FALLOC_FL_PUNCH_HOLE | extents.FALLOC_FL_KEEP_SIZE, 0, 4096
                )
                punch_hole = True
            except OSError:
                punch_hole = False
        return PoolCapabilities(reflink=reflink, punch_hole=punch_hole)
