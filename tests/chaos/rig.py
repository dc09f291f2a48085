"""The deployment the chaos suite and `bench/soak.py` run on, every part a process of its own
so that each can be killed by its pid: a three-node RabbitMQ cluster, a PostgreSQL registry,
two API replicas, two scheduler replicas, FakeDriver compute nodes and (where /dev/kvm can
create a VM) one KvmDriver compute node running the test guest.

Everything lives under one base directory and is ended by pid in `stop()`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from protos import routing
from services.broker import PrivateCluster, free_port
from services.bus.nodes import blocking_nodes
from services.cli.children import Child
from services.files import write_private

ADMIN_TOKEN = "chaos-admin-token"


def _toml(table: str, values: dict[str, object]) -> str:
    return f"[{table}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


@dataclass
class Replica:
    """One restartable service process: `argv` and `env` are kept for the restart."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    child: Child | None = None
    restarts: int = 0

    def start(self) -> Replica:
        self.child = Child(self.name, self.argv, self.env, self.log_path)
        return self

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    def alive(self) -> bool:
        return self.child is not None and self.child.alive()

    def kill(self) -> None:
        """SIGKILL by pid: nothing gets to clean up."""
        if self.child is not None and self.child.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child.pid, signal.SIGKILL)
            self.child.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


@dataclass
class ComputeHost:
    host: str
    driver: str  # "fake" or "kvm"
    state_dir: Path
    replica: Replica


@dataclass
class Rig:
    base: Path
    cluster: PrivateCluster
    pg_url: str
    kernel: str  # the boot file every guest names
    # The services' broker URL list: the cluster's default vhost, or a vhost of the run's own
    # on a cluster it shares (tests/brokers.py: cluster_vhost).
    amqp_url: str = ""
    apis: list[Replica] = field(default_factory=list)
    api_urls: list[str] = field(default_factory=list)
    schedulers: list[Replica] = field(default_factory=list)
    computes: list[ComputeHost] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.amqp_url = self.amqp_url or self.cluster.url

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOTILLA_")}
        env["FLOTILLA_AMQP_URL"] = self.amqp_url
        env["FLOTILLA_LOG_LEVEL"] = "info"
        return env

    # ---- starting ---------------------------------------------------------------------------

    def add_api(self, i: int) -> None:
        port = free_port()
        path = self.base / f"api{i}.toml"
        text = _toml(
            "api",
            {
                "listen_host": "127.0.0.1",
                "listen_port": port,
                "database_url": self.pg_url,
                "amqp_url": self.amqp_url,
                "rpc_timeout_s": 30.0,
                "schedule_timeout_s": 60.0,
            },
        )
        text += "\n" + _toml(
            "[api.tokens]", {"token": ADMIN_TOKEN, "project": "chaos", "role": "admin"}
        )
        write_private(path, text)
        argv = [sys.executable, "-m", "services.api.main", "--config", str(path)]
        self.apis.append(Replica(f"api{i}", argv, self.env(), self.base / f"api{i}.log").start())
        self.api_urls.append(f"http://127.0.0.1:{port}")

    def add_scheduler(self, i: int) -> None:
        argv = [sys.executable, "-m", "services.scheduler.main", "--replica", f"chaos-sched{i}"]
        log_path = self.base / f"scheduler{i}.log"
        self.schedulers.append(Replica(f"scheduler{i}", argv, self.env(), log_path).start())

    def add_compute(self, host: str, driver: str) -> None:
        state = self.base / "compute" / host
        state.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "compute_node.main", "--host", host]
        argv += ["--state-dir", str(state), "--driver", driver, "--heartbeat-interval-s", "1"]
        replica = Replica(f"compute-{host}", argv, self.env(), self.base / f"compute-{host}.log")
        self.computes.append(ComputeHost(host, driver, state, replica.start()))

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Every API answers /healthz, both schedulers consume, every host is `up`."""
        deadline = time.monotonic() + timeout
        for url, api in zip(self.api_urls, self.apis, strict=True):
            self._wait(deadline, f"{api.name} /healthz", functools.partial(_healthy, url), api)
        self._wait(
            deadline,
            "the schedulers consuming",
            lambda: self.consumers(routing.SCHEDULER_QUEUE) >= len(self.schedulers),
            None,
        )
        for compute in self.computes:
            self._wait(
                deadline,
                f"host {compute.host} up",
                functools.partial(self.host_up, compute.host),
                compute.replica,
            )

    def _wait(
        self, deadline: float, what: str, ready: Callable[[], bool], replica: Replica | None
    ) -> None:
        while not ready():
            if replica is not None and not replica.alive():
                assert replica.child is not None
                raise replica.child.died()
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.2)

    def consumers(self, queue: str) -> int:
        try:
            conn, _ = blocking_nodes(self.amqp_url, "chaos-probe").connect()
        except Exception:
            return 0
        try:
            ok = conn.channel().queue_declare(queue, passive=True)
            return int(ok.method.consumer_count)
        except Exception:
            return 0
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def host_up(self, host: str) -> bool:
        return self.host_state(host) == "up"

    def host_state(self, host: str) -> str | None:
        for url in self.api_urls:
            try:
                r = httpx.get(f"{url}/v1/hosts", headers=self.auth(), timeout=5)
            except httpx.HTTPError:
                continue
            if r.status_code == 200:
                for item in r.json().get("hosts", []):
                    if item.get("name") == host:
                        return str(item.get("state"))
        return None

    @staticmethod
    def auth() -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def stop(self) -> None:
        """End every service process by pid (computes first), then every VMM left under the
        KVM hosts' state dirs by the pid it recorded."""
        from compute_node.vmm import client as vmm_client

        for compute in self.computes:
            compute.replica.stop()
        for compute in self.computes:
            for domain_dir in compute.state_dir.glob("domains/*"):
                vmm_client.end(domain_dir)
        for replica in (*self.schedulers, *self.apis):
            replica.stop()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
