"""The VMM's selector loop: one thread over the control socket, its connections, the console
pipe, the machine's event fd and a signal wake-up fd (docs/vmm.md). Requests are decoded into
protocol records and handed to `Operations`; the machine's own vCPU and console-input threads
live in the native runtime."""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
import sys
import time

from compute_node.vmm import protocol as p
from compute_node.vmm.config import LaunchConfig
from compute_node.vmm.console import ConsoleBuffer
from compute_node.vmm.frames import (
    CONSOLE_LOG,
    CONTROL_SOCKET,
    JOURNAL,
    MAX_REQUEST,
    PID_FILE,
    FrameError,
    FrameReader,
    Journal,
    JournalRecord,
    pack_frame,
    read_journal,
)
from compute_node.vmm.guest import EXIT_FAILED, Fatal, Guest, control_error
from compute_node.vmm.migration import Incoming
from compute_node.vmm.operations import Operations
from native.machine import Disk, Nic, VmmError

# A subscriber this far behind is cut off (it sees EOF, checks status and resubscribes).
SUBSCRIBER_BACKLOG_MAX = 16 * 1024 * 1024
# Console output queued for a slow attached client beyond this is dropped, never buffered.
ATTACH_BACKLOG_MAX = 1024 * 1024
EXIT_FLUSH_SECONDS = 2.0
MAX_CONNECTIONS = 64


