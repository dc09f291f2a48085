"""Network namespaces for the calling thread: plumbing can act inside a named netns.

`setns(2)` moves only the calling thread, so `inside(name)` enters a namespace for the
duration of a block and always returns to the thread's own one; sockets and tap devices made
inside stay in that namespace after the block. Named namespaces are the `ip netns` ones
(bind mounts under /run/netns).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NETNS_RUN_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def path_of(name: str) -> Path:
    """The bind mount of the named namespace; ValueError for a name that is not one."""
    if not name or "/" in name or name in {".", ".."}:
        raise ValueError(f"not a network namespace name: {name!r}")
    return NETNS_RUN_DIR / name


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def inside(name: str | None) -> Iterator[None]:
    """Run the block in namespace `name` (None: where the thread already is).

    Raises FileNotFoundError when the namespace does not exist."""
    if name is None:
        yield
        return
    target = os.open(path_of(name), os.O_RDONLY | os.O_CLOEXEC)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)
