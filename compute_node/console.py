"""Interactive consoles from anywhere: a TCP relay in front of the VMMs' `attach` sockets.

The VMM's console socket exists only on the compute host, so a caller elsewhere (the API's
WebSocket) asks the compute node for a ticket (`OpenConsole`), connects to the relay's TCP
port, sends the ticket and a newline, and from then on the connection carries the guest's
console both ways. A ticket is random (32 bytes), names one domain, is valid once and for
`TICKET_TTL_S` seconds; anything else on the port is closed at once.

Issuing a ticket attaches to the VMM's console then and there, and the ticket holds that
attachment until it is redeemed or expires: a console that another client holds is refused
when the ticket is asked for (`conflict`, so the API answers 409 before any upgrade), never
after the caller has connected.
"""

from __future__ import annotations

import secrets
import selectors
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import structlog

from compute_node.vmm import client as vmm_client
from protos.commands import OpenConsole
from protos.domain import PowerState
from protos.replies import ConsoleTicket, DomainInfo
from services.bus import Context, ServiceError, handles

log = structlog.get_logger("flotilla.compute.console")

TICKET_TTL_S = 30.0
TICKET_READ_S = 5.0  # the whole ticket line, not each recv
MAX_SESSIONS = 64
MAX_TICKET_LINE = 128
CHUNK = 65536


class ConsoleRelay:
    """The listening socket, its tickets and one pump thread per attached session."""

    def __init__(
        self,
        domains_dir: Path,
        listen_host: str = "127.0.0.1",
        port: int = 0,
        advertise: str | None = None,
    ) -> None:
        self.domains_dir = domains_dir
        self._listener = socket.create_server((listen_host, port))
        bound, self.port = self._listener.getsockname()[:2]
        # What callers on other hosts connect to: a wildcard bind is no address to give out.
        self.address = advertise or (socket.getfqdn() if bound in ("0.0.0.0", "::") else bound)
        self._tickets: dict[str, _Ticket] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._slots = threading.BoundedSemaphore(MAX_SESSIONS)
        self._sessions: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, name="console-relay", daemon=True)

    def start(self) -> ConsoleRelay:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        for sock in [self._listener, *self._live()]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._listener.close()
        with self._lock:
            held, self._tickets = list(self._tickets.values()), {}
        for entry in held:
            entry.vmm.close()

    def _live(self) -> list[socket.socket]:
        with self._lock:
            return list(self._sessions)

    def issue(self, domain_id: uuid.UUID) -> str:
        """Attach to the domain's console and return a ticket holding that attachment.

        Raises ServiceError `conflict` when another client is attached (reason `busy`) or no
        VMM answers (the domain is not running), `unavailable` for any other VMM trouble.
        """
        try:
            vmm = vmm_client.VmmClient(self.domains_dir / str(domain_id)).attach()
        except vmm_client.VmmRequestError as exc:
            if exc.code == "busy":
                raise ServiceError(
                    "conflict",
                    "the console is busy: another client is attached",
                    {"reason": "busy"},
                ) from None
            raise ServiceError("unavailable", f"console attach failed: {exc}") from None
        except vmm_client.VmmGone:
            raise ServiceError("conflict", "domain is not running") from None
        except vmm_client.VmmClientError as exc:
            raise ServiceError("unavailable", f"console attach failed: {exc}") from None
        ticket = secrets.token_hex(32)
        timer = threading.Timer(TICKET_TTL_S, self._expire, args=(ticket,))
        timer.daemon = True
        with self._lock:
            self._tickets[ticket] = _Ticket(domain_id, time.monotonic() + TICKET_TTL_S, vmm)
        timer.start()
        return ticket

    def _expire(self, ticket: str) -> None:
        """An unredeemed ticket lets go of the console it holds."""
        with self._lock:
            entry = self._tickets.pop(ticket, None)
        if entry is not None:
            entry.vmm.close()

    def _redeem(self, ticket: str) -> _Ticket | None:
        with self._lock:
            entry = self._tickets.pop(ticket, None)
        if entry is not None and entry.expires < time.monotonic():
            entry.vmm.close()
            return None
        return entry

    def _accept(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                conn.close()  # full: a flood of idle connections must not pile up threads
                continue
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        try:
            self._serve(conn)
        finally:
            self._slots.release()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            line = b""
            deadline = time.monotonic() + TICKET_READ_S
            try:
                while b"\n" not in line and len(line) <= MAX_TICKET_LINE:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    conn.settimeout(left)
                    chunk = conn.recv(CHUNK)
                    if not chunk:
                        return
                    line += chunk
            except OSError:
                return
            ticket, newline, early = line.partition(b"\n")
            entry = self._redeem(ticket.strip().decode("ascii", "replace")) if newline else None
            if entry is None:
                log.warning("console relay: bad or expired ticket")
                return
            with entry.vmm as vmm:
                conn.settimeout(None)
                with self._lock:
                    self._sessions.update((conn, vmm))
                try:
                    if early:  # keystrokes sent right behind the ticket
                        vmm.sendall(early)
                    _pump(conn, vmm)
                except OSError:
                    pass
                finally:
                    with self._lock:
                        self._sessions.difference_update((conn, vmm))


class _Ticket(NamedTuple):
    domain_id: uuid.UUID
    expires: float  # time.monotonic()
    vmm: socket.socket  # the console attachment it holds


def _pump(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    peers = {a: b, b: a}
    with selectors.DefaultSelector() as sel:
        for s in peers:
            sel.register(s, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select():
                src: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    data = src.recv(CHUNK)
                    if not data:
                        return
                    peers[src].sendall(data)
                except OSError:
                    return


class ConsoleHandlers:
    """The compute node's `OpenConsole` handler (mixed into its lifecycle service, which
    provides `info`)."""

    relay: ConsoleRelay | None = None
    info: Callable[[uuid.UUID], DomainInfo]  # the lifecycle service's

    @handles(OpenConsole)
    def open_console(self, cmd: OpenConsole, _ctx: Context) -> ConsoleTicket:
        info = self.info(cmd.domain_id)
        if self.relay is None:
            raise ServiceError("unsupported", "this compute node has no console relay")
        if info.state in (PowerState.SHUTOFF, PowerState.NOSTATE):
            raise ServiceError("conflict", "domain is not running", {"state": info.state.value})
        return ConsoleTicket(
            domain_id=cmd.domain_id,
            address=self.relay.address,
            port=self.relay.port,
            ticket=self.relay.issue(cmd.domain_id),
            expires_s=TICKET_TTL_S,
        )
