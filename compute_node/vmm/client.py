"""The worker's side of a per-guest VMM process (`python -m compute_node.vmm`, docs/vmm.md).

`spawn()` starts one for a prepared domain dir, `VmmClient` talks to it over
`<domain-dir>/control.sock`, `read_journal()` reads its journal with or without it running.
Requests and replies are the typed records of `compute_node.vmm.protocol`. Standard library
and msgpack only.

Errors: `VmmGone` (no VMM answers: socket absent, refused, or closed before a reply),
`VmmRequestError` (the VMM refused the request: `code`, `message`), `VmmSpawnError` (it did
not come up: `reason`), `VmmProtocolError` (it sent something unreadable); all are
`VmmClientError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, TypeVar, cast

from compute_node.vmm import protocol as p
from compute_node.vmm.frames import (
    CONTROL_SOCKET,
    JOURNAL,
    MAX_REPLY,
    PID_FILE,
    PROCESS_LOG,
    FrameError,
    FrameReader,
    JournalRecord,
    pack_frame,
    read_journal,
)
from compute_node.vmm.protocol import ControlError

__all__ = [
    "HeldSnapshot",
    "JournalRecord",
    "VmmClient",
    "VmmClientError",
    "VmmGone",
    "VmmProtocolError",
    "VmmRequestError",
    "VmmSpawnError",
    "VmmSubscription",
    "VmmVanished",
    "end",
    "journal_tail",
    "read_journal",
    "reap",
    "spawn",
    "track",
    "wait_exit",
    "wait_ready",
]

SPAWN_TIMEOUT = 10.0
# The package's parent directory: `-m compute_node.vmm` run from there finds it under -S.
PACKAGE_ROOT = os.path.dirname(  # noqa: PTH120
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # noqa: PTH100, PTH120
)


_children: dict[int, subprocess.Popen[bytes]] = {}
_exited: dict[int, int] = {}
_reap_lock = threading.Lock()  # _children and _exited change together


class VmmClientError(Exception):
    """Base of every error this module raises."""


class VmmGone(VmmClientError):
    """No VMM process answers on the domain's control socket."""


class VmmProtocolError(VmmClientError):
    """The VMM sent a frame that cannot be read."""


class VmmRequestError(VmmClientError, ControlError):
    """The VMM refused a request: the protocol's one error type (`code`: state, busy,
    unsupported, bad_request, no_space, invalid, ...; `message`)."""


class VmmSpawnError(VmmClientError):
    """The VMM process did not come up; `reason` says why (its `failed` record, exit, log);
    `code` is `invalid` when the machine's config was unusable (no kernel image, a saved
    state that is damaged or of another machine), `conflict` when a disk is locked by another
    writer, else `spawn_failed`."""

    def __init__(self, reason: str, code: str = "spawn_failed") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class VmmVanished(VmmSpawnError):
    """The VMM exited before it was ready and journaled nothing: nothing of the domain ran."""


def _connect(domain_dir: str, timeout: float) -> socket.socket:
    path = os.path.join(domain_dir, CONTROL_SOCKET)  # noqa: PTH118
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    dir_fd = -1
    try:
        if len(os.fsencode(path)) > 107:
            # AF_UNIX paths are limited to 108 bytes; reach it through the directory's fd.
            dir_fd = os.open(domain_dir, os.O_PATH | os.O_CLOEXEC)
            path = f"/proc/self/fd/{dir_fd}/{CONTROL_SOCKET}"
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
        sock.close()
        raise VmmGone(f"no VMM at {domain_dir}: {exc.strerror}") from exc
    except OSError as exc:
        sock.close()
        raise VmmClientError(f"cannot reach the VMM at {domain_dir}: {exc}") from exc
    except BaseException:
        sock.close()
        raise
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)
    return sock


