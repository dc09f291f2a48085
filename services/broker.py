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
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from services.files import write_private

SBIN = Path("/usr/lib/rabbitmq/bin")


class BrokerError(RuntimeError):
    """The private node could not be started or queried."""


_PICK = random.SystemRandom()  # not the global generator: test runs seed that one alike


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (outgoing connections' local ports)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server started next to listen on. Picked at
    random below the ephemeral range: bind(0) would hand out a port from that range, which
    any outgoing connection (a test run makes thousands, two workers at once) may take
    before the server gets to listen (a broker node then fails with `nodistribution`)."""
    low = _ephemeral_low()
    if low > 11024:
        for _ in range(100):
            port = _PICK.randrange(10000, low)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        found: int = s.getsockname()[1]
        return found


def available() -> bool:
    """Whether Debian's rabbitmq-server is installed here."""
    return (SBIN / "rabbitmq-server").exists()


class PrivateBroker:
    """One RabbitMQ node: `start()`, `url`, `close_all_connections()`, `stop()`."""

    def __init__(
        self,
        base: Path,
        *,
        port: int | None = None,
        name: str = "flotilla",
        user: str = "flotilla",
        epmd_port: int | None = None,
        password_file: Path | None = None,
        cookie: str | None = None,
    ) -> None:
        """`epmd_port`, `password_file` and `cookie` are shared by the nodes of a
        PrivateCluster; a lone node gets its own."""
        self.base = base.resolve()
        self.user = user
        self.password_file = password_file or self.base / "amqp-password"
        self._password: str | None = None
        self.port = port or free_port()
        self.dist_port = free_port()
        self.epmd_port = epmd_port or free_port()
        self.nodename = f"{name}-{self.port}@localhost"
        self.pid_file = self.base / "rabbit.pid"
        self._cookie = cookie
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
                self.password_file.parent.mkdir(parents=True, exist_ok=True)
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
            # A node that cannot start writes its crash dump here, not into the caller's
            # working directory.
            ERL_CRASH_DUMP=str(self.base / "erl_crash.dump"),
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
        if not cookie.exists() or (self._cookie and cookie.read_text() != self._cookie):
            with contextlib.suppress(FileNotFoundError):
                cookie.unlink()
            cookie.write_text(self._cookie or os.urandom(16).hex())
            cookie.chmod(0o400)
        # A node killed by SIGKILL leaves its pid file: the wait below must see a new one.
        self.pid_file.unlink(missing_ok=True)
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
        wait = ("wait", "--timeout", str(int(timeout)), str(self.pid_file))
        try:
            self.ctl(*wait, timeout=timeout + 5)
        except BrokerError as exc:  # why the node did not boot is in its own log
            raise BrokerError(f"{exc}\n{self.log_tail()}") from None
        return self

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the node's log files (where a failed boot says why)."""
        out = []
        for log in sorted((self.base / "log").glob("*.log")):
            with contextlib.suppress(OSError):
                tail = log.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {log.name} ---\n" + "\n".join(tail))
        return "\n".join(out) or f"(no log under {self.base / 'log'})"

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

    def kill(self) -> None:
        """SIGKILL every process of the node, by pid: a crash, nothing gets to clean up."""
        pids = {*self._node_pids(), *([self._pid] if self._pid is not None else [])}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        self._pid = None

    def stop(self, *, epmd: bool = True) -> None:
        """Stop the node (SIGTERM, then SIGKILL) and, unless `epmd` is False (a cluster's
        epmd outlives its nodes), its private epmd; remove nothing."""
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
        if epmd:
            self.kill_epmd()

    def kill_epmd(self) -> None:
        """End the private epmd (by `epmd -kill` on its port: only ours listens there)."""
        epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                [epmd, "-kill"],
                env=self.env(),
                capture_output=True,
                timeout=5,
                check=False,
            )
        # epmd refuses -kill while a node is registered; end whatever still serves our port.
        for pid in _epmd_pids(self.epmd_port):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

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


