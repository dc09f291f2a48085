"""A fork server for the all-in-one stack: one process imports every service's code once,
then forks each service from itself, so `flotilla up` pays for the imports once, not once per
service (their imports are most of a service's start-up: ~1.4 s of CPU for all five together
here against ~3.6 s apart, and ~20x that on an emulated CPU).

    python -m services.launcher           # read requests on stdin, answer on stdout

Requests and answers are JSON lines. A request names a module with a `main(argv)`, its argv,
its whole environment, its working directory, its log file and its process name:

    {"module": "services.api.main", "argv": [...], "env": {...}, "cwd": "/", "log": "/x.log",
     "name": "flotilla-api"}

and is answered `{"pid": N}`, or `{"error": "..."}` when it was refused or the fork failed.
When a child ends the server writes `{"exited": N, "status": S}` (S: its exit code, or
-signal). Answers go to the descriptor that was stdout when the server started; its own
stdout is its stderr from then on, so nothing an import prints can break the protocol. Each
child starts a session of its own (a Ctrl-C on the terminal reaches only `flotilla up`),
with the environment it was given, stdin from /dev/null, stdout and stderr to its log, a
fresh interpreter's signal dispositions, its name as comm, and none of the server's
descriptors; then runs `main(argv)` and exits with its result once its non-daemon threads
ended, as an interpreter's exit would.

The server imports, and never starts a thread, a connection or an event loop itself: a fork
copies no lock held by another thread. It ends when its stdin closes (its children run on,
as `python -m` children do when their parent dies: `flotilla up` ends them by pid).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import json
import os
import select
import selectors
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

# What `flotilla up` starts. Others can be named in a request; they are imported then.
PRELOAD = (
    "services.api.main",
    "services.network.main",
    "services.scheduler.main",
    "services.storage.main",
    "compute_node.main",
)

MAX_FD = os.sysconf("SC_OPEN_MAX")
PR_SET_NAME = 15


@dataclass(frozen=True)
class Request:
    """One request: the module whose `main(argv)` to run, and how."""

    module: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    log: str
    name: str  # the process's name in ps and top (its comm, 15 bytes at most)

    @classmethod
    def parse(cls, raw: Any) -> Request:
        """Raises ValueError, saying which field is wrong."""
        if not isinstance(raw, dict):
            raise ValueError("a request is a JSON object")  # noqa: TRY004 (a bad request)
        module, argv = raw.get("module"), raw.get("argv", [])
        env, cwd, log = raw.get("env", {}), raw.get("cwd", "/"), raw.get("log")
        name = raw.get("name", module.rsplit(".", 1)[0] if isinstance(module, str) else "")
        if not isinstance(module, str) or not module:
            raise ValueError("module must be a module name")
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise ValueError("argv must be a list of strings")
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise ValueError("env must map strings to strings")
        if not isinstance(cwd, str) or not isinstance(log, str) or not log:
            raise ValueError("cwd and log must be paths")
        if not isinstance(name, str) or not name:
            raise ValueError("name must be a process name")
        return cls(module, argv, env, cwd, log, name)


def _set_name(name: str) -> None:
    """The process's comm (what ps, top and pgrep show by default), not its command line."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, name.encode()[:15] + b"\0", 0, 0, 0)
    except (OSError, AttributeError):
        pass  # a name is a convenience


def _child(req: Request) -> int:
    """In the forked child: become the service and run it; returns its exit code."""
    os.setsid()
    _set_name(req.name)
    signal.set_wakeup_fd(-1)
    # As a fresh interpreter has them: SIGINT raises KeyboardInterrupt, the rest default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    log_fd = os.open(req.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.closerange(3, MAX_FD)  # the server's pipes and epoll, the log's own fd
    os.chdir(req.cwd)
    os.environ.clear()
    os.environ.update(req.env)
    module = importlib.import_module(req.module)
    sys.argv = [module.__file__ or req.module, *req.argv]
    try:
        result = module.main(req.argv)
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return int(result or 0)


def _fork(req: Request) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = _child(req)
            # As an interpreter's exit would: wait for the service's non-daemon threads (as
            # multiprocessing's forked children do), then flush.
            threading._shutdown()  # type: ignore[attr-defined]
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code & 0xFF if code >= 0 else 1)
    return pid


