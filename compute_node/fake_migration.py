"""The fake driver's live migration: a real stream between two processes over TCP.

The fake machine has no memory to copy, so the stream carries what it has, in the shape of a
pre-copy (docs/migration.md): the one-time token first, then `memory_mib` MiB of padding in
rounds (capped by the job's bandwidth, cancellable between chunks, progress reported), then,
with the source paused, the machine's state (power, console, counters) as a JSON blob; the
target answers `ready`, the source `commit`, the target runs the machine and answers `done`
with the pause it measured. Each message is one JSON line; padding is raw bytes.

A connection whose first line is not this domain's token is refused and closed, and the
listener waits on for the right one; the token is spent by the first stream that passes.
"""

from __future__ import annotations

import hmac
import json
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from compute_node.driver import DriverError, IncomingMachine, MigrationOutcome, MigrationStats
from protos.migration import MIGRATION_PROGRESS_S, MigrationParams

log = structlog.get_logger("flotilla.fake")

CHUNK = 1 << 20
MAX_PADDING = 64 << 20  # the padding a big fake guest sends, at most
MAX_LINE = 1 << 20
ACCEPT_POLL_S = 0.2
IO_TIMEOUT_S = 10.0


class StreamError(Exception):
    """The migration stream broke or the peer refused it."""


def send_line(conn: socket.socket, body: dict[str, Any]) -> None:
    conn.sendall(json.dumps(body).encode() + b"\n")


def read_line(conn: socket.socket) -> dict[str, Any]:
    """One JSON object line, read a byte at a time (so no padding is swallowed)."""
    data = bytearray()
    while True:
        b = conn.recv(1)
        if not b:
            raise StreamError("connection closed")
        if b == b"\n":
            break
        data += b
        if len(data) > MAX_LINE:
            raise StreamError("line too long")
    try:
        body = json.loads(data)
    except ValueError:
        raise StreamError("not JSON") from None
    if not isinstance(body, dict):
        raise StreamError("not a JSON object")
    return body


def read_exact(conn: socket.socket, n: int) -> None:
    left = n
    while left:
        got = conn.recv(min(left, CHUNK))
        if not got:
            raise StreamError("connection closed in the memory stream")
        left -= len(got)


# ---- the target ---------------------------------------------------------------------------


