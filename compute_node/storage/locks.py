"""One writer per volume, readers shared: OFD locks on the whole file.

The VMM's virtio-blk opens a disk and takes the same lock in C (native/virtio/blk.c): an
exclusive lock for a writable disk, a shared one for a read-only disk, held for as long as
the device keeps its fd open. The agent takes the exclusive lock for the length of anything
that changes a volume under a guest (delete, wipe, grow, as clone target) and the shared one
to read it (clone source, download), so neither can run against a disk a VMM writes.

OFD locks (F_OFD_SETLK) belong to the open file description, not the process: a second open
in the same process conflicts too, they are released when the last fd of that description
closes (a killed VMM releases its disks at once), and NFSv4 carries them to the server.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from compute_node.storage.errors import Busy

# struct flock on x86-64 and aarch64: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (0 for OFD locks), padded to 32 bytes.
_FLOCK = struct.Struct("@hhqqi4x")

# Temp files of operations in progress are locked on this one byte, far past any data, so a
# tool that locks its own bytes of the file (qemu-img locks bytes 100-299) does not collide.
OP_LOCK_BYTE = 1 << 62


def _lock(fd: int, kind: int, start: int, length: int) -> bool:
    arg = _FLOCK.pack(kind, os.SEEK_SET, start, length, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, arg)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def lock_volume(fd: int, *, read_only: bool, what: str) -> None:
    """Take the volume lock on `fd`: shared if `read_only`, else exclusive.

    Raises Busy (naming `what`) when another open file description holds a conflicting lock.
    The lock lasts until every fd of this open file description is closed.
    """
    kind = fcntl.F_RDLCK if read_only else fcntl.F_WRLCK
    if not _lock(fd, kind, 0, 0):
        holder = "a writer" if read_only else "another process"
        raise Busy(f"{what} is in use: {holder} holds its lock (a running guest's disk?)")


def volume_in_use(fd: int, *, read_only: bool) -> bool:
    """Whether another open file description holds a lock that `lock_volume(fd, read_only=…)`
    would conflict with (F_OFD_GETLK: takes nothing). An early, clear answer only: the lock
    itself, taken later, is what keeps two writers apart."""
    kind = fcntl.F_RDLCK if read_only else fcntl.F_WRLCK
    arg = _FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0)
    got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, arg)
    return bool(_FLOCK.unpack(got)[0] != fcntl.F_UNLCK)


def open_volume(path: str | os.PathLike[str], *, read_only: bool, what: str) -> int:
    """Open a volume file the way a VMM must: O_RDONLY or O_RDWR, no symlinks, locked.

    Returns the fd; the caller owns it (close it to release the lock). Raises Busy when
    another process holds a conflicting lock, OSError when the file cannot be opened.
    """
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        lock_volume(fd, read_only=read_only, what=what)
    except BaseException:
        os.close(fd)
        raise
    return fd


def lock_op(fd: int) -> bool:
    """Take an operation's lock on its temp file; False when someone else holds it."""
    return _lock(fd, fcntl.F_WRLCK, OP_LOCK_BYTE, 1)
