"""What file descriptors this process holds, for tests that check nothing was left open."""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path


def open_fds() -> set[tuple[int, str]]:
    """Each open fd and what it names. Other tests' garbage (a pika I/O loop's epoll and
    socketpair, say) may be collected, closing fds, at any time: callers compare what is new,
    not how many there are."""
    gc.collect()
    out = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # the directory's own fd, gone once listed
            out.add((int(fd.name), str(fd.readlink())))
    return out