class Conn:
    """One control connection: request/reply turns, then maybe a subscription or an attach."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = FrameReader(MAX_REQUEST)
        self.out = bytearray()
        self.mode = "request"  # | "subscribe" | "attach" | "migrating" (awaits its outcome)
        self.from_n = 0  # a subscription's start
        self.closing = False  # close once `out` is sent
        self.closed = False
        self.events = 0


def _refusal(exc: Exception) -> p.ControlError:
    """A failed request's refusal; a handler's own bug answers `internal`."""
    if isinstance(exc, p.ControlError):
        return exc
    if isinstance(exc, VmmError):
        return control_error(exc)
    return p.ControlError("internal", repr(exc))


class Loop:
    """The event loop; see the module docstring."""

    def __init__(
        self,
        config: LaunchConfig,
        journal: Journal,
        listener: socket.socket,
        cgroup: str | None,
        cgroup_error: str | None,
    ) -> None:
        self.listener = listener
        self.cgroup = cgroup
        self.cgroup_error = cgroup_error
        self.sel = selectors.DefaultSelector()
        console = ConsoleBuffer(
            config.console_ring_bytes, CONSOLE_LOG if config.console_log else None
        )
        self.guest = Guest(config, journal, console, self.sel, self._publish)
        self.ops = Operations(self)
        self.conns: set[Conn] = set()
        self.subscribers: set[Conn] = set()
        self.attached: Conn | None = None
        self.input_pending = bytearray()
        self.input_waiting = False
        self._signal_r, self._signal_w = socket.socketpair()
        # A migration's thread sends a byte here when it ends (compute_node.vmm.migration).
        self._wake_r, self.wake_w = socket.socketpair()
        self.config = config

    def boot(self) -> None:
        """Sets up the loop's sources and boots (or restores) the guest; VmmError propagates."""
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, self._on_accept)
        self.sel.register(self.guest.console.out_r, selectors.EVENT_READ, self._on_console)
        for s in (self._signal_r, self._signal_w, self._wake_r):
            s.setblocking(False)
        self.sel.register(self._signal_r, selectors.EVENT_READ, self._on_signal)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_migration)
        signal.set_wakeup_fd(self._signal_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda _s, _f: None)  # the wake-up fd carries it to the loop
        incoming = self.config.incoming
        if incoming is None:
            self.guest.boot()
            return
        # No machine until the source commits: wait for it on a thread, answering meanwhile.
        try:
            inc = Incoming(incoming, self.wake_w)
        except (OSError, ValueError) as exc:
            raise VmmError(f"cannot listen for the migration: {exc}", errno.EINVAL) from exc
        self.ops.incoming = inc
        cfg = self.config
        inc.start(
            console_out=self.guest.console.out_w,
            console_in=self.guest.console.in_r,
            disks=[Disk(d.path, read_only=d.read_only, id=d.id) for d in cfg.disks],
            nics=[Nic(fd, mac) for fd, mac in cfg.nics],
            memory_mib=cfg.memory_mib,
            vcpus=cfg.vcpus,
        )

    def _on_migration(self, _mask: int) -> None:
        try:
            self._wake_r.recv(64)
        except BlockingIOError:
            return
        if self.ops.outgoing is not None and self.ops.outgoing.ended:
            self.ops.outgoing_ended()
        self.ops.incoming_ended()

    def reply_frame(self, reply: p.Reply) -> bytes:
        return pack_frame(p.encode_reply(reply))

    def update(self, conn: Conn) -> None:
        """Watches `conn` for what it needs now (after a reply was queued for it)."""
        self._update(conn)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        guest = self.guest
        try:
            while guest.exit_code is None:
                deadline = self.ops.deadline()
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready = self.sel.select(timeout)
                for key, mask in ready:
                    key.data(mask)
                    if guest.exit_code is not None:
                        break
                deadline = self.ops.deadline()
                if deadline is not None and time.monotonic() >= deadline:
                    self.ops.release()  # its client went quiet: the guest must not stay paused
        except Fatal as exc:
            guest.die(str(exc))
        except Exception as exc:
            guest.die(f"vmm error: {exc!r}")
        self._close_all()
        return EXIT_FAILED if guest.exit_code is None else guest.exit_code

    def _close_all(self) -> None:
        """Sends what is queued (the last reply and records) within a bound, then closes."""
        # What the guest wrote last (before a save's pause, say) is still in the pipe: into
        # the log with it, or a restored guest's output would follow a gap.
        self.drain_console()
        _unlink(CONTROL_SOCKET)
        self.listener.close()
        deadline = time.monotonic() + EXIT_FLUSH_SECONDS
        for conn in list(self.conns):
            left = deadline - time.monotonic()
            if conn.out and left > 0 and conn.mode != "attach":
                try:
                    conn.sock.setblocking(True)
                    conn.sock.settimeout(left)
                    conn.sock.sendall(conn.out)
                except OSError:
                    pass
            conn.sock.close()
        try:
            self.guest.end_machine()
        except Exception:
            pass
        _unlink(PID_FILE)
        self.guest.journal.close()

    def _on_signal(self, _mask: int) -> None:
        try:
            data = self._signal_r.recv(64)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.ops.hold = None
                self.ops.settle_outgoing()
                self.ops.stop_incoming()
                self.guest.destroy(f"signal {signal.Signals(signum).name}")
                return

    def _on_accept(self, _mask: int) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        except OSError:
            # Out of fds: the listener stays readable; don't spin on it.
            time.sleep(0.01)
            return
        if len(self.conns) >= MAX_CONNECTIONS:
            sock.close()
            return
        sock.setblocking(False)
        conn = Conn(sock)
        self.conns.add(conn)
        conn.events = selectors.EVENT_READ
        self.sel.register(sock, conn.events, lambda mask, c=conn: self._on_conn(c, mask))

    def drain_console(self) -> None:
        self._on_console(0)

    def _on_console(self, _mask: int) -> None:
        data = self.guest.console.read()
        attached = self.attached
        if data and attached is not None:
            room = ATTACH_BACKLOG_MAX - len(attached.out)
            if room > 0:
                attached.out += data[:room]
                self._update(attached)

    # -- connections ------------------------------------------------------------------------

    def _update(self, conn: Conn) -> None:
        if conn.closed:
            return
        events = selectors.EVENT_WRITE if conn.out else 0
        if conn.closing:
            if not conn.out:
                self._close(conn)
                return
        elif conn.mode != "attach" or not self.input_pending:
            events |= selectors.EVENT_READ
        if events == 0:
            # Attached and waiting for the guest to take input: nothing to watch for now.
            if conn.events:
                self.sel.unregister(conn.sock)
        elif conn.events == 0:
            self.sel.register(conn.sock, events, lambda mask, c=conn: self._on_conn(c, mask))
        elif events != conn.events:
            self.sel.modify(conn.sock, events, lambda mask, c=conn: self._on_conn(c, mask))
        conn.events = events

    def _close(self, conn: Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.events:
            try:
                self.sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.sock.close()
        self.conns.discard(conn)
        self.subscribers.discard(conn)
        if self.ops.hold is not None and self.ops.hold.conn is conn:
            self.ops.release()  # the snapshot's client went away: the guest goes on
        if self.attached is conn:
            self.attached = None
            self.input_pending.clear()
            self._pump_input()

    def _on_conn(self, conn: Conn, mask: int) -> None:
        try:
            self._conn_io(conn, mask)
        except Fatal:
            raise
        except Exception as exc:
            # A connection's trouble ends that connection, never the guest.
            print(f"compute_node.vmm: dropping a connection: {exc!r}", file=sys.stderr)
            self._close(conn)

    def _conn_io(self, conn: Conn, mask: int) -> None:
        if conn.closed:
            return
        if mask & selectors.EVENT_WRITE and conn.out:
            try:
                sent = conn.sock.send(conn.out)
                del conn.out[:sent]
            except BlockingIOError:
                pass
            except OSError:
                self._close(conn)
                return
        if mask & selectors.EVENT_READ:
            try:
                data = conn.sock.recv(65536)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data == b"":
                self._close(conn)
                return
            if data:
                if conn.mode == "request":
                    conn.reader.feed(data)
                    self._serve(conn)
                elif conn.mode == "attach":
                    self._console_input(data)
                # A subscriber's (or a migration waiter's) own bytes mean nothing; it is
                # read only to notice EOF.
        self._update(conn)

    def _serve(self, conn: Conn) -> None:
        while conn.mode == "request" and not conn.closing and self.guest.exit_code is None:
            try:
                frame = conn.reader.next_frame()
            except FrameError as exc:
                conn.out += pack_frame(p.encode_error(p.ControlError("bad_frame", str(exc))))
                conn.closing = True
                return
            if frame is None:
                return
            try:
                reply = self.ops.handle(conn, p.decode_request(frame))
                if reply is not None:  # None: it comes later (a migration's outcome)
                    conn.out += pack_frame(p.encode_reply(reply))
            except Fatal:
                raise
            except Exception as exc:
                conn.out += pack_frame(p.encode_error(_refusal(exc)))
            if conn.mode == "subscribe":
                self._send_backlog(conn)
            elif conn.mode == "attach":
                rest = conn.reader.take_rest()
                if rest:
                    self._console_input(rest)

    # -- journal records to subscribers -----------------------------------------------------

    def _publish(self, record: JournalRecord) -> None:
        """Sent at once, not on the loop's next turn, which may come only after a policy's
        action (ending a machine takes ms)."""
        frame = pack_frame({"record": dict(record)})
        for conn in list(self.subscribers):
            if len(conn.out) > SUBSCRIBER_BACKLOG_MAX:
                self._close(conn)
                continue
            conn.out += frame
            self._conn_io(conn, selectors.EVENT_WRITE)

    def _send_backlog(self, conn: Conn) -> None:
        for record in read_journal(JOURNAL, conn.from_n):
            conn.out += pack_frame({"record": dict(record)})
        self.subscribers.add(conn)

    # -- console input ----------------------------------------------------------------------

    def _console_input(self, data: bytes) -> None:
        self.input_pending += data
        self._pump_input()

    def _pump_input(self) -> None:
        """Moves attached input into the UART's pipe; waits (not buffers) when it is full."""
        in_w = self.guest.console.in_w
        while self.input_pending:
            try:
                n = os.write(in_w, self.input_pending)
            except BlockingIOError:
                break
            del self.input_pending[:n]
        want = bool(self.input_pending)
        if want and not self.input_waiting:
            self.sel.register(in_w, selectors.EVENT_WRITE, lambda _m: self._pump_input())
        elif not want and self.input_waiting:
            self.sel.unregister(in_w)
        self.input_waiting = want
        if self.attached is not None:
            self._update(self.attached)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)  # noqa: PTH108 (pathlib costs the VMM import time)
    except OSError:
        pass
