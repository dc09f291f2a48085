"""How bytes move between files: reflink, sparse copy, hole punching, hashing by extent.

Linux primitives only (FICLONE, SEEK_DATA/SEEK_HOLE, copy_file_range, fallocate); each
function works on open fds and leaves the fds' offsets undefined.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator

FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
COPY_CHUNK = 64 << 20
ZERO_CHUNK = 1 << 20
_ZEROS = bytes(ZERO_CHUNK)

# Errors meaning "this file system (or this pair of files) cannot do that", not a failure.
UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS})

Progress = Callable[[int, int], None]
"""progress(position, size): the copy reached byte `position` of a `size`-byte file."""

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none); raises OSError."""
    if _fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def reflink(src_fd: int, dst_fd: int) -> bool:
    """Make dst share all of src's extents (FICLONE): True if done, False if unsupported.

    Instant whatever the size; later writes to either file copy only the blocks written.
    Raises OSError for real failures (ENOSPC for the metadata, EIO).
    """
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as e:
        if e.errno in UNSUPPORTED:
            return False
        raise
    return True


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each run of data in the first `size` bytes, holes skipped.

    A file system without SEEK_DATA support reports the whole file as data.
    """
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                return
            if e.errno in UNSUPPORTED:
                yield pos, size - pos
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        pos = end


def _copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    done = 0
    while done < length:
        n = min(COPY_CHUNK, length - done)
        try:
            copied = os.copy_file_range(src_fd, dst_fd, n, offset + done, offset + done)
        except OSError as e:
            if e.errno not in UNSUPPORTED:
                raise
            copied = _copy_by_hand(src_fd, dst_fd, offset + done, n)
        if copied == 0:
            raise OSError(errno.EIO, f"source ended early at byte {offset + done}")
        done += copied


def _copy_by_hand(src_fd: int, dst_fd: int, offset: int, length: int) -> int:
    data = os.pread(src_fd, min(length, ZERO_CHUNK), offset)
    view = memoryview(data)
    written = 0
    while written < len(view):
        written += os.pwrite(dst_fd, view[written:], offset + written)
    return len(data)


def sparse_copy(src_fd: int, dst_fd: int, size: int, progress: Progress | None = None) -> None:
    """Copy the first `size` bytes of src into an empty dst, holes staying holes.

    Walks src's data extents with SEEK_DATA/SEEK_HOLE and copies each in 64 MiB steps with
    copy_file_range (read/write where that is unsupported); dst ends exactly `size` long.
    `progress` is called after every step. Raises OSError (ENOSPC, EIO) on failure.
    """
    os.ftruncate(dst_fd, size)
    for offset, length in data_extents(src_fd, size):
        step = 0
        while step < length:
            n = min(COPY_CHUNK, length - step)
            _copy_range(src_fd, dst_fd, offset + step, n)
            step += n
            if progress is not None:
                progress(offset + step, size)
    if progress is not None:
        progress(size, size)


def punch(fd: int, size: int) -> str:
    """Make the first `size` bytes read as zeros, freeing their blocks; says how it was done.

    `punch_hole` (FALLOC_FL_PUNCH_HOLE): the blocks go back to the file system, which never
    shows freed blocks to any file (new extents read as zeros), and a reflinked clone keeps
    its own copy. `zero_range` (FALLOC_FL_ZERO_RANGE) where holes cannot be punched, and
    writing zeros as the last resort (the file then stays fully allocated).
    """
    for mode, how in (
        (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, "punch_hole"),
        (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, "zero_range"),
    ):
        try:
            fallocate(fd, mode, 0, size)
        except OSError as e:
            if e.errno in UNSUPPORTED:
                continue
            raise
        return how
    for offset, length in data_extents(fd, size):
        pos = offset
        while pos < offset + length:
            n = min(ZERO_CHUNK, offset + length - pos)
            pos += os.pwrite(fd, _ZEROS[:n], pos)
    return "write_zeros"


def sha256_of(fd: int, size: int) -> str:
    """sha256 of the first `size` bytes, holes hashed as zeros without reading them."""
    h = hashlib.sha256()
    pos = 0
    buf = bytearray(ZERO_CHUNK)
    view = memoryview(buf)
    for offset, length in data_extents(fd, size):
        _hash_zeros(h, offset - pos)
        end = offset + length
        pos = offset
        while pos < end:
            n = os.preadv(fd, [view[: min(ZERO_CHUNK, end - pos)]], pos)
            if n == 0:
                raise OSError(errno.EIO, f"file ended early at byte {pos}")
            h.update(view[:n])
            pos += n
    _hash_zeros(h, size - pos)
    return h.hexdigest()


def _hash_zeros(h: hashlib._Hash, n: int) -> None:
    while n > 0:
        k = min(n, ZERO_CHUNK)
        h.update(_ZEROS[:k])
        n -= k