class PrivateCluster:
    """N private nodes clustered on loopback: one Erlang cookie, one private epmd, one user.

    Node 1 starts as a lone node (creating the user); nodes 2..N start, `stop_app`,
    `join_cluster` node 1 and `start_app`. Quorum queues declared once the cluster stands get
    a member on every node: RabbitMQ 3.10's default initial group size is all cluster nodes
    (services.bus.topology relies on it). `kill(i)` crashes node i, `restart(i)` brings it
    back into the cluster, `stop()` ends every node and the epmd by pid. Nodes are numbered
    from 0.
    """

    def __init__(self, base: Path, size: int = 3, *, name: str = "flotilla") -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self.base = base.resolve()
        self.base.mkdir(parents=True, exist_ok=True)
        epmd_port = free_port()
        cookie_file = self.base / "erlang-cookie"
        if not cookie_file.exists():
            write_private(cookie_file, os.urandom(16).hex())
        cookie = cookie_file.read_text().strip()
        self.nodes = [
            PrivateBroker(
                self.base / f"node{i}",
                name=f"{name}{i}",
                epmd_port=epmd_port,
                password_file=self.base / "amqp-password",
                cookie=cookie,
            )
            for i in range(size)
        ]
        # The shared password file is made here, once: nodes starting in parallel threads
        # would each generate (and keep) a password of their own.
        _ = self.nodes[0].password

    @property
    def urls(self) -> list[str]:
        """One URL per node, node 0 first."""
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """The URL list as `amqp_url` settings take it (comma-separated)."""
        return ",".join(self.urls)

    def start(self, timeout: float = 60.0) -> PrivateCluster:
        first = self.nodes[0]
        # Booting is most of the time: boot every node at once, then join them one by one.
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            for done in [pool.submit(node.start, timeout) for node in self.nodes]:
                done.result()
        for node in self.nodes[1:]:
            node.ctl("stop_app", timeout=timeout)
            node.ctl("join_cluster", first.nodename, timeout=timeout)
            node.ctl("start_app", timeout=timeout)
        running = self.running_nodes()
        if len(running) != len(self.nodes):
            raise BrokerError(f"cluster has {running} running, expected {len(self.nodes)}")
        return self

    def running_nodes(self, via: int | None = None) -> list[str]:
        """The names of the running nodes, as a live node (`via`, or the first that answers)
        sees them."""
        candidates = [self.nodes[via]] if via is not None else self.nodes
        error: BrokerError | None = None
        for node in candidates:
            try:
                out = node.ctl("cluster_status", "--formatter", "json")
            except BrokerError as exc:
                error = exc
                continue
            running: list[str] = json.loads(out).get("running_nodes", [])
            return sorted(running)
        raise error or BrokerError("no node answers")

    def kill(self, i: int) -> None:
        """SIGKILL node i's processes by pid (the others notice at once: loopback)."""
        self.nodes[i].kill()

    def restart(self, i: int, timeout: float = 60.0) -> None:
        """Start node i again; it rejoins the cluster (it kept its membership) and its quorum
        queue members catch up from the leaders."""
        self.nodes[i].start(timeout)
        deadline = time.monotonic() + timeout
        while self.nodes[i].nodename not in self.running_nodes(via=i):
            if time.monotonic() > deadline:
                raise BrokerError(f"node {i} did not rejoin within {timeout:.0f} s")
            time.sleep(0.2)

    def quorum_members(self, via: int = 0) -> dict[str, tuple[int, int]]:
        """Each quorum queue's (members, members online), as node `via` sees them."""
        out = self.nodes[via].ctl(
            "list_queues", "name", "type", "members", "online", "--formatter", "json"
        )
        return {
            q["name"]: (len(q.get("members") or []), len(q.get("online") or []))
            for q in json.loads(out)
            if q.get("type") == "quorum"
        }

    def stop(self) -> None:
        """End every node, then the shared epmd, by pid."""
        for node in self.nodes:
            node.stop(epmd=False)
        self.nodes[0].kill_epmd()


def _epmd_pids(port: int) -> list[int]:
    """Processes named epmd started with ERL_EPMD_PORT=`port` in their environment."""
    marker = f"ERL_EPMD_PORT={port}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "epmd":
                continue
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ:
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
