"""`python -m compute_node.vmm <domain-dir>`: the process that runs one guest (docs/vmm.md).

It owns the guest's `native.Machine`, applies the domain's on_poweroff/on_reboot/on_crash
policies itself (so a guest is handled correctly while no worker is connected), journals every
lifecycle change to `<domain-dir>/journal` before telling anyone, and answers control requests
on `<domain-dir>/control.sock`. One thread runs one selector loop over the control socket, its
connections, the console pipe, the machine's event fd and a signal wake-up fd; the machine's
own vCPU and console-input threads live in the native runtime.

Imports only the standard library, msgpack and `native`: it starts once per guest start.
"""

from __future__ import annotations

import errno
import fcntl
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

if sys.flags.no_site:
    # spawn() runs us under `python -S -E` (~20 ms sooner): add only the site-packages that
    # hold msgpack and cffi's backend, the venv's when run from one (no .pth processing).
    _ver = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for _root in (os.path.dirname(os.path.dirname(sys.executable)), sys.prefix):  # noqa: PTH120
        _dir = os.path.join(_root, "lib", _ver, "site-packages")  # noqa: PTH118
        if os.path.isdir(_dir) and _dir not in sys.path:  # noqa: PTH112
            sys.path.append(_dir)
    try:
        import msgpack  # noqa: F401
    except ImportError:  # an interpreter laid out otherwise: pay for the full site set-up
        import site

        site.main()