def _send(out: TextIO, message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def _reap(out: TextIO) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(out, {"exited": pid, "status": os.waitstatus_to_exitcode(status)})


class _Lines:
    """Complete lines from a non-blocking fd, however the reads split them."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""
        self.eof = False

    def read(self) -> list[bytes]:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                self.eof = True
                break
            self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return lines


def serve(stdin: int, stdout: TextIO, preload: Sequence[str] = PRELOAD) -> None:
    """Serve requests read from fd `stdin` until it closes."""
    for name in preload:
        importlib.import_module(name)
    # SIGCHLD wakes the loop through a pipe: children are reaped, and reported, at once.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda _s, _f: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # `up` stops us by closing our stdin
    os.set_blocking(stdin, False)
    requests = _Lines(stdin)
    sel = selectors.DefaultSelector()
    sel.register(stdin, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    _send(stdout, {"ready": os.getpid()})
    while not requests.eof:
        for key, _ in sel.select():
            if key.fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 512):
                        pass
                _reap(stdout)
                continue
            for line in requests.read():
                try:
                    req = Request.parse(json.loads(line))
                    importlib.import_module(req.module)
                except (ValueError, ImportError) as exc:
                    _send(stdout, {"error": f"{type(exc).__name__}: {exc}"})
                    continue
                try:
                    pid = _fork(req)
                except OSError as exc:
                    _send(stdout, {"error": f"fork: {exc}"})
                    continue
                _send(stdout, {"pid": pid})
    _reap(stdout)


class LauncherError(RuntimeError):
    """The fork server did not start, answered wrongly, or refused a request."""


class Launcher:
    """The client `flotilla up` holds: starts the server, asks it for children, and learns
    how they ended. Not thread-safe (one caller, as the stack's start and stop are)."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        timeout: float = 120.0,
        preload: Sequence[str] = PRELOAD,
    ) -> None:
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.launcher", "--preload", ",".join(preload)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._lines = _Lines(self.proc.stdout.fileno())
        self._pending: list[dict[str, Any]] = []
        self.statuses: dict[int, int] = {}
        self._next(timeout, "ready")

    def _next(self, timeout: float, key: str) -> dict[str, Any]:
        """The next answer that is not an exit report (those go to `statuses`)."""
        deadline = time.monotonic() + timeout
        while True:
            self._drain()
            for i, message in enumerate(self._pending):
                if key in message or "error" in message:
                    del self._pending[i]
                    if "error" in message:
                        raise LauncherError(str(message["error"]))
                    return message
            if self._lines.eof:
                raise LauncherError(f"the fork server ended (status {self.proc.wait()})")
            left = deadline - time.monotonic()
            if left <= 0:
                raise LauncherError(f"the fork server did not answer within {timeout:.0f} s")
            select.select([self._lines.fd], [], [], left)

    def _drain(self) -> None:
        if self._lines.eof:
            return
        for line in self._lines.read():
            message = json.loads(line)
            if "exited" in message:
                self.statuses[int(message["exited"])] = int(message["status"])
            else:
                self._pending.append(message)

    def spawn(
        self,
        module: str,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        *,
        cwd: str = "/",
        name: str | None = None,
    ) -> int:
        """Forks a child running `module.main(argv)`; returns its pid. `name`: its comm (the
        server's default: the module's package)."""
        request: dict[str, Any] = {
            "module": module,
            "argv": argv,
            "env": env,
            "cwd": cwd,
            "log": str(log_path),
        }
        if name is not None:
            request["name"] = name
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise LauncherError("the fork server ended") from None
        return int(self._next(30.0, "pid")["pid"])

    def status(self, pid: int) -> int | None:
        """How child `pid` ended, once the server reported it."""
        self._drain()
        return self.statuses.get(pid)

    def close(self) -> None:
        """Ends the server (its children run on)."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.launcher", description=__doc__)
    parser.add_argument(
        "--preload",
        default=",".join(PRELOAD),
        help="modules to import before serving, comma-separated (default: every service)",
    )
    args = parser.parse_args(argv)
    # The answers get stdout's pipe to themselves; print() and the like go to stderr.
    sys.stdout.flush()
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.set_inheritable(answers.fileno(), False)
    os.dup2(2, 1)
    serve(sys.stdin.fileno(), answers, [m for m in args.preload.split(",") if m])
    return 0


if __name__ == "__main__":
    sys.exit(main())
