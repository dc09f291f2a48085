"""Frames and the journal shared by the per-guest VMM process and its client (docs/vmm.md).

A frame is a 4-byte big-endian length and a msgpack map. Control requests and replies, the
records a subscriber receives and the records of `<domain-dir>/journal` are all frames.
Standard library and msgpack only: the VMM process imports this at start-up.
"""

from __future__ import annotations

import os
import struct
import time
from typing import Any, TypedDict, cast

import msgpack

HEADER = struct.Struct(">I")
# Requests are a few dozen bytes; a bound keeps a bad client from making the VMM buffer much.
MAX_REQUEST = 64 * 1024
# Replies carry at most a console ring (bounded by the VMM's config clamp).
MAX_REPLY = 80 * 1024 * 1024
MAX_RECORD = 64 * 1024

JOURNAL = "journal"
CONTROL_SOCKET = "control.sock"
PID_FILE = "vmm.pid"
CONFIG_FILE = "vmm.json"
CONSOLE_LOG = "console.log"
PROCESS_LOG = "vmm.log"


class JournalRecord(TypedDict):
    n: int
    ts: float
    kind: str
    reason: str
    detail: str


class FrameError(ValueError):
    """A frame is oversized or its body is not a msgpack map."""


def pack_frame(obj: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def unpack_body(body: bytes) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(body, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise FrameError(f"bad msgpack: {exc}") from exc
    if not isinstance(obj, dict):
        raise FrameError(f"frame body is a {type(obj).__name__}, not a map")
    return cast(dict[str, Any], obj)


class FrameReader:
    """Splits a byte stream into frames; raises FrameError past `limit` or on a bad body."""

    def __init__(self, limit: int) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_frame(self) -> dict[str, Any] | None:
        if len(self._buf) < HEADER.size:
            return None
        (size,) = HEADER.unpack_from(self._buf)
        if size > self._limit:
            raise FrameError(f"frame of {size} bytes exceeds the limit of {self._limit}")
        end = HEADER.size + size
        if len(self._buf) < end:
            return None
        body = bytes(self._buf[HEADER.size : end])
        del self._buf[:end]
        return unpack_body(body)

    def has_frame(self) -> bool:
        """True when a whole frame is buffered; FrameError if the next one is oversized."""
        if len(self._buf) < HEADER.size:
            return False
        size: int = HEADER.unpack_from(self._buf)[0]
        if size > self._limit:
            raise FrameError(f"frame of {size} bytes exceeds the limit of {self._limit}")
        return len(self._buf) >= HEADER.size + size

    def take_rest(self) -> bytes:
        """The bytes after the last whole frame (a connection that turned into a raw stream)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


def scan_journal(data: bytes) -> tuple[list[JournalRecord], int]:
    """The whole records in `data` and the length they span; a torn tail is left out."""
    records: list[JournalRecord] = []
    pos = 0
    while pos + HEADER.size <= len(data):
        (size,) = HEADER.unpack_from(data, pos)
        end = pos + HEADER.size + size
        if size > MAX_RECORD or end > len(data):
            break
        try:
            obj = unpack_body(data[pos + HEADER.size : end])
        except FrameError:
            break
        if not isinstance(obj.get("n"), int):
            break
        records.append(cast(JournalRecord, obj))
        pos = end
    return records, pos


def read_journal(path: str | os.PathLike[str], from_n: int = 0) -> list[JournalRecord]:
    """Records with n > from_n, oldest first; [] when the journal does not exist.

    A record cut short by a crash mid-append (and anything after it) is not returned.
    """
    try:
        with open(path, "rb") as f:  # noqa: PTH123 (pathlib costs the VMM import time)
            data = f.read()
    except FileNotFoundError:
        return []
    records, _ = scan_journal(data)
    return [r for r in records if r["n"] > from_n]


class Journal:
    """The append side, owned by one VMM process at a time (the vmm.pid lock).

    `append` returns only after the record is written and fsync'ed.
    """

    def __init__(self, path: str) -> None:
        created = not os.path.exists(path)  # noqa: PTH110
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        size = os.fstat(self._fd).st_size
        data = os.pread(self._fd, size, 0) if size else b""
        records, good = scan_journal(data)
        if good < size:
            # A torn record from a crash mid-append: drop it so later records stay readable.
            os.ftruncate(self._fd, good)
            os.fsync(self._fd)
        self.n = records[-1]["n"] if records else 0
        if created:
            _fsync_dir(os.path.dirname(path) or ".")  # noqa: PTH120

    def append(self, kind: str, reason: str = "", detail: str = "") -> JournalRecord:
        record: JournalRecord = {
            "n": self.n + 1,
            "ts": time.time(),
            "kind": kind,
            "reason": reason,
            "detail": detail[:4096],
        }
        view = memoryview(pack_frame(dict(record)))
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)
        self.n += 1
        return record

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