def _recv_frame(sock: socket.socket, reader: FrameReader) -> dict[str, Any] | None:
    """The next frame, or None at EOF (a partial frame at EOF is EOF too)."""
    while True:
        try:
            frame = reader.next_frame()
        except FrameError as exc:
            raise VmmProtocolError(str(exc)) from exc
        if frame is not None:
            return frame
        data = sock.recv(256 * 1024)
        if not data:
            return None
        reader.feed(data)


R = TypeVar("R", bound=p.Reply)


def _expect(reply: p.Reply, kind: type[R]) -> R:
    if not isinstance(reply, kind):
        raise VmmProtocolError(f"expected a {kind.__name__} reply, got {reply!r:.200}")
    return reply


class VmmSubscription:
    """Journal records of one VMM as they happen, from a subscribe connection.

    `fileno()` is readable when a record (or EOF) is there; `next_record()` returns the next
    record, None on timeout, and raises VmmGone at EOF (the VMM exited or was killed).
    """

    def __init__(
        self, sock: socket.socket, reader: FrameReader, journal_n: int | None = None
    ) -> None:
        self._sock = sock
        self._reader = reader
        # The last record journaled when it began (None: an older VMM that does not say).
        self.journal_n = journal_n

    def fileno(self) -> int:
        return self._sock.fileno()

    def pending(self) -> bool:
        """True when a whole record is buffered (select() on fileno() would not see it)."""
        try:
            return self._reader.has_frame()
        except FrameError as exc:
            raise VmmProtocolError(str(exc)) from exc

    def next_record(self, timeout: float | None = None) -> JournalRecord | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                frame = self._reader.next_frame()
            except FrameError as exc:
                raise VmmProtocolError(str(exc)) from exc
            if frame is not None:
                record = frame.get("record")
                if not isinstance(record, dict):
                    raise VmmProtocolError(f"not a record frame: {frame!r}")
                return cast(JournalRecord, record)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            ready, _, _ = select.select([self._sock], [], [], left)
            if not ready:
                return None
            try:
                data = self._sock.recv(65536)
            except OSError as exc:
                raise VmmGone(f"subscription lost: {exc}") from exc
            if not data:
                raise VmmGone("the VMM closed the subscription (it exited)")
            self._reader.feed(data)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> VmmSubscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class HeldSnapshot:
    """A snapshot the VMM holds paused (`held`: what it wrote) until `proceed()` (the machine
    goes on; returns the `Saved` record with the whole pause) or `close()` without it (the
    machine goes on too, and the snapshot counts as failed). The VMM lets it go on by itself
    when `hold_s` passes; `proceed()` then raises VmmRequestError(`state`)."""

    def __init__(self, client: VmmClient, sock: socket.socket, held: p.Held) -> None:
        self._client = client
        self._sock = sock
        self.held = held

    def proceed(self) -> p.Saved:
        try:
            reply = self._client._turn(self._sock, FrameReader(MAX_REPLY), p.Proceed())
        finally:
            self._sock.close()
        return _expect(reply, p.Saved)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> HeldSnapshot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class VmmClient:
    """Requests to the VMM of one domain dir; each call is one short connection.

    Every method raises VmmGone when no VMM answers and VmmRequestError when it refuses.
    """

    def __init__(self, domain_dir: str | os.PathLike[str], timeout: float = 10.0) -> None:
        self.domain_dir = os.fspath(domain_dir)
        self.timeout = timeout

    def request(self, request: p.Request) -> p.Reply:
        """Sends one request record; returns its reply record."""
        sock = _connect(self.domain_dir, self.timeout)
        with sock:
            return self._turn(sock, FrameReader(MAX_REPLY), request)

    def _turn(self, sock: socket.socket, reader: FrameReader, request: p.Request) -> p.Reply:
        name = type(request).__name__.lower()
        try:
            sock.sendall(pack_frame(p.encode_request(request)))
            frame = _recv_frame(sock, reader)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise VmmGone(f"the VMM went away during {name}: {exc}") from exc
        except TimeoutError as exc:
            raise VmmClientError(f"{name}: no reply within {self.timeout} s") from exc
        except OSError as exc:
            raise VmmClientError(f"{name}: {exc}") from exc
        if frame is None:
            raise VmmGone(f"the VMM closed the connection before answering {name}")
        try:
            return p.decode_reply(frame)
        except ControlError as exc:
            if exc.code == "bad_frame":
                raise VmmProtocolError(exc.message) from None
            raise VmmRequestError(exc.code, exc.message) from None

    def _done(self, request: p.Request) -> None:
        _expect(self.request(request), p.Done)

    def status(self) -> p.StatusReply:
        return _expect(self.request(p.Status()), p.StatusReply)

    def pause(self) -> None:
        self._done(p.Pause())

    def resume(self) -> None:
        self._done(p.Resume())

    def shutdown(self, mode: str = "ctrl-alt-del") -> None:
        """Asks the guest to power off; its `shutdown`/`stopped` records follow."""
        self._done(p.Shutdown(mode))

    def destroy(self) -> None:
        """Hard stop; the VMM journals `stopped` (destroyed), replies, then exits 0."""
        self._done(p.Destroy())

    def reboot(self, mode: str = "reset") -> None:
        self._done(p.Reboot(mode))

    def stats(self) -> dict[str, Any]:
        return _expect(self.request(p.Stats()), p.StatsReply).counters

    def console(self, max_bytes: int = 65536) -> p.ConsoleReply:
        reply = _expect(self.request(p.Console(max_bytes)), p.ConsoleReply)
        return p.ConsoleReply(bytes(reply.data), bool(reply.truncated))

    def save(self, directory: str | os.PathLike[str], timeout: float = 300.0) -> p.Saved:
        """Pause, write the machine into `directory`, end it (`stopped`/saved journaled,
        then the VMM exits 0). On a refusal (`no_space`, `state`, ...) the machine goes on
        as it was."""
        sock = _connect(self.domain_dir, timeout)
        with sock:
            # The VMM runs in its domain dir: send the name as the caller means it.
            where = os.path.abspath(directory)  # noqa: PTH100
            reply = self._turn(sock, FrameReader(MAX_REPLY), p.Save(where))
        return _expect(reply, p.Saved)

    def snapshot(
        self, directory: str | os.PathLike[str] | None, hold_s: float = 60.0
    ) -> HeldSnapshot:
        """Pause and write the machine into `directory` (None: nothing, for disks only);
        returns once it is written, the machine still paused, as a HeldSnapshot."""
        sock = _connect(self.domain_dir, max(self.timeout, 300.0))
        try:
            where = None if directory is None else os.path.abspath(directory)  # noqa: PTH100
            held = _expect(
                self._turn(sock, FrameReader(MAX_REPLY), p.Snapshot(where, hold_s)), p.Held
            )
        except BaseException:
            sock.close()
            raise
        return HeldSnapshot(self, sock, held)

    def migrate_out(self, request: p.MigrateOut) -> p.MigrationReply:
        """Starts the live migration and waits for its outcome (`ended`), however long it
        takes; a refusal (`busy`, `state`, `bad_request`) comes at once. VmmGone if the VMM
        dies meanwhile."""
        sock = _connect(self.domain_dir, self.timeout)
        with sock:
            sock.settimeout(None)
            reply = self._turn(sock, FrameReader(MAX_REPLY), request)
        return _expect(reply, p.MigrationReply)

    def migration_status(self) -> p.MigrationReply:
        return _expect(self.request(p.MigrationStatus()), p.MigrationReply)

    def subscribe(self, from_n: int = 0) -> VmmSubscription:
        """Every record with n > from_n: those on disk first, then live ones."""
        sock = _connect(self.domain_dir, self.timeout)
        reader = FrameReader(MAX_REPLY)
        try:
            reply = _expect(self._turn(sock, reader, p.Subscribe(from_n)), p.Done)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        return VmmSubscription(sock, reader, reply.journal_n)

    def attach(self) -> socket.socket:
        """A raw byte stream to the guest console (input in, output out); close to detach.

        Raises VmmRequestError("busy") while another client is attached.
        """
        sock = _connect(self.domain_dir, self.timeout)
        reader = FrameReader(MAX_REPLY)
        try:
            self._turn(sock, reader, p.Attach())
        except BaseException:
            sock.close()
            raise
        # The VMM sends nothing between its reply and console output; nothing is buffered.
        sock.settimeout(None)
        return sock


