"""The stack's service processes, each with its log file and ended by its pid: `Child`, a
service started as an argv (the chaos rig's and the benches' replicas), and `ForkedChild`, one
forked by the stack's fork server (services/launcher.py) as `flotilla up` starts them."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
from pathlib import Path

from services.launcher import Launcher

# What ps and top show for a forked service (a comm holds 15 bytes).
PROCESS_NAMES = {
    "api": "flotilla-api",
    "network": "flotilla-net",
    "scheduler": "flotilla-sched",
    "storage": "flotilla-store",
    "compute": "flotilla-comp",
}


class StackError(RuntimeError):
    """A part of the stack did not start or died; the message says which and where its log is."""


class ServiceChild:
    """A service process with its log file, ended by its pid."""

    name: str
    log_path: Path

    @property
    def pid(self) -> int:
        raise NotImplementedError

    @property
    def returncode(self) -> int | None:
        """Its exit status once it ended and that is known (-N: killed by signal N)."""
        raise NotImplementedError

    def alive(self) -> bool:
        raise NotImplementedError

    def _wait(self, timeout: float) -> bool:
        """Whether it ended within `timeout` seconds."""
        raise NotImplementedError

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def died(self) -> StackError:
        return StackError(
            f"{self.name} exited with status {self.returncode}; its log "
            f"({self.log_path}) ends:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`."""
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        if not self._wait(timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._wait(5)


class Child(ServiceChild):
    """A service started as `argv`, a child of this process."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _wait(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True


class ForkedChild(ServiceChild):
    """A service forked by the stack's fork server (services/launcher.py) from its
    preloaded imports: `module.main(args)`. Followed through a pidfd (it is the server's
    child, not ours); its exit status is the server's report."""

    def __init__(
        self,
        name: str,
        launcher: Launcher,
        *,
        module: str,
        args: list[str],
        env: dict[str, str],
        log_path: Path,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._launcher = launcher
        kind = name.split(maxsplit=1)[0]  # "compute <host>": compute
        title = PROCESS_NAMES.get(kind, f"flotilla-{kind}")
        self._pid = launcher.spawn(module, args, env, log_path, name=title)
        self._pidfd: int | None
        try:
            self._pidfd = os.pidfd_open(self._pid)
        except ProcessLookupError:
            self._pidfd = None  # already ended (and reaped by the server)

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._launcher.status(self._pid)

    def alive(self) -> bool:
        return not self._wait(0)

    def _wait(self, timeout: float) -> bool:
        if self._pidfd is None:
            return True
        ended = bool(select.select([self._pidfd], [], [], timeout)[0])
        if ended:
            os.close(self._pidfd)
            self._pidfd = None
        return ended
