"""A private RabbitMQ node under a directory of its own (Debian's rabbitmq-server).

Used by `flotilla up` and by the test fixture when no broker URL is given. Everything the node
writes (mnesia, logs, Erlang cookie, pid file) stays under `base`; it listens on loopback only,
on free ports, and its epmd is private too, so it never meets another node on the machine.

The node has no `guest` user: its one user (`flotilla` by default) is created at first boot
with a generated password kept in `base/amqp-password` (mode 0600, like the Erlang cookie and
the API's admin token), so another local user of the machine cannot log in to it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from services.files import write_private

SBIN = Path("/usr/lib/rabbitmq/bin")


class BrokerError(RuntimeError):
    """The private node could not be started or queried."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def available() -> bool:
    """Whether Debian's rabbitmq-server is installed here."""
    return (SBIN / "rabbitmq-server").exists()


class PrivateBroker:
    """One RabbitMQ node: `start()`, `url`, `close_all_connections()`, `stop()`."""

    def __init__(
        self, base: Path, *, port: int | None = None, name: str = "flotilla", user: str = "flotilla"
    ) -> None:
        self.base = base.resolve()
        self.user = user
        self.password_file = self.base / "amqp-password"
        self._password: str | None = None
        self.port = port or free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.nodename = f"{name}-{self.port}@localhost"
        self.pid_file = self.base / "rabbit.pid"
        self._pid: int | None = None

    @property
    def password(self) -> str:
        """The node user's password: read from `password_file`, generated there (0600) once."""
        if self._password is None:
            try:
                self._password = self.password_file.read_text().strip() or None
            except FileNotFoundError:
                pass
            if self._password is None:
                self.base.mkdir(parents=True, exist_ok=True)
                self._password = secrets.token_urlsafe(24)
                write_private(self.password_file, self._password + "\n")
        return self._password

    @property
    def url(self) -> str:
        return f"amqp://{self.user}:{self.password}@127.0.0.1:{self.port}/%2F"

    def env(self) -> dict[str, str]:
        keep = ("PATH", "LANG", "LC_ALL", "TMPDIR")
        env = {k: v for k, v in os.environ.items() if k in keep}
        env.update(
            HOME=str(self.base),
            RABBITMQ_CONF_ENV_FILE=str(self.base / "rabbitmq-env.conf"),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_MNESIA_BASE=str(self.base / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.pid_file),
            RABBITMQ_CONFIG_FILE=str(self.base / "rabbitmq"),
        )
        return env

    def start(self, timeout: float = 60.0) -> PrivateBroker:
        if not available():
            raise BrokerError(
                "rabbitmq-server is not installed: `apt-get install -y rabbitmq-server`, "
                "or set FLOTILLA_AMQP_URL to a broker"
            )
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "rabbitmq-env.conf").write_text("")
        (self.base / "enabled_plugins").write_text("[].\n")
        # The node's first boot creates `user` (administrator, all permissions on /) instead of
        # `guest`; the file holds the password, so it is private like the password file.
        write_private(
            self.base / "rabbitmq.conf",
            f"default_user = {self.user}\n"
            f"default_pass = {self.password}\n"
            "default_user_tags.administrator = true\n"
            "loopback_users = none\n"
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "log.console = false\n",
        )
        cookie = self.base / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(os.urandom(16).hex())
            cookie.chmod(0o400)
        result = subprocess.run(
            [str(SBIN / "rabbitmq-server"), "-detached"],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise BrokerError(f"rabbitmq-server failed: {result.stderr or result.stdout}")
        deadline = time.monotonic() + timeout
        while not self.pid_file.exists():
            if time.monotonic() > deadline:
                raise BrokerError(f"no pid file after {timeout:.0f} s; see {self.base / 'log'}")
            time.sleep(0.05)
        self._pid = int(self.pid_file.read_text().strip() or 0) or None
        self.ctl("wait", "--timeout", str(int(timeout)), str(self.pid_file), timeout=timeout + 5)
        return self

    def ctl(self, *args: str, timeout: float = 30.0) -> str:
        """Run rabbitmqctl against this node; raise BrokerError if it fails."""
        try:
            result = subprocess.run(
                [str(SBIN / "rabbitmqctl"), "-n", self.nodename, *args],
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BrokerError(f"rabbitmqctl {' '.join(args)} timed out") from None
        if result.returncode != 0:
            raise BrokerError(f"rabbitmqctl {' '.join(args)}: {result.stderr or result.stdout}")
        return result.stdout

    def close_all_connections(self, reason: str = "test") -> None:
        self.ctl("close_all_connections", reason)

    def stop(self) -> None:
        """Stop the node (SIGTERM, then SIGKILL), its private epmd, and remove nothing."""
        pid = self._pid
        if pid is not None and _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._pid = None
        # The pid file names one process; make sure no other process of this node (found by
        # its private home dir on its command line) outlives it.
        for other in self._node_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(other, signal.SIGKILL)
        epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                [epmd, "-kill"],
                env=self.env(),
                capture_output=True,
                timeout=5,
                check=False,
            )

    def _node_pids(self) -> list[int]:
        marker = f"-home\0{self.base}\0".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker in cmdline and _alive(int(entry.name)):
                found.append(int(entry.name))
        return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists": look at its state.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
