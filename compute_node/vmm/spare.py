"""A warm VMM: `python -m compute_node.vmm --spare <fd> <pid-file>` (docs/vmm.md, "Warm VMMs").

The process has paid for the interpreter and every import of a VMM (the cffi module too) and
waits on `<fd>`, one end of a SOCK_SEQPACKET socketpair its compute node kept, for one
assignment; then it becomes the VMM a cold `spawn()` would have started for that domain dir.

The assignment protocol, one msgpack map a message:
- spare → node: `{"ready": <pid>}` once its imports are done;
- node → spare: `{"v": 1, "dir": <domain dir>, "fds": [<n>, ...]}` with SCM_RIGHTS carrying
  the domain's `vmm.log` (appended to) and then one descriptor per number in `fds`: the
  spare puts the log on its stdout and stderr and each descriptor under its number, as
  `spawn(…, pass_fds=)` would have;
- spare → node: `{"ok": true, "pid": <pid>}` once everything is in place (then it runs
  `main([dir])`), or `{"ok": false, "error": <why>}` (then it exits, having taken nothing).
EOF from the node (it stopped or died) ends the spare. Before its reply the spare removes its
pid file (the node's record of it), so a node restarting later never takes the VMM it became
for a spare. Standard library and msgpack only: it runs in the VMM process.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from typing import Any

import msgpack

VERSION = 1
MAX_MESSAGE = 64 * 1024
# SCM_MAX_FD is 253 a message: the log plus this many inherited descriptors.
MAX_FDS = 250


class AssignmentInvalid(Exception):
    """The node sent something that is no assignment."""


def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message)  # type: ignore[no-any-return]


def unpack(data: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(data)
    except Exception as exc:  # msgpack raises several types for bad input
        raise AssignmentInvalid(f"not msgpack: {exc}") from None
    if not isinstance(message, dict):
        raise AssignmentInvalid("not a map")
    return message


def parse_assignment(
    message: dict[str, Any], received: int, flags: int = 0
) -> tuple[str, list[int]]:
    """The domain dir and the descriptor numbers of an assignment that came with `received`
    descriptors (and recvmsg's `flags`); AssignmentInvalid unless it is exactly right."""
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        raise AssignmentInvalid("the assignment was truncated")
    directory, numbers = message.get("dir"), message.get("fds")
    if message.get("v") != VERSION:
        raise AssignmentInvalid(f"version {message.get('v')!r}, expected {VERSION}")
    if not isinstance(directory, str) or not directory.startswith("/"):
        raise AssignmentInvalid("dir must be an absolute path")
    if not isinstance(numbers, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and 3 <= n < 65536 for n in numbers
    ):
        raise AssignmentInvalid("fds must be descriptor numbers of 3 and up")
    if len(set(numbers)) != len(numbers):
        raise AssignmentInvalid("fds names a number twice")
    if received != len(numbers) + 1:
        raise AssignmentInvalid(f"{received} descriptors came for {len(numbers)} + the log")
    return directory, numbers


def place_fds(received: list[int], numbers: list[int], keep: int) -> int:
    """Moves `received[i]` to descriptor `numbers[i]` (inheritable, as pass_fds leaves them),
    closing the originals. `keep` (a descriptor still needed) is moved out of the way first
    if a number names it; returns its (possibly new) number. Nothing else is touched."""
    above = max([*numbers, *received, keep, 2]) + 1
    if keep in numbers:
        moved = fcntl.fcntl(keep, fcntl.F_DUPFD_CLOEXEC, above)
        os.close(keep)
        keep = moved
        above = moved + 1
    # Out of the way first: a received descriptor may sit on another's number.
    parked = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above) for fd in received]
    for fd in received:
        os.close(fd)
    for fd, number in zip(parked, numbers, strict=True):
        os.dup2(fd, number, inheritable=True)
        os.close(fd)
    return keep


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)  # noqa: PTH108 (pathlib costs the VMM import time)
    except OSError:
        pass


def wait_for_assignment(fd: int, pid_file: str) -> str | None:
    """Says `ready` on `fd`, then waits for one assignment: returns its domain dir with the
    log and descriptors in place (the reply sent, `fd` closed), or None when the node closed
    the socket or sent no usable assignment (the spare then exits)."""
    sock = socket.socket(fileno=fd)
    try:
        sock.send(pack({"ready": os.getpid()}))
        try:
            data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS + 1)
        except OSError:
            return None
        if not data:
            _close_all(fds)
            return None  # EOF: the node stopped
        _unlink(pid_file)  # from here this process is no spare, whatever comes
        try:
            directory, numbers = parse_assignment(unpack(data), len(fds), flags)
        except AssignmentInvalid as exc:
            _close_all(fds)
            sock.send(pack({"ok": False, "error": str(exc)}))
            return None
        sys.stdout.flush()
        sys.stderr.flush()
        log, inherited = fds[0], fds[1:]
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        kept = place_fds(inherited, numbers, sock.fileno())
        if kept != sock.fileno():
            sock.detach()
            sock = socket.socket(fileno=kept)
        sock.send(pack({"ok": True, "pid": os.getpid()}))
        return directory
    except OSError:
        return None  # the node went away mid-assignment: nothing was taken
    finally:
        sock.close()