def _journal_tail(domain_dir: str) -> int:
    records = read_journal(os.path.join(domain_dir, JOURNAL))  # noqa: PTH118
    return records[-1]["n"] if records else 0


def _log_tail(domain_dir: str, limit: int = 2000) -> str:
    try:
        with open(os.path.join(domain_dir, PROCESS_LOG), "rb") as f:  # noqa: PTH118, PTH123
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def spawn(
    domain_dir: str | os.PathLike[str],
    python: str = sys.executable,
    timeout: float = SPAWN_TIMEOUT,
    pass_fds: Sequence[int] = (),
) -> int:
    """Starts the VMM for a domain dir that holds vmm.json and waits until it answers.

    The process runs in its own session (it outlives the caller), with stdin on /dev/null
    and stdout/stderr appended to <domain-dir>/vmm.log, under `python -S -E` (lean start).
    It is the caller's child: reap it with `reap()`/`wait_exit()`. `pass_fds` are inherited
    under the same numbers (the boot files vmm.json names as /proc/self/fd/N).
    Returns its pid once `status` answers from that pid. Raises VmmSpawnError with the reason
    (its `failed` record, its exit status and log, or the timeout; then it is killed).
    """
    domain_dir = os.path.abspath(os.fspath(domain_dir))  # noqa: PTH100
    _collect_ended()
    before = _journal_tail(domain_dir)
    log = os.path.join(domain_dir, PROCESS_LOG)  # noqa: PTH118
    with open(log, "ab") as log_file:  # noqa: PTH123
        proc = subprocess.Popen(
            [python, "-S", "-E", "-m", "compute_node.vmm", domain_dir],
            # -m looks in the current directory under -S: run from the package's parent.
            cwd=PACKAGE_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
        )
    track(proc)
    return wait_ready(domain_dir, proc.pid, before, timeout)