from compute_node.vmm_config import ConfigInvalid, VmmConfig, join_cgroup, load_config
from compute_node.vmm_console import ConsoleBuffer
from compute_node.vmm_proto import (
    CONFIG_FILE,
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
from native.machine import (
    ConfigError,
    Disk,
    Event,
    EventKind,
    Machine,
    MachineStateError,
    Nic,
    ShutdownMethod,
    VmmError,
)

# A subscriber this far behind is cut off (it sees EOF, checks status and resubscribes).
SUBSCRIBER_BACKLOG_MAX = 16 * 1024 * 1024
# Console output queued for a slow attached client beyond this is dropped, never buffered.
ATTACH_BACKLOG_MAX = 1024 * 1024
EXIT_FLUSH_SECONDS = 2.0
MAX_CONNECTIONS = 64

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 64


class RequestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Fatal(Exception):
    """The VMM cannot go on (e.g. a policy restart failed): journal `stopped`/failed, exit 1."""


class Conn:
    """One control connection: request/reply turns, then maybe a subscription or an attach."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = FrameReader(MAX_REQUEST)
        self.out = bytearray()
        self.mode = "request"  # | "subscribe" | "attach"
        self.closing = False  # close once `out` is sent
        self.closed = False
        self.events = 0


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": message, "code": code}


def _error_code(exc: Exception) -> tuple[str, str]:
    """A failed request's (code, message); a handler's own bug answers `internal`."""
    if isinstance(exc, RequestError):
        return exc.code, exc.message
    if isinstance(exc, MachineStateError):
        return "state", exc.message
    if isinstance(exc, VmmError):
        return ("unsupported" if exc.errno == errno.ENOTSUP else "vmm"), exc.message
    return "internal", repr(exc)


class Vmm:
    """The event loop and the domain's lifecycle; see the module docstring."""

    def __init__(
        self,
        config: VmmConfig,
        journal: Journal,
        listener: socket.socket,
        cgroup: str | None,
        cgroup_error: str | None,
    ) -> None:
        self.config = config
        self.journal = journal
        self.listener = listener
        self.cgroup = cgroup
        self.cgroup_error = cgroup_error
        self.sel = selectors.DefaultSelector()
        self.console = ConsoleBuffer(
            config.console_ring_bytes, CONSOLE_LOG if config.console_log else None
        )
        self.machine: Machine | None = None
        self.machine_started = False
        self.state = "shutoff"
        self.started_at = 0.0
        self.shutdown_requested = False
        self.reboot_requested = False
        self.conns: set[Conn] = set()
        self.subscribers: set[Conn] = set()
        self.attached: Conn | None = None
        self.input_pending = bytearray()
        self.input_waiting = False
        self.exit_code: int | None = None
        self._signal_r, self._signal_w = socket.socketpair()
        self._ops: dict[str, Callable[[Conn, dict[str, Any]], dict[str, Any]]] = {
            "status": self._op_status,
            "pause": self._op_pause,
            "resume": self._op_resume,
            "shutdown": self._op_shutdown,
            "destroy": self._op_destroy,
            "reboot": self._op_reboot,
            "stats": self._op_stats,
            "console": self._op_console,
            "subscribe": self._op_subscribe,
            "attach": self._op_attach,
        }

    # -- setup ------------------------------------------------------------------------------

    def boot(self) -> None:
        """Configures and starts the first machine; VmmError/ConfigError propagate."""
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, self._on_accept)
        self.sel.register(self.console.out_r, selectors.EVENT_READ, self._on_console)
        for s in (self._signal_r, self._signal_w):
            s.setblocking(False)
        self.sel.register(self._signal_r, selectors.EVENT_READ, self._on_signal)
        signal.set_wakeup_fd(self._signal_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda _s, _f: None)  # the wake-up fd carries it to the loop
        self._new_machine()
        if self.config.start_paused:
            self.state = "paused"
            self._record("started", "", "booted")
            self._record("paused", "start_paused")
        else:
            self._start_machine()
            self._record("started", "", "booted")

    def _new_machine(self) -> None:
        cfg = self.config
        machine = Machine(
            cfg.kernel,
            initrd=cfg.initrd,
            cmdline=cfg.cmdline,
            memory_mib=cfg.memory_mib,
            vcpus=cfg.vcpus,
            console_out=self.console.out_w,
            console_in=self.console.in_r,
            disks=[Disk(d.path, read_only=d.read_only, id=d.id) for d in cfg.disks],
            nics=[Nic(fd, mac) for fd, mac in cfg.nics],
        )
        self.machine = machine
        self.machine_started = False
        self.shutdown_requested = False
        self.reboot_requested = False
        self.sel.register(machine.event_fd, selectors.EVENT_READ, self._on_machine_event)

    def _start_machine(self) -> None:
        assert self.machine is not None
        self.machine.start()
        self.machine_started = True
        self.started_at = time.time()
        self.state = "running"

    def _end_machine(self) -> None:
        machine, self.machine = self.machine, None
        self.machine_started = False
        if machine is None:
            return
        try:
            self.sel.unregister(machine.event_fd)
        except (KeyError, ValueError, VmmError):
            pass
        machine.close()

    def _restart(self) -> None:
        """A fresh machine from the same config, running; Fatal if it cannot be made."""
        self._end_machine()
        try:
            self._new_machine()
            self._start_machine()
        except VmmError as exc:
            self._end_machine()
            raise Fatal(f"restart failed: {exc.message}") from exc

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        try:
            while self.exit_code is None:
                for key, mask in self.sel.select():
                    key.data(mask)
                    if self.exit_code is not None:
                        break
        except Fatal as exc:
            self._die(str(exc))
        except Exception as exc:
            self._die(f"vmm error: {exc!r}")
        self._close_all()
        return EXIT_FAILED if self.exit_code is None else self.exit_code

    def _die(self, detail: str) -> None:
        try:
            self._end_machine()
        except Exception:
            pass  # the process exit releases the rest
        try:
            self._record("stopped", "failed", detail)
        except Exception:
            pass
        self.exit_code = EXIT_FAILED

    def _finish(self, code: int) -> None:
        self.exit_code = code

    def _close_all(self) -> None:
        """Sends what is queued (the last reply and records) within a bound, then closes."""
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
            self._end_machine()
        except Exception:
            pass
        _unlink(PID_FILE)
        self.journal.close()

    def _on_signal(self, _mask: int) -> None:
        try:
            data = self._signal_r.recv(64)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._destroy(f"signal {signal.Signals(signum).name}")
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

    def _on_console(self, _mask: int) -> None:
        data = self.console.read()
        attached = self.attached
        if data and attached is not None:
            room = ATTACH_BACKLOG_MAX - len(attached.out)
            if room > 0:
                attached.out += data[:room]
                self._update(attached)

    def _on_machine_event(self, _mask: int) -> None:
        machine = self.machine
        while machine is not None and machine is self.machine:
            event = machine.read_event()
            if event is None:
                return
            self._on_event(event)

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
                # A subscriber's own bytes mean nothing; it is read only to notice EOF.
        self._update(conn)

    def _serve(self, conn: Conn) -> None:
        while conn.mode == "request" and not conn.closing and self.exit_code is None:
            try:
                request = conn.reader.next_frame()
            except FrameError as exc:
                conn.out += pack_frame(_error("bad_frame", str(exc)))
                conn.closing = True
                return
            if request is None:
                return
            conn.out += pack_frame(self._dispatch(conn, request))
            if conn.mode == "subscribe":
                self._send_backlog(conn, request)
            elif conn.mode == "attach":
                rest = conn.reader.take_rest()
                if rest:
                    self._console_input(rest)

    def _dispatch(self, conn: Conn, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        handler = self._ops.get(op) if isinstance(op, str) else None
        if handler is None:
            return _error("unknown_op", f"unknown op {op!r}")
        try:
            return handler(conn, request)
        except Fatal:
            raise
        except Exception as exc:
            return _error(*_error_code(exc))

    # -- journal ----------------------------------------------------------------------------

    def _record(self, kind: str, reason: str = "", detail: str = "") -> None:
        """Journals (fsync'ed) first, then tells subscribers: sent at once, not on the loop's
        next turn, which may come only after a policy's action (ending a machine takes ms)."""
        record = self.journal.append(kind, reason, detail)
        frame = pack_frame({"record": dict(record)})
        for conn in list(self.subscribers):
            if len(conn.out) > SUBSCRIBER_BACKLOG_MAX:
                self._close(conn)
                continue
            conn.out += frame
            self._conn_io(conn, selectors.EVENT_WRITE)

    def _send_backlog(self, conn: Conn, request: dict[str, Any]) -> None:
        from_n = request.get("from_n", 0)
        records: list[JournalRecord] = read_journal(JOURNAL, from_n)
        for record in records:
            conn.out += pack_frame({"record": dict(record)})
        self.subscribers.add(conn)

    # -- machine events and policies --------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if event.kind is EventKind.POWEROFF:
            if self.reboot_requested:
                # A reboot asked of a guest that powers off instead (libvirt's fake reboot).
                self._on_reset("host", f"guest powered off ({event.reason})")
                return
            self._record("shutdown", event.reason, "host" if self.shutdown_requested else "guest")
            self._apply(self.config.on_poweroff, "poweroff", "shutdown", "poweroff")
        elif event.kind is EventKind.REBOOT:
            self._on_reset(event.reason, "host" if self.reboot_requested else "guest")
        elif event.kind is EventKind.CRASHED:
            self._record("crashed", event.reason, f"vcpu {event.vcpu}")
            if self.config.on_crash == "preserve":
                if self.machine is not None and self.machine_started:
                    try:
                        self.machine.pause()
                    except MachineStateError:
                        pass  # it ended meanwhile; that event follows and is handled
                self.state = "crashed"
            else:
                self._apply(self.config.on_crash, "crash", "crashed", event.reason)
        else:
            self._end_machine()
            words = ", ".join(str(d) for d in event.detail)
            self._record(
                "stopped",
                "failed",
                f"{event.reason} (KVM exit {event.code}, vcpu {event.vcpu}, detail {words})",
            )
            self._finish(EXIT_FAILED)

    def _on_reset(self, reason: str, detail: str) -> None:
        if self.config.on_reboot == "restart":
            self._restart()
            self._record("rebooted", reason, detail)
        else:
            self._apply(self.config.on_reboot, "reboot", "shutdown", "reboot")

    def _apply(self, policy: str, cause: str, stop_reason: str, stop_detail: str) -> None:
        if policy == "restart":
            self._restart()
            self._record("started", cause, "restarted")
            return
        self._end_machine()
        self.state = "shutoff"
        self._record("stopped", stop_reason, stop_detail)
        if policy == "destroy":
            self._finish(EXIT_OK)

    def _destroy(self, detail: str) -> None:
        had_machine = self.machine is not None
        self._end_machine()
        if had_machine:
            self._record("stopped", "destroyed", detail)
        self.state = "shutoff"
        self._finish(EXIT_OK)

    # -- operations -------------------------------------------------------------------------

    def _need_machine(self) -> Machine:
        if self.machine is None:
            raise RequestError("state", f"the domain is {self.state}")
        return self.machine

    def _op_status(self, _conn: Conn, _req: dict[str, Any]) -> dict[str, Any]:
        return {
            "ok": True,
            "state": self.state,
            "pid": os.getpid(),
            "cpu_time_ns": time.process_time_ns(),
            "journal_n": self.journal.n,
            "started_at": self.started_at,
            "cgroup": self.cgroup,
            "cgroup_error": self.cgroup_error,
        }

    def _op_pause(self, _conn: Conn, _req: dict[str, Any]) -> dict[str, Any]:
        if self.state == "paused":
            return {"ok": True}
        if self.state != "running":
            raise RequestError("state", f"cannot pause a {self.state} domain")
        self._need_machine().pause()
        self.state = "paused"
        self._record("paused", "host")
        return {"ok": True}

    def _op_resume(self, _conn: Conn, _req: dict[str, Any]) -> dict[str, Any]:
        if self.state == "running":
            return {"ok": True}
        if self.state != "paused":
            raise RequestError("state", f"cannot resume a {self.state} domain")
        machine = self._need_machine()
        if self.machine_started:
            machine.resume()
            self.state = "running"
        else:
            self._start_machine()
        self._record("resumed", "host")
        return {"ok": True}

    def _op_shutdown(self, _conn: Conn, req: dict[str, Any]) -> dict[str, Any]:
        mode = req.get("mode", "ctrl-alt-del")
        methods = {"ctrl-alt-del": ShutdownMethod.CTRL_ALT_DEL, "acpi": ShutdownMethod.ACPI}
        if mode not in methods:
            raise RequestError("bad_request", f"shutdown mode must be one of {', '.join(methods)}")
        if self.state != "running":
            raise RequestError("state", f"cannot shut down a {self.state} domain")
        self._need_machine().shutdown(methods[mode])
        self.shutdown_requested = True
        return {"ok": True}

    def _op_destroy(self, _conn: Conn, _req: dict[str, Any]) -> dict[str, Any]:
        self._destroy("host")
        return {"ok": True}

    def _op_reboot(self, _conn: Conn, req: dict[str, Any]) -> dict[str, Any]:
        mode = req.get("mode", "reset")
        if mode == "reset":
            if self.state == "shutoff":
                raise RequestError("state", "cannot reset a shutoff domain")
            self._restart()
            self._record("rebooted", "host", "reset")
        elif mode == "ctrl-alt-del":
            if self.state != "running":
                raise RequestError("state", f"cannot reboot a {self.state} domain")
            self._need_machine().shutdown(ShutdownMethod.CTRL_ALT_DEL)
            self.reboot_requested = True
        else:
            raise RequestError("bad_request", "reboot mode must be reset or ctrl-alt-del")
        return {"ok": True}

    def _op_stats(self, _conn: Conn, _req: dict[str, Any]) -> dict[str, Any]:
        c = self._need_machine().counters()
        return {
            "ok": True,
            "exits": c.exits,
            "unhandled_io": c.unhandled_io,
            "unhandled_mmio": c.unhandled_mmio,
            "console_in_bytes": c.console_in_bytes,
            "console_out_bytes": c.console_out_bytes,
            "console_dropped": c.console_dropped,
            "devices": {name: d._asdict() for name, d in c.devices.items()},
            "cpu_time_ns": time.process_time_ns(),
        }

    def _op_console(self, _conn: Conn, req: dict[str, Any]) -> dict[str, Any]:
        max_bytes = req.get("max_bytes", self.config.console_ring_bytes)
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise RequestError("bad_request", "max_bytes must be a non-negative integer")
        self._on_console(0)  # include what the guest wrote just now
        data, truncated = self.console.snapshot(max_bytes)
        return {"ok": True, "data": data, "truncated": truncated}

    def _op_subscribe(self, conn: Conn, req: dict[str, Any]) -> dict[str, Any]:
        from_n = req.get("from_n", 0)
        if not isinstance(from_n, int) or isinstance(from_n, bool) or from_n < 0:
            raise RequestError("bad_request", "from_n must be a non-negative integer")
        conn.mode = "subscribe"
        return {"ok": True}

    def _op_attach(self, conn: Conn, _req: dict[str, Any]) -> dict[str, Any]:
        if self.attached is not None:
            raise RequestError("busy", "another client is attached to the console")
        conn.mode = "attach"
        self.attached = conn
        return {"ok": True}

    # -- console input ----------------------------------------------------------------------

    def _console_input(self, data: bytes) -> None:
        self.input_pending += data
        self._pump_input()

    def _pump_input(self) -> None:
        """Moves attached input into the UART's pipe; waits (not buffers) when it is full."""
        while self.input_pending:
            try:
                n = os.write(self.console.in_w, self.input_pending)
            except BlockingIOError:
                break
            del self.input_pending[:n]
        want = bool(self.input_pending)
        if want and not self.input_waiting:
            self.sel.register(
                self.console.in_w, selectors.EVENT_WRITE, lambda _m: self._pump_input()
            )
        elif not want and self.input_waiting:
            self.sel.unregister(self.console.in_w)
        self.input_waiting = want
        if self.attached is not None:
            self._update(self.attached)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)  # noqa: PTH108 (pathlib costs the VMM import time)
    except OSError:
        pass