@dataclass
class Incoming:
    """A machine waiting for its stream: `arrive(state, downtime_start)` makes it run."""

    domain_id: uuid.UUID
    token: str
    listener: socket.socket
    arrive: Callable[[dict[str, Any]], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    running: bool = False
    thread: threading.Thread | None = None
    # The machine runs but the connection drops before `done` (a test's fault): the source
    # cannot know whether it committed.
    drop_before_done: bool = False

    def endpoint(self) -> IncomingMachine:
        address, port = self.listener.getsockname()[:2]
        return IncomingMachine(address=str(address), port=int(port), token=self.token)

    def cancel(self) -> None:
        self.cancelled.set()


def listen(
    domain_id: uuid.UUID,
    address: str,
    arrive: Callable[[dict[str, Any]], None],
    ended: Callable[[Incoming], None],
) -> Incoming:
    """Listen on `address` (any free port) for the domain's stream, on a thread; `arrive` is
    called with the machine state once the source commits; `ended` when the wait ends either
    way (the machine runs, the stream failed or the wait was cancelled)."""
    try:
        listener = socket.create_server((address, 0))
    except OSError as exc:
        raise DriverError(
            f"cannot listen for a migration on {address}: {exc}", "spawn_failed"
        ) from None
    listener.settimeout(ACCEPT_POLL_S)
    incoming = Incoming(domain_id, secrets.token_hex(32), listener, arrive)
    incoming.thread = threading.Thread(
        target=_serve, args=(incoming, ended), name=f"fake-incoming-{domain_id}", daemon=True
    )
    incoming.thread.start()
    return incoming


def _serve(incoming: Incoming, ended: Callable[[Incoming], None]) -> None:
    try:
        while not incoming.cancelled.is_set():
            try:
                conn, _ = incoming.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(IO_TIMEOUT_S)
                try:
                    if not _authenticated(incoming, conn):
                        continue
                    _receive(incoming, conn)
                except (StreamError, OSError) as exc:
                    log.warning(
                        "incoming migration failed",
                        domain_id=str(incoming.domain_id),
                        error=str(exc),
                    )
                return  # the token is spent: one stream, whatever its end
    finally:
        incoming.listener.close()
        ended(incoming)


def _authenticated(incoming: Incoming, conn: socket.socket) -> bool:
    try:
        hello = read_line(conn)
    except (StreamError, OSError):
        return False
    token, domain = str(hello.get("token", "")), str(hello.get("domain_id", ""))
    good = hmac.compare_digest(token.encode(), incoming.token.encode())
    if not good or domain != str(incoming.domain_id):
        log.warning("migration stream refused: bad token", domain_id=str(incoming.domain_id))
        try:
            send_line(conn, {"error": "refused"})
        except OSError:
            pass
        return False
    send_line(conn, {"ok": True})
    return True


def _receive(incoming: Incoming, conn: socket.socket) -> None:
    while True:
        message = read_line(conn)
        if "memory" in message:
            size = int(message["memory"])
            if not 0 <= size <= MAX_PADDING:
                raise StreamError(f"memory round of {size} bytes")
            read_exact(conn, size)
        elif "state" in message:
            paused_at = time.monotonic()
            state = message["state"]
            if not isinstance(state, dict):
                raise StreamError("state is no object")
            send_line(conn, {"ready": True})
            if read_line(conn).get("commit") is not True:
                raise StreamError("no commit")
            if incoming.cancelled.is_set():
                raise StreamError("cancelled")
            incoming.running = True
            incoming.arrive(state)
            if incoming.drop_before_done:
                raise StreamError("dropped before confirming (as asked)")
            downtime_ms = (time.monotonic() - paused_at) * 1e3
            send_line(conn, {"done": True, "downtime_ms": downtime_ms})
            return
        else:
            raise StreamError(f"unexpected message {sorted(message)}")


# ---- the source ----------------------------------------------------------------------------


@dataclass
class Outgoing:
    """A running migrate_out: what `migration_set` and `migration_cancel` change."""

    params: MigrationParams
    cancelled: threading.Event = field(default_factory=threading.Event)
    committed: bool = False


class Stream:
    """The source's end: pre-copy rounds of padding, then the state, then the commit."""

    def __init__(
        self,
        domain_id: uuid.UUID,
        target: IncomingMachine,
        job: Outgoing,
        memory_bytes: int,
        progress: Callable[[MigrationStats], None],
    ) -> None:
        self.domain_id = domain_id
        self.target = target
        self.job = job
        self.memory_bytes = memory_bytes
        self.progress = progress
        self.started = time.monotonic()
        self.sent = 0
        self.iteration = 0
        self._last_progress = -MIGRATION_PROGRESS_S
        self.conn: socket.socket | None = None

    def stats(self, phase: str, remaining: int = 0) -> MigrationStats:
        elapsed = time.monotonic() - self.started
        return MigrationStats(
            phase=phase,
            iteration=self.iteration,
            bytes_sent=self.sent,
            remaining_bytes=remaining,
            memory_bytes=self.memory_bytes,
            bandwidth=int(self.sent / elapsed) if elapsed > 0 else 0,
            elapsed_ms=elapsed * 1e3,
        )

    def open(self) -> None:
        try:
            conn = socket.create_connection((self.target.address, self.target.port), IO_TIMEOUT_S)
        except OSError as exc:
            raise StreamError(f"cannot reach the target: {exc}") from None
        self.conn = conn
        send_line(conn, {"token": self.target.token, "domain_id": str(self.domain_id)})
        if read_line(conn).get("ok") is not True:
            raise StreamError("the target refused the token")

    def precopy(self) -> None:
        """Two rounds: all of the padding, then an eighth of it (the pages dirtied since)."""
        assert self.conn is not None
        padding = min(self.memory_bytes, MAX_PADDING)
        for size in (padding, padding // 8):
            self.iteration += 1
            send_line(self.conn, {"memory": size})
            left = size
            while left:
                self.check_cancelled()
                n = min(left, CHUNK)
                self.conn.sendall(bytes(n))
                left -= n
                self.sent += n
                self._pace()
                self.report("precopy", left)

    def check_cancelled(self) -> None:
        if self.job.cancelled.is_set():
            raise StreamError("cancelled")

    def _pace(self) -> None:
        cap = self.job.params.bandwidth_mibps
        if cap:
            due = self.started + self.sent / (cap << 20)
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def report(self, phase: str, remaining: int) -> None:
        """Call `progress`, at most every MIGRATION_PROGRESS_S."""
        now = time.monotonic()
        if now - self._last_progress >= MIGRATION_PROGRESS_S:
            self._last_progress = now
            self.progress(self.stats(phase, remaining))

    def send_state(self, state: dict[str, Any]) -> None:
        assert self.conn is not None
        send_line(self.conn, {"state": state})
        if read_line(self.conn).get("ready") is not True:
            raise StreamError("the target did not load the state")

    def commit(self) -> float:
        """Say commit; return the pause the target measured. StreamError after the commit
        was sent means only the target knows whether it runs."""
        assert self.conn is not None
        send_line(self.conn, {"commit": True})
        self.job.committed = True
        done = read_line(self.conn)
        if done.get("done") is not True:
            raise StreamError("the target did not confirm")
        return float(done.get("downtime_ms", 0.0))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def outcome(
    stream: Stream, committed: bool, phase: str, paused_ms: float | None, **rest: Any
) -> MigrationOutcome:
    return MigrationOutcome(
        committed=committed,
        phase=phase,
        stats=stream.stats(phase),
        paused_ms=paused_ms,
        **rest,
    )