def track(proc: subprocess.Popen[bytes]) -> None:
    """Makes a child VMM started elsewhere (a warm one) reapable by `reap()`/`wait_exit()`."""
    # Kept so the Popen object never reaps it behind reap()'s back.
    with _reap_lock:
        _children[proc.pid] = proc


def journal_tail(domain_dir: str | os.PathLike[str]) -> int:
    """The last record's `n` in the domain's journal (0 if none): `wait_ready`'s `before`."""
    return _journal_tail(os.fspath(domain_dir))


def wait_ready(domain_dir: str | os.PathLike[str], pid: int, before: int, timeout: float) -> int:
    """Waits until our child VMM `pid`, running for `domain_dir`, answers `status` (`spawn`
    and a warm VMM's assignment end here); `before` is the journal's last `n` before it
    started. Returns `pid`, or raises VmmSpawnError as `spawn` says (VmmVanished when it
    exited having journaled nothing)."""
    domain_dir = os.path.abspath(os.fspath(domain_dir))  # noqa: PTH100
    client = VmmClient(domain_dir, timeout=1.0)
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        records = read_journal(os.path.join(domain_dir, JOURNAL), before)  # noqa: PTH118
        failed = [r for r in records if r["kind"] == "failed"]
        if failed:
            wait_exit(pid, 2.0)
            detail = failed[-1]["detail"]
            code = detail if detail in ("invalid", "conflict") else "spawn_failed"
            raise VmmSpawnError(failed[-1]["reason"], code)
        status = reap(pid)
        if status is not None:
            if records:
                # It came up and its guest already ended (e.g. powered off at once): the
                # journal says how; the exit status stays available to reap().
                with _reap_lock:
                    _exited[pid] = status
                return pid
            raise VmmVanished(
                f"the VMM exited with status {status} before it was ready: "
                f"{_log_tail(domain_dir) or 'no log'}"
            )
        with contextlib.suppress(VmmClientError):
            if client.status().pid == pid:
                return pid
        if time.monotonic() > deadline:
            _kill(pid)
            raise VmmSpawnError(f"the VMM did not answer within {timeout} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.005)


def _collect_ended() -> None:
    """Reap children that ended without anyone waiting long enough for them (a watcher's
    `wait_exit` that timed out), keeping their status for `reap()`: no zombies pile up."""
    with _reap_lock:
        for pid, proc in list(_children.items()):
            status = proc.poll()
            if status is not None:
                del _children[pid]
                _exited[pid] = status


def reap(pid: int) -> int | None:
    """The exit status of our child `pid` once it has ended (reaping it), else None.

    Negative: killed by that signal. Raises ChildProcessError if it is not our child.
    """
    with _reap_lock:
        if pid in _exited:
            return _exited.pop(pid)
        proc = _children.get(pid)
        if proc is not None:
            status = proc.poll()
            if status is not None:
                del _children[pid]
            return status
    done, wait_status = os.waitpid(pid, os.WNOHANG)
    if done == 0:
        return None
    return os.waitstatus_to_exitcode(wait_status)


def wait_exit(pid: int, timeout: float) -> int | None:
    """Waits up to `timeout` s for our child `pid` to end; its exit status or None."""
    deadline = time.monotonic() + timeout
    pidfd: int | None = None
    try:
        while True:
            try:
                status = reap(pid)
            except ChildProcessError:
                return None
            if status is not None:
                return status
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if pidfd is None:
                pidfd = _pidfd(pid)
            if pidfd is None:
                time.sleep(min(0.005, remaining))
            else:
                # Readable once the process has ended: no polling delay after a destroy.
                select.select([pidfd], [], [], remaining)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _pidfd(pid: int) -> int | None:
    """A pidfd for our unreaped child `pid` (it cannot be recycled while unreaped), or None
    where the kernel has none (before 5.3): then wait_exit polls."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def end(domain_dir: str | os.PathLike[str], timeout: float = 5.0) -> int | None:
    """End the VMM running in `domain_dir` by its pid, whoever's child it is: SIGTERM (it
    destroys its machine and journals that), SIGKILL after `timeout`; returns once it has
    exited. Its pid is taken from `vmm.pid` only while a VMM holds that file's lock, and the
    process is checked to run in that dir (a VMM's cwd), so a recycled pid is never
    signalled. Returns the pid ended, or None when no VMM runs there."""
    directory = os.path.realpath(os.fspath(domain_dir))
    pid = _locked_pid(directory)
    if pid is None:
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None  # exited meanwhile
    try:
        try:
            if os.readlink(f"/proc/{pid}/cwd") != directory:  # noqa: PTH115
                return None
        except OSError:
            return None
        for signum, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signum)
            if select.select([pidfd], [], [], wait_s)[0]:
                break
        return pid
    finally:
        os.close(pidfd)


def _locked_pid(directory: str) -> int | None:
    """The pid in `<directory>/vmm.pid` while a VMM holds its lock, else None."""
    try:
        fd = os.open(os.path.join(directory, PID_FILE), os.O_RDONLY | os.O_CLOEXEC)  # noqa: PTH118
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # no VMM holds it
        except BlockingIOError:
            pass
        try:
            return int(os.pread(fd, 32, 0).strip())
        except ValueError:
            return None  # a VMM being born: it writes its pid right after taking the lock
    finally:
        os.close(fd)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)
    wait_exit(pid, 2.0)