def _bind_control_socket() -> socket.socket:
    _unlink(CONTROL_SOCKET)  # a stale socket of a dead VMM (the pid lock says none runs)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)  # born 0600: no window with a wider mode
    try:
        sock.bind(CONTROL_SOCKET)
    finally:
        os.umask(old)
    os.chmod(CONTROL_SOCKET, 0o600)  # noqa: PTH101
    sock.listen(16)
    return sock


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m compute_node.vmm <domain-dir>", file=sys.stderr)
        return EXIT_USAGE
    try:
        # Relative names from here on: a control socket path may not exceed 107 bytes.
        os.chdir(argv[0])
        pid_fd = os.open(PID_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        print(f"compute_node.vmm: {argv[0]}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        # Held for the process's life: one VMM per domain dir.
        fcntl.flock(pid_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print(f"compute_node.vmm: another VMM runs in {argv[0]}", file=sys.stderr)
        return EXIT_FAILED
    os.ftruncate(pid_fd, 0)
    os.pwrite(pid_fd, f"{os.getpid()}\n".encode(), 0)
    journal = Journal(JOURNAL)
    try:
        config = load_config(CONFIG_FILE)
    except ConfigInvalid as exc:
        journal.append("failed", str(exc))
        _unlink(PID_FILE)
        return EXIT_FAILED
    cgroup, cgroup_error = None, None
    if config.cgroup is not None:
        cgroup, cgroup_error = join_cgroup(config.domain_id, config.cgroup)
    listener = _bind_control_socket()
    vmm = Vmm(config, journal, listener, cgroup, cgroup_error)
    try:
        vmm.boot()
    except VmmError as exc:
        _unlink(CONTROL_SOCKET)
        vmm._end_machine()
        # A kernel or initrd that is no bootable image is the spec's fault, the same on any
        # host: `invalid` tells the worker not to try elsewhere.
        # A disk another writer holds locked is `conflict`: the same volume is locked on any
        # host too.
        journal.append("failed", exc.message, _failure_code(exc))
        _unlink(PID_FILE)
        return EXIT_FAILED
    return vmm.run()


def _failure_code(exc: VmmError) -> str:
    if isinstance(exc, ConfigError):
        return "conflict" if exc.errno == errno.EBUSY else "invalid"
    return ""


if __name__ == "__main__":
    status = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is closed; skip interpreter teardown (it only costs exit time).
    os._exit(status)
