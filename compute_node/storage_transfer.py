"""Byte streams into and out of a host's pools: a TCP port redeeming one-time tickets.

Whoever holds the bytes (the API, streaming an HTTP body) asks the pool's server over the
bus for a ticket (`OpenTransfer`), connects to the port, sends the ticket and a newline,
then:

- into a pool (`image_import`, `volume_upload`): frames of `<u32 big-endian length><data>`,
  each at most MAX_FRAME bytes, and an empty frame to end. A connection that closes before
  the empty frame is a truncated upload: the operation fails and leaves nothing (the file
  layer's temp file is removed). The server answers one JSON line: the outcome.
- out of a pool (`volume_download`): the server sends a JSON line `{"size": N}` (or the
  refusal), the N bytes, then the JSON outcome line with the sha256.

The outcome is kept by ticket for RESULT_TTL_S, so the storage service asks the host what
happened (`GetTransferResult`) rather than trusting the caller. A ticket is random (32
bytes), valid once and for TICKET_TTL_S seconds; anything else on the port is closed.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any, BinaryIO

import structlog

from compute_node.storage import ImageStore, Pool, StorageError, VolumeStore
from compute_node.storage.errors import BadImage
from protos.images import OpenTransfer, PushVolume, TransferResult, TransferTicket

log = structlog.get_logger("flotilla.storage.transfer")

TICKET_TTL_S = 60.0
TICKET_READ_S = 5.0
IDLE_S = 120.0  # the longest wait for the next bytes of a stream
RESULT_TTL_S = 900.0
MAX_FRAME = 1 << 20
MAX_SESSIONS = 32
FRAME = struct.Struct(">I")

Job = Callable[[socket.socket], TransferResult]


class TransferError(Exception):
    """The peer broke the framing or went away mid-stream."""


def frames(conn: socket.socket) -> Iterator[bytes]:
    """The data frames of an upload until the empty frame; TransferError if the connection
    ends before it or a frame is larger than MAX_FRAME."""
    reader = conn.makefile("rb", buffering=MAX_FRAME)
    try:
        while True:
            head = reader.read(FRAME.size)
            if len(head) < FRAME.size:
                raise TransferError("the stream ended before its end mark (truncated)")
            (length,) = FRAME.unpack(head)
            if length == 0:
                return
            if length > MAX_FRAME:
                raise TransferError(f"frame of {length} bytes (at most {MAX_FRAME})")
            data = reader.read(length)
            if len(data) < length:
                raise TransferError("the stream ended mid-frame (truncated)")
            yield data
    finally:
        reader.close()


def send_frames(conn: socket.socket, chunks: Iterator[bytes]) -> None:
    """The client side of an upload: each chunk as frames, then the end mark."""
    for chunk in chunks:
        view = memoryview(chunk)
        for pos in range(0, len(view), MAX_FRAME):
            part = view[pos : pos + MAX_FRAME]
            conn.sendall(FRAME.pack(len(part)))
            conn.sendall(part)
    conn.sendall(FRAME.pack(0))


def read_line(conn: socket.socket | BinaryIO, limit: int = 65536) -> dict[str, Any]:
    """One JSON line from the peer."""
    data = b""
    while not data.endswith(b"\n"):
        got = conn.recv(1) if isinstance(conn, socket.socket) else conn.read(1)
        if not got:
            raise TransferError("the peer closed before its answer")
        data += got
        if len(data) > limit:
            raise TransferError("answer line too long")
    loaded = json.loads(data)
    if not isinstance(loaded, dict):
        raise TransferError("answer is not an object")
    return loaded


def _line(conn: socket.socket, data: dict[str, Any]) -> None:
    conn.sendall(json.dumps(data).encode() + b"\n")


def failed(exc: StorageError | TransferError) -> TransferResult:
    if isinstance(exc, StorageError):
        return TransferResult(state="failed", code=exc.code, message=exc.message)
    return TransferResult(state="failed", code="truncated", message=str(exc))


MAX_KERNEL_BYTES = 256 << 20


def kernel_check(fd: int) -> None:
    """BadImage unless the file open at `fd` is a kernel the VMM boots (bzImage, vmlinux,
    PVH ELF: the VMM's own loader, native.parse_image, decides)."""
    import native  # noqa: PLC0415  (the VMM's cffi module: loaded only for kernel imports)

    size = os.fstat(fd).st_size
    if size > MAX_KERNEL_BYTES:
        raise BadImage(f"{size} bytes is not a kernel image (at most {MAX_KERNEL_BYTES})")
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as data:
        try:
            native.parse_image(bytes(data))
        except ValueError as exc:
            raise BadImage(f"the image is of kind kernel but {exc}") from None


def image_check(kind: str | None) -> Callable[[int], None] | None:
    return kernel_check if kind == "kernel" else None


def job_for(pool: Pool, cmd: OpenTransfer) -> Job:
    """The file work a ticket stands for (checked when the ticket is asked for)."""
    if cmd.op == "image_import":
        return lambda conn: _import(pool, cmd, conn)
    if cmd.volume_id is None:
        raise ValueError(f"{cmd.op} names a volume_id")
    if cmd.op == "volume_upload":
        if cmd.size is None:
            raise ValueError("volume_upload names its size")
        return lambda conn: _upload(pool, cmd, conn)
    return lambda conn: _download(pool, cmd, conn)


def _import(pool: Pool, cmd: OpenTransfer, conn: socket.socket) -> TransferResult:
    image = ImageStore(pool).import_image(
        frames(conn), format=cmd.format, size=cmd.size, check=image_check(cmd.kind)
    )
    return TransferResult(
        state="done",
        size=image.size,
        sha256=image.sha256,
        source_format=image.source_format,
        deduplicated=image.deduplicated,
    )


def _upload(pool: Pool, cmd: OpenTransfer, conn: socket.socket) -> TransferResult:
    assert cmd.volume_id is not None
    assert cmd.size is not None
    digest = VolumeStore(pool).upload(str(cmd.volume_id), frames(conn), cmd.size, sha256=cmd.sha256)
    return TransferResult(state="done", size=digest.size, sha256=digest.sha256)


def _download(pool: Pool, cmd: OpenTransfer, conn: socket.socket) -> TransferResult:
    volumes = VolumeStore(pool)
    name = str(cmd.volume_id)
    chunks = volumes.read(name)
    size = volumes.info(name).size

    h = hashlib.sha256()
    started = False
    for chunk in chunks:  # the first step takes the shared lock: Busy before any byte
        if not started:
            _line(conn, {"size": size})
            started = True
        h.update(chunk)
        conn.sendall(chunk)
    if not started:
        _line(conn, {"size": size})
    return TransferResult(state="done", size=size, sha256=h.hexdigest())


class TransferServer:
    """The listening socket, its tickets, and the outcomes of recent transfers."""

    def __init__(
        self, listen_host: str = "127.0.0.1", port: int = 0, advertise: str | None = None
    ) -> None:
        self._listener = socket.create_server((listen_host, port))
        bound, self.port = self._listener.getsockname()[:2]
        self.address = advertise or (socket.getfqdn() if bound in ("0.0.0.0", "::") else bound)
        self._tickets: dict[str, tuple[float, Job]] = {}
        self._results: dict[str, tuple[float, TransferResult]] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_SESSIONS)
        self._stopping = False
        self._thread = threading.Thread(target=self._accept, name="storage-transfer", daemon=True)

    def start(self) -> TransferServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()

    def issue(self, job: Job) -> TransferTicket:
        ticket = secrets.token_hex(32)
        now = time.monotonic()
        with self._lock:
            self._tickets = {t: v for t, v in self._tickets.items() if v[0] > now}
            self._tickets[ticket] = (now + TICKET_TTL_S, job)
            self._results[ticket] = (now + RESULT_TTL_S, TransferResult(state="running"))
        return TransferTicket(address=self.address, port=self.port, ticket=ticket)

    def result(self, ticket: str) -> TransferResult:
        now = time.monotonic()
        with self._lock:
            for expired in [t for t, v in self._tickets.items() if v[0] <= now]:
                del self._tickets[expired]  # never redeemed: nothing was written
                self._results[expired] = (
                    now + RESULT_TTL_S,
                    TransferResult(state="failed", code="truncated", message="never streamed"),
                )
            self._results = {t: v for t, v in self._results.items() if v[0] > now}
            found = self._results.get(ticket)
        return found[1] if found is not None else TransferResult(state="unknown")

    def _finish(self, ticket: str, result: TransferResult) -> None:
        with self._lock:
            self._results[ticket] = (time.monotonic() + RESULT_TTL_S, result)

    def _accept(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._serve(conn)
        except OSError as exc:
            log.warning("transfer connection failed", error=str(exc))
        finally:
            self._slots.release()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(TICKET_READ_S)
        line = b""
        while not line.endswith(b"\n"):  # byte by byte: the stream follows the ticket
            got = conn.recv(1)
            if not got or len(line) > 80:
                return
            line += got
        ticket = line.strip().decode("ascii", "replace")
        with self._lock:
            entry = self._tickets.pop(ticket, None)
        if entry is None or entry[0] < time.monotonic():
            log.warning("transfer: bad or expired ticket")
            return
        conn.settimeout(IDLE_S)
        try:
            result = entry[1](conn)
        except (StorageError, TransferError) as exc:
            result = failed(exc)
        except OSError as exc:  # the peer went away mid-stream, or a timeout
            result = failed(TransferError(f"the connection failed mid-stream: {exc}"))
        except Exception as exc:
            log.exception("transfer failed")
            result = TransferResult(state="failed", code="internal", message=str(exc))
        self._finish(ticket, result)
        log.info("transfer ended", state=result.state, code=result.code, size=result.size)
        try:
            _line(conn, result.model_dump(mode="json"))
        except OSError:
            pass


def push_volume(pool: Pool, cmd: PushVolume) -> TransferResult:
    """The client side of a host-to-host volume move: volume `cmd.volume_id`'s bytes (under
    its shared lock, holes read as zeros, which the receiver leaves as holes again) to the
    ticket's port as an upload. `done` only when the receiver stored exactly what was sent:
    its size and sha256 match ours. Raises StorageError (Busy, NotFound) before any byte
    moves; a broken stream or a receiver's refusal is a `failed` result."""
    volumes = VolumeStore(pool)
    name = str(cmd.volume_id)
    size = volumes.info(name).size
    chunks = volumes.read(name)
    h = hashlib.sha256()
    first = next(chunks, None)  # the lock is taken here: Busy before we connect

    def hashed() -> Iterator[bytes]:
        chunk = first
        while chunk is not None:
            h.update(chunk)
            yield bytes(chunk)
            chunk = next(chunks, None)

    try:
        with socket.create_connection((cmd.address, cmd.port), timeout=IDLE_S) as conn:
            conn.sendall(cmd.ticket.encode("ascii") + b"\n")
            send_frames(conn, hashed())
            answer = TransferResult.model_validate(read_line(conn))
    except (OSError, TransferError, ValueError) as exc:
        return TransferResult(state="failed", code="truncated", message=f"push: {exc}")
    finally:
        if isinstance(chunks, Generator):
            chunks.close()  # the shared lock goes with it
    sent = h.hexdigest()
    if answer.state != "done":
        return answer
    if answer.size != size or answer.sha256 != sent:
        return TransferResult(
            state="failed",
            code="checksum_mismatch",
            message=f"the receiver stored {answer.size} bytes, sha256 {answer.sha256}; "
            f"sent {size}, sha256 {sent}",
        )
    return TransferResult(state="done", size=size, sha256=sent)
