"""All of Flotilla on one host, as child processes: what `flotilla up`, tests/e2e and
bench/control_plane.py run.

stack = Stack(StackConfig(state_dir=...)).start()   # broker, API, services, computes
stack.api_url, stack.admin_token
stack.stop()                                         # deletes guests first unless keep_guests

Layout of the state dir: `rabbitmq/` (the private broker, recreated at each start; with
`broker_nodes` > 1 one `rabbitmq/node<i>/` per node of a private cluster), `api/`
(its config and the SQLite registry), `network/` (the network service's config and
catalog), `storage/` (the storage service's SQLite catalog), `compute/<host>/` (each compute
node's store, domain dirs and its `dir` pool `default` under `pools/default`),
`logs/<service>.log`, and `cli.json` (API URL and admin token, mode 0600, read by the CLI).
Every child runs in a session of its own, so a Ctrl-C on the terminal reaches only the
parent, which stops them in order (compute nodes, storage, scheduler, network service, API,
broker) by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pika

from compute_node.vmm import client as vmm_client
from protos import routing
from services.broker import PrivateBroker, PrivateCluster, free_port
from services.bus.nodes import blocking_nodes
from services.cli import default_network
from services.cli.children import ForkedChild, ServiceChild, StackError
from services.files import write_private
from services.launcher import Launcher, LauncherError

POLL_FIRST_S = 0.05
POLL_MAX_S = 0.25


@dataclass(frozen=True)
class ComputeSpec:
    """One compute node: its host name and the [compute] settings written to its TOML."""

    host: str
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenSpec:
    token: str
    project: str
    role: str = "member"


@dataclass
class StackConfig:
    state_dir: Path
    amqp_url: str | None = None  # None: a private broker under state_dir/rabbitmq
    listen_host: str = "127.0.0.1"
    listen_port: int = 8780  # 0: a free port
    computes: list[ComputeSpec] = field(default_factory=list)  # empty: one, this host's name
    driver: str = "kvm"
    heartbeat_interval_s: float = 1.0
    tokens: list[TokenSpec] = field(default_factory=list)  # besides the admin token
    quotas: dict[str, dict[str, int]] = field(default_factory=dict)
    api_settings: dict[str, Any] = field(default_factory=dict)
    scheduler_settings: dict[str, str] = field(default_factory=dict)  # FLOTILLA_* variables
    admin_token: str | None = None  # None: a new random one
    keep_guests: bool = False  # stop() leaves guests for the next start to re-adopt
    broker_nodes: int = 1  # > 1: a private cluster of that many nodes, every URL to each child


def default_state_dir() -> Path:
    """/var/lib/flotilla for root, else $XDG_STATE_HOME/flotilla (~/.local/state/flotilla)."""
    if os.geteuid() == 0:
        return Path("/var/lib/flotilla")
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "flotilla"


def read_cli_state(state_dir: Path) -> dict[str, Any]:
    """What `flotilla up` wrote for the CLI (`api_url`, `token`), or {} if nothing is there."""
    try:
        data = json.loads((state_dir / "cli.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def default_route_device(route_table: Path = Path("/proc/net/route")) -> str | None:
    """The link of this host's IPv4 default route with the lowest metric (None without one):
    the uplink `flotilla up` gives its compute node for the default NAT network, as libvirt's
    `default` network masquerades to whatever the host routes through."""
    best: tuple[int, str] | None = None
    try:
        lines = route_table.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # Iface Destination Gateway Flags RefCnt Use Metric Mask ...; RTF_UP is flag 0x1.
        if len(fields) < 8 or fields[1] != "00000000" or fields[7] != "00000000":
            continue
        if not int(fields[3], 16) & 0x1:
            continue
        candidate = (int(fields[6]), fields[0])
        if best is None or candidate < best:
            best = candidate
    return None if best is None else best[1]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _toml_table(name: str, values: dict[str, Any]) -> str:
    lines = [f"[{name}]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


class Stack:
    """The all-in-one deployment. `start()` returns once the API answers, the scheduler
    consumes its queue and every compute node is `up` in the API's host list."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.state_dir = config.state_dir.resolve()
        self.admin_token = config.admin_token or "adm-" + secrets.token_urlsafe(24)
        self.broker: PrivateBroker | PrivateCluster | None = None
        self.amqp_url = config.amqp_url or ""
        port = config.listen_port or free_port()
        self.api_url = f"http://{config.listen_host}:{port}"
        self._port = port
        self.api: ServiceChild | None = None
        self.scheduler: ServiceChild | None = None
        self.network: ServiceChild | None = None
        self.default_subnet: str | None = None
        self.storage: ServiceChild | None = None
        self.computes: dict[str, ServiceChild] = {}
        self.computes_spec = config.computes or [ComputeSpec(socket.gethostname().split(".")[0])]
        # What start() polls with, ten times a second: one HTTP client and one broker
        # connection, kept. A new client per request builds a TLS context (~25 ms of CPU
        # here, seconds in an emulated L1), a new connection per check a whole AMQP
        # handshake; both took the CPU the starting services needed.
        self._http: httpx.Client | None = None
        self._launcher: Launcher | None = None
        self._amqp: pika.BlockingConnection | None = None

    # Start
    def start(
        self, timeout: float = 90.0, progress: Callable[[str], None] = lambda _: None
    ) -> Stack:
        deadline = time.monotonic() + timeout
        try:
            for d in ("logs", "api", "compute", "storage"):
                (self.state_dir / d).mkdir(parents=True, exist_ok=True)
            if not self.amqp_url:
                n = self.config.broker_nodes
                progress(
                    "starting a private RabbitMQ node"
                    if n == 1
                    else f"starting a private RabbitMQ cluster of {n} nodes"
                )
                self._start_broker(timeout)
            # The scheduler, the network and the storage service need nothing of the API's:
            # all four start at once (their Python start-ups overlap). Compute nodes wait for
            # the API, whose queue must be there to take the events of the guests a node
            # adopts as it starts, and for the storage service, which learns their pools.
            progress("starting the API, the network service, the scheduler and the storage service")
            self._start_api()
            note = self._start_network()
            self._start_scheduler()
            self._start_storage()
            self._wait(deadline, "the API answering /healthz", self._api_ready, self.api)
            self._wait(
                deadline,
                "the network service consuming its queue",
                lambda: self._consumers(routing.NETWORK_QUEUE) > 0,
                self.network,
            )
            progress(f"default network {self.default_subnet} (nat, shared){note}")
            self._wait(
                deadline,
                "the scheduler consuming its queue",
                lambda: self._consumers(routing.SCHEDULER_QUEUE) > 0,
                self.scheduler,
            )
            self._wait(
                deadline,
                "the storage service consuming its queue",
                lambda: self._consumers(routing.STORAGE_QUEUE) > 0,
                self.storage,
            )
            for spec in self.computes_spec:
                progress(f"starting compute node {spec.host}")
                self.start_compute(spec)
            for spec in self.computes_spec:
                self.wait_host_up(spec.host, deadline)
            self._wait(
                deadline,
                "the storage service knowing the compute nodes' pools",
                self._pools_known,
                self.storage,
            )
            self._write_cli_state()
        except BaseException:
            self.stop()
            raise
        finally:
            self._close_pollers()
        return self

    def _start_broker(self, timeout: float) -> None:
        base = self.state_dir / "rabbitmq"
        # The demo broker holds nothing worth keeping (compute nodes keep unsent events in
        # their outbox); a fresh node avoids stale queues and a growing mnesia dir.
        shutil.rmtree(base / "mnesia", ignore_errors=True)
        for node_dir in base.glob("node*"):
            shutil.rmtree(node_dir / "mnesia", ignore_errors=True)
        if self.config.broker_nodes > 1:
            self.broker = PrivateCluster(base, self.config.broker_nodes, name="flotilla-up")
        else:
            self.broker = PrivateBroker(base, name="flotilla-up")
        self.broker.start(timeout)
        self.amqp_url = self.broker.url  # a cluster's: every node's URL, comma-separated

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["FLOTILLA_AMQP_URL"] = self.amqp_url
        env.setdefault("FLOTILLA_LOG_LEVEL", "info")
        # Compute nodes read FLOTILLA_STATE_DIR/FLOTILLA_HOST; each gets its own via its TOML.
        for name in ("FLOTILLA_STATE_DIR", "FLOTILLA_HOST", "FLOTILLA_DRIVER"):
            env.pop(name, None)
        return env

    def _spawn(
        self,
        name: str,
        module: str,
        args: list[str],
        env: dict[str, str],
        log_name: str | None = None,
    ) -> ServiceChild:
        """`module.main(args)` forked from the stack's fork server (services/launcher.py),
        which imported every service once: their start-up imports are paid once."""
        log_path = self.state_dir / "logs" / f"{log_name or name}.log"
        if self._launcher is None:
            try:
                self._launcher = Launcher(self._env(), self.state_dir / "logs" / "launcher.log")
            except LauncherError as exc:
                raise StackError(f"the fork server did not start: {exc}") from None
        try:
            return ForkedChild(
                name, self._launcher, module=module, args=args, env=env, log_path=log_path
            )
        except LauncherError as exc:
            raise StackError(f"{name} could not be started: {exc}") from None

    def _start_api(self) -> None:
        api_dir = self.state_dir / "api"
        settings: dict[str, Any] = {
            "listen_host": self.config.listen_host,
            "listen_port": self._port,
            "database_url": f"sqlite:///{api_dir / 'registry.db'}",
            "amqp_url": self.amqp_url,
        }
        settings.update(self.config.api_settings)
        text = _toml_table("api", settings)
        tokens = [TokenSpec(self.admin_token, "admin", "admin"), *self.config.tokens]
        for t in tokens:
            text += "\n" + _toml_table(
                "[api.tokens]", {"token": t.token, "project": t.project, "role": t.role}
            )
        for project, quota in self.config.quotas.items():
            text += "\n" + _toml_table(f"api.quotas.{project}", quota)
        path = api_dir / "api.toml"
        write_private(path, text)  # tokens and the broker's credentials
        self.api = self._spawn("api", "services.api.main", ["--config", str(path)], self._env())

    def _start_network(self) -> str:
        """Start the network service with the shared `default` NAT network; returns why its
        subnet is not libvirt's usual one ("" if it is)."""
        network_dir = self.state_dir / "network"
        network_dir.mkdir(parents=True, exist_ok=True)
        subnet, why = default_network.pick(default_network.host_routes())
        self.default_subnet = str(subnet)
        text = _toml_table(
            "network",
            {
                "database_url": f"sqlite:///{network_dir / 'catalog.db'}",
                "amqp_url": self.amqp_url,
                "replica": "up",
            },
        )
        text += "\n" + _toml_table(
            "network.default_network", {"name": "default", "subnet": subnet, "project": "admin"}
        )
        path = network_dir / "network.toml"
        write_private(path, text)  # the broker's credentials
        self.network = self._spawn(
            "network", "services.network.main", ["--config", str(path)], self._env()
        )
        return f": {why}" if why else ""

    def _start_scheduler(self) -> None:
        env = self._env()
        env.update(self.config.scheduler_settings)
        self.scheduler = self._spawn("scheduler", "services.scheduler.main", [], env)

    def _start_storage(self) -> None:
        env = self._env()
        env["FLOTILLA_STORAGE_DATABASE_URL"] = (
            f"sqlite:///{self.state_dir / 'storage' / 'catalog.db'}"
        )
        env["FLOTILLA_STORAGE_REPLICA"] = "up"
        env["FLOTILLA_STORAGE_DEFAULT_POOL"] = "default"
        env["FLOTILLA_STORAGE_AGENT_HOSTS"] = ",".join(s.host for s in self.computes_spec)
        self.storage = self._spawn("storage", "services.storage.main", [], env)

    def _poller(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(
                base_url=self.api_url,
                headers={"Authorization": f"Bearer {self.admin_token}"},
                timeout=5,
            )
        return self._http

    def _pools_known(self) -> bool:
        try:
            r = self._poller().get("/v1/pools")
        except httpx.HTTPError:
            return False
        hosts = (
            {p.get("host") for p in r.json().get("pools", [])} if r.status_code == 200 else set()
        )
        return all(spec.host in hosts for spec in self.computes_spec)

    def start_compute(self, spec: ComputeSpec) -> ServiceChild:
        """Start one compute node (also after start(), e.g. a second host in a test)."""
        state = self.state_dir / "compute" / spec.host
        state.mkdir(parents=True, exist_ok=True)
        settings: dict[str, Any] = {
            "host": spec.host,
            "state_dir": str(state),
            "amqp_url": self.amqp_url,
            "driver": self.config.driver,
            "heartbeat_interval_s": self.config.heartbeat_interval_s,
        }
        uplink = default_route_device()
        if uplink is not None and self.config.driver == "kvm":
            settings["net_uplink"] = uplink  # the default NAT network masquerades to it
        settings.update(spec.settings)
        path = state / "compute.toml"
        write_private(path, _toml_table("compute", settings))  # the broker's credentials
        child = self._spawn(
            f"compute {spec.host}",
            "compute_node.main",
            ["--config", str(path)],
            self._env(),
            log_name=f"compute-{spec.host}",
        )
        self.computes[spec.host] = child
        return child

    def wait_host_up(self, host: str, deadline: float) -> None:
        child = self.computes[host]
        self._wait(
            deadline,
            f"compute node {host} up in the API's host list",
            lambda: self.host_state(host) == "up",
            child,
        )

    def host_state(self, host: str) -> str | None:
        try:
            r = self._poller().get("/v1/hosts")
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        body = r.json()
        items = body.get("hosts", []) if isinstance(body, dict) else body
        for item in items or []:
            if item.get("host", item.get("name")) == host:
                state = item.get("state")
                return str(state) if state is not None else None
        return None

    def _api_ready(self) -> bool:
        try:
            return self._poller().get("/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _consumers(self, queue: str) -> int:
        """The queue's consumer count (0 while it does not exist), on one kept connection;
        a passive declare of a missing queue closes only its channel."""
        if self._amqp is None or not self._amqp.is_open:
            try:
                self._amqp, _params = blocking_nodes(self.amqp_url, "flotilla-up").connect()
            except Exception:
                self._amqp = None
                return 0
        try:
            ch = self._amqp.channel()
        except Exception:
            with contextlib.suppress(Exception):
                self._amqp.close()
            self._amqp = None  # the next check connects again
            return 0
        try:
            ok = ch.queue_declare(queue, passive=True)
            return int(ok.method.consumer_count)
        except Exception:
            return 0
        finally:
            with contextlib.suppress(Exception):
                if ch.is_open:
                    ch.close()

    def _close_pollers(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            http.close()
        conn, self._amqp = self._amqp, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _wait(
        self, deadline: float, what: str, ready: Callable[[], bool], child: ServiceChild | None
    ) -> None:
        # Quick first looks, then one every POLL_MAX_S: a check costs the CPU the services
        # are starting on (much of it on a one-vCPU host), and a long wait needs few.
        interval = POLL_FIRST_S
        while not ready():
            if child is not None and not child.alive():
                raise child.died()
            if time.monotonic() > deadline:
                where = f"; see {child.log_path}:\n{child.log_tail()}" if child is not None else ""
                raise StackError(f"timed out waiting for {what}{where}")
            time.sleep(interval)
            interval = min(interval * 1.5, POLL_MAX_S)

    def _write_cli_state(self) -> None:
        path = self.state_dir / "cli.json"
        write_private(
            path,
            json.dumps(
                {"api_url": self.api_url, "token": self.admin_token, "pid": os.getpid()},
                indent=1,
            )
            + "\n",
        )

    # Health and stop
    def children(self) -> list[ServiceChild]:
        found = [*self.computes.values(), self.storage, self.scheduler, self.network, self.api]
        return [c for c in found if c is not None]

    def dead_child(self) -> ServiceChild | None:
        for child in self.children():
            if not child.alive():
                return child
        return None

    def delete_all_domains(self, timeout: float = 30.0) -> None:
        """Delete every domain through the API (destroying running ones) and wait until the
        registry has none left; best effort."""
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        try:
            with httpx.Client(base_url=self.api_url, headers=headers, timeout=10) as http:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    r = http.get("/v1/domains")
                    if r.status_code != 200:
                        return
                    body = r.json()
                    items = body.get("domains", []) if isinstance(body, dict) else body
                    if not items:
                        return
                    for item in items:
                        if item.get("task") != "deleting":
                            http.delete(f"/v1/domains/{item['id']}")
                    time.sleep(0.2)
        except httpx.HTTPError:
            pass

    def stop(self) -> None:
        """Delete guests (unless keep_guests), then end every child by pid, then every VMM
        still running under the state dir by its pid (unless keep_guests), then the
        broker."""
        if (
            not self.config.keep_guests
            and self.api is not None
            and self.api.alive()
            and any(c.alive() for c in self.computes.values())
        ):
            self.delete_all_domains()
        for child in self.computes.values():
            child.stop()
        if not self.config.keep_guests:
            # Whatever died first (a compute node killed, a delete that failed): no guest
            # outlives the stack. Each VMM is ended by the pid it recorded.
            for domain_dir in self.state_dir.glob("compute/*/domains/*"):
                vmm_client.end(domain_dir)
        if self.storage is not None:
            self.storage.stop()
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.network is not None:
            self.network.stop()
        if self.api is not None:
            self.api.stop()
        if self._launcher is not None:
            self._launcher.close()
            self._launcher = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        self._close_pollers()
        with contextlib.suppress(OSError):
            state = read_cli_state(self.state_dir)
            if state.get("pid") == os.getpid():
                (self.state_dir / "cli.json").unlink()
