"""The worker's side of a warm VMM (`python -m compute_node.vmm --spare`, docs/vmm.md).

`Spare.start()` starts one the way `client.spawn()` starts a VMM (its own session, stdin on
/dev/null, `python -S -E` from the package's parent, the caller's environment), keeping one
end of a SOCK_SEQPACKET socketpair; `assign()` hands it a domain dir and the descriptors it
must inherit (SCM_RIGHTS) and returns its pid once it took them: from then on it is that
domain's VMM, the caller's child like a spawned one (`client.reap()` and `wait_exit()` work).
Each spare has a pid file in the spares dir (`<pid> <start time>`) so that a node restarting
after a crash can end what its predecessor left (`end_leftovers`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from compute_node.vmm import client
from compute_node.vmm.frames import PROCESS_LOG
from compute_node.vmm.spare import MAX_FDS, MAX_MESSAGE, VERSION, AssignmentInvalid, pack, unpack

# While it imports, a spare yields the CPU to the guests (only a root node may renice it back).
SPARE_NICE = 10
READY_TIMEOUT_S = client.SPAWN_TIMEOUT
ASSIGN_TIMEOUT_S = 2.0
SPARE_LOG = "spares.log"


class SpareUnusable(Exception):
    """The spare cannot take the domain (it died, answered wrongly or not in time); it has
    taken nothing: start the VMM cold."""


class Spare:
    """One started warm VMM and the node's end of its socket."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket, pid_file: Path) -> None:
        self.proc = proc
        self.sock = sock
        self.pid_file = pid_file
        self.ready = False
        self._lock = threading.Lock()  # one reader of its socket at a time

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def start(cls, spares_dir: Path, python: str = sys.executable) -> Spare:
        """Starts a spare (not yet ready: see `wait_ready`). Raises OSError."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid_file = spares_dir / f"{secrets.token_hex(8)}.pid"
        argv = [str(theirs.fileno()), str(pid_file)]
        try:
            with (spares_dir / SPARE_LOG).open("ab") as log:
                proc = subprocess.Popen(
                    [python, "-S", "-E", "-m", "compute_node.vmm", "--spare", *argv],
                    cwd=client.PACKAGE_ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    pass_fds=(theirs.fileno(),),
                )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        spare = cls(proc, ours, pid_file)
        try:
            pid_file.write_text(f"{proc.pid} {start_time(proc.pid)}\n")
            if os.geteuid() == 0:
                os.setpriority(os.PRIO_PROCESS, proc.pid, SPARE_NICE)
        except OSError:
            spare.end()
            raise
        return spare

    def wait_readable(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until it said something (or ended, or was closed here); SpareUnusable on timeout.
        Reads nothing: a caller that wants the spare as it is then calls `wait_ready`."""
        try:
            if select.select([self.sock], [], [], timeout)[0]:
                return
        except (OSError, ValueError) as exc:  # closed meanwhile by `assign` or `end`
            raise SpareUnusable(f"the spare's socket is closed: {exc}") from None
        raise SpareUnusable(f"the spare did not get ready within {timeout} s")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until it said `ready` (its imports done), once (any thread may ask); then it runs at
        the node's priority again. SpareUnusable if it died, said something else or did not
        in time."""
        if not self._lock.acquire(timeout=timeout):
            raise SpareUnusable(f"the spare did not get ready within {timeout} s")
        try:
            if self.ready:
                return
            reply = self._receive(timeout)
            if reply.get("ready") != self.pid:
                raise SpareUnusable(f"the spare said {reply!r:.200} instead of ready")
            self._renice()
            self.ready = True
        finally:
            self._lock.release()

    def _renice(self) -> None:
        if os.geteuid() == 0:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, self.pid, os.getpriority(os.PRIO_PROCESS, 0))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def assign(
        self, directory: Path, pass_fds: Sequence[int], timeout: float = ASSIGN_TIMEOUT_S
    ) -> int:
        """Hands the spare `directory` (its vmm.json written) and `pass_fds`, to be inherited
        under the same numbers (once it is ready, if it is still importing); returns its pid
        once it has them, registered with `client.track` (then wait for it with
        `client.wait_ready`). SpareUnusable (the spare ended at once, having taken nothing)
        if it cannot."""
        if len(pass_fds) > MAX_FDS:
            self.end(0)
            raise SpareUnusable(f"{len(pass_fds)} descriptors: more than {MAX_FDS} to pass")
        try:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            log = os.open(directory / PROCESS_LOG, flags, 0o666)
        except OSError as exc:
            self.end(0)
            raise SpareUnusable(f"cannot open {PROCESS_LOG}: {exc}") from None
        message = pack({"v": VERSION, "dir": str(directory.absolute()), "fds": list(pass_fds)})
        try:
            if not self.ready:
                self._renice()  # still importing: it is on the critical path now
                self.wait_ready(timeout)
            with self._lock:
                socket.send_fds(self.sock, [message], [log, *pass_fds])
                reply = self._receive(timeout)
        except OSError as exc:
            self.end(0)
            raise SpareUnusable(f"the spare is gone: {exc}") from None
        except SpareUnusable:
            # Killed at once: an answer late by a hair must not leave it running the domain.
            self.end(0)
            raise
        finally:
            os.close(log)
        if reply.get("ok") is not True or reply.get("pid") != self.pid:
            self.end(0)
            raise SpareUnusable(f"the spare refused the assignment: {reply!r:.200}")
        self.sock.close()
        client.track(self.proc)
        return self.pid

    def _receive(self, timeout: float) -> dict[str, object]:
        try:
            if not select.select([self.sock], [], [], timeout)[0]:
                raise SpareUnusable(f"the spare did not answer within {timeout} s")
            data = self.sock.recv(MAX_MESSAGE)
        except (OSError, ValueError) as exc:
            raise SpareUnusable(f"the spare is gone: {exc}") from None
        if not data:
            raise SpareUnusable(f"the spare exited (status {self.proc.poll()})")
        try:
            return unpack(data)
        except AssignmentInvalid as exc:
            raise SpareUnusable(f"the spare's answer is unreadable: {exc}") from None

    def end(self, timeout: float = 1.0) -> None:
        """Ends it (EOF on its socket, SIGKILL after `timeout`: at once for 0), reaps it,
        removes its pid file. Only for a spare that was not assigned."""
        self.sock.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.pid_file.unlink(missing_ok=True)


def start_time(pid: int) -> int:
    """Process `pid`'s start time in clock ticks since boot (/proc/<pid>/stat field 22):
    with the pid, it names one process for good. Raises OSError if it is gone."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def end_leftovers(spares_dir: Path, timeout: float = 2.0) -> list[int]:
    """Ends the spares a previous node left (their pid files in `spares_dir`), each only if
    that pid still is the process started then (start time) and a spare of that very file
    (its command line); removes every pid file. Returns the pids ended."""
    ended = []
    for pid_file in sorted(spares_dir.glob("*.pid")):
        try:
            pid_text, started = pid_file.read_text().split()
            pid = int(pid_text)
            pidfd = os.pidfd_open(pid)
        except (OSError, ValueError):
            pid_file.unlink(missing_ok=True)  # gone already, or a torn file: no process
            continue
        try:
            # Checked through the pidfd's pid: it cannot be recycled while we hold it.
            if _is_spare(pid, int(started), pid_file):
                for signum, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, signum)
                    if select.select([pidfd], [], [], wait_s)[0]:
                        break
                ended.append(pid)
        finally:
            os.close(pidfd)
        pid_file.unlink(missing_ok=True)
    return ended


def _is_spare(pid: int, started: int, pid_file: Path) -> bool:
    try:
        if start_time(pid) != started:
            return False
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return False
    # An assigned spare removed its pid file before taking its domain, so a file still
    # there names a process that is a spare, whatever its command line says (it stays).
    return b"compute_node.vmm" in argv and b"--spare" in argv and os.fsencode(pid_file) in argv
