"""Scale simulation: FakeDriver hosts and domains through three scheduler replicas and two
API replicas on PostgreSQL, on a three-node RabbitMQ cluster.

    python bench/scale.py                # 200 hosts, 1,000 domains (a few minutes here)
    python bench/scale.py --full         # 1,000 hosts, 10,000 domains
    python bench/scale.py --hosts 500 --domains 5000

Everything is private and on loopback: a three-node RabbitMQ cluster (services.broker), a
PostgreSQL cluster (tests/pg.py), two `flotilla-api` replicas on it, three
`flotilla-scheduler` replicas, and the hosts: many logical compute nodes per process
(`--per-process`, 50 by default; `python bench/scale.py --serve-nodes …` is that process).
Each logical host is a real `ComputeNode` on the FakeDriver with its own store, broker
connections, `compute.<host>` queue, heartbeat and outbox; what makes it light is one
command worker instead of eight and no storage agent (the fake hosts have no pools), so a
host costs two broker connections and a few threads instead of eleven connections.

Domains (1 vCPU, 128 or 192 MiB) are created in two phases from `--clients` threads:
- `api.creates_per_s`: the first `--api-share` of them through `POST /v1/domains` on the
  two API replicas alternately (registry, scheduler RPC, define + start on the host);
- `sched.decisions_per_s`: the rest as `ScheduleDomain` RPCs straight to the `scheduler`
  queue (no API in the way): placements per second across the three replicas, at that
  many hosts.
Hosts are sized tight (10-14 vCPUs at allocation ratio 1.0, 2-3 GiB, nothing reserved) so
over-commit would show. At the end: every domain placed; the registry's placed domains and
the hosts' own lists (`ListDomains` on every host) agree, each domain on exactly one host,
and no host holds more vCPUs or memory than it has — from the hosts' accounts and from
the registry's. Ends with JSON lines (figures, then `scale.invariants_held`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.figures import emit

ADMIN_TOKEN = "scale-admin-token"


def host_vcpus(i: int) -> int:
    return 10 + i % 5


def host_memory_mib(i: int) -> int:
    return 2048 + 512 * (i % 3)


def host_name(i: int) -> str:
    return f"scale-{i:04d}"


def domain_memory(i: int) -> int:
    return 128 if i % 2 else 192


# ---- the node process --------------------------------------------------------------------------


def serve_nodes(argv: list[str]) -> int:
    """Run `--count` logical compute nodes in this process until SIGTERM."""
    from compute_node.config import ComputeConfig
    from compute_node.fake import FakeDriver
    from compute_node.node import ComputeNode
    from services import log
    from services.bus import ServiceRunner
    from services.bus.idempotency import SqliteIdempotencyStore
    from tests.bootfiles import BOOT_DIR

    class LightNode(ComputeNode):
        """A compute node with one command worker and no storage agent."""

        def __init__(self, config: ComputeConfig, driver: FakeDriver) -> None:
            super().__init__(config, driver)
            self.runner = ServiceRunner(
                self.bus,
                self.lifecycle,
                queue=self.queue,
                idempotency=SqliteIdempotencyStore(config.state_dir / "idempotency.db"),
                concurrency=1,
            )

        def start(self, timeout: float = 60.0) -> LightNode:
            self.adopt()
            self.outbox.start()
            self.bus.start(timeout)
            self.runner.start()
            self.heartbeat.start()
            return self

        def stop(self) -> None:
            self.heartbeat.stop()
            self.runner.stop()
            self.outbox.stop()
            self.bus.close()
            self.store.close()

    parser = argparse.ArgumentParser()
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--heartbeat-s", type=float, required=True)
    args = parser.parse_args(argv)
    log.configure("warning")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    nodes: list[LightNode] = []
    try:
        for i in range(args.first, args.first + args.count):
            config = ComputeConfig(
                host=host_name(i),
                state_dir=args.state_dir / host_name(i),
                amqp_url=args.amqp_url,
                driver="fake",
                allowed_boot_dirs=[BOOT_DIR],
                cpu_allocation_ratio=1.0,
                reserved_host_memory_mib=0,
                heartbeat_interval_s=args.heartbeat_s,
            )
            driver = FakeDriver(host_vcpus(i), host_memory_mib(i))
            nodes.append(LightNode(config, driver).start())
        print("ready", flush=True)
        stop.wait()
    finally:
        for node in nodes:
            node.stop()
    return 0


# ---- the simulation ----------------------------------------------------------------------------


def _toml(table: str, values: dict[str, object]) -> str:
    return f"[{table}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


class Deployment:
    """The broker cluster, PostgreSQL, the API and scheduler replicas and the node processes,
    all under `base` and ended by pid in `close()`."""

    def __init__(self, base: Path, args: argparse.Namespace) -> None:
        from services.broker import PrivateCluster
        from tests.pg import private_cluster

        self.base = base
        self.args = args
        self.stack = contextlib.ExitStack()
        self.children: list[Any] = []
        self.node_procs: list[subprocess.Popen[str]] = []
        self.cluster = PrivateCluster(base / "rabbitmq", 3, name="flotilla-scale")
        self.stack.callback(self.cluster.stop)
        self.pg_url = self.stack.enter_context(private_cluster())
        self.api_urls: list[str] = []

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOTILLA_")}
        env["FLOTILLA_AMQP_URL"] = self.cluster.url
        env["FLOTILLA_LOG_LEVEL"] = "warning"
        return env

    def start(self) -> None:
        from services.broker import free_port
        from services.cli.children import Child
        from services.files import write_private

        t0 = time.monotonic()
        self.cluster.start(timeout=300)
        say(f"broker cluster up in {time.monotonic() - t0:.0f} s")
        for i in range(2):
            port = free_port()
            path = self.base / f"api{i}.toml"
            text = _toml(
                "api",
                {
                    "listen_host": "127.0.0.1",
                    "listen_port": port,
                    "database_url": self.pg_url,
                    "amqp_url": self.cluster.url,
                    "schedule_timeout_s": 300.0,
                    "schedule_max_attempts": 5,
                    "host_down_after_intervals": 6.0,
                },
            )
            text += "\n" + _toml(
                "[api.tokens]", {"token": ADMIN_TOKEN, "project": "scale", "role": "admin"}
            )
            write_private(path, text)
            argv = [sys.executable, "-m", "services.api.main", "--config", str(path)]
            argv += ["--log-level", "warning"]
            self.children.append(Child(f"api{i}", argv, self.env(), self.base / f"api{i}.log"))
            self.api_urls.append(f"http://127.0.0.1:{port}")
        for i in range(3):
            argv = [sys.executable, "-m", "services.scheduler.main", "--replica", f"scale{i}"]
            argv += ["--workers", "16", "--log-level", "warning"]
            env = {**self.env(), "FLOTILLA_SCHEDULER_DOWN_AFTER_INTERVALS": "6"}
            self.children.append(Child(f"sched{i}", argv, env, self.base / f"sched{i}.log"))
        shm = Path("/dev/shm")
        state = Path(tempfile.mkdtemp(prefix="flotilla-scale-", dir=shm if shm.is_dir() else None))
        self.stack.callback(shutil.rmtree, state, True)
        per = self.args.per_process
        for first in range(0, self.args.hosts, per):
            argv = [sys.executable, str(Path(__file__).resolve()), "--serve-nodes"]
            argv += ["--amqp-url", self.cluster.url, "--state-dir", str(state)]
            argv += ["--first", str(first), "--count", str(min(per, self.args.hosts - first))]
            argv += ["--heartbeat-s", str(self.args.heartbeat_s)]
            log = (self.base / f"nodes{first}.log").open("ab")
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
            log.close()
            self.node_procs.append(proc)
        for proc in self.node_procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a node process exited ({proc.poll()}); logs in {self.base}")
        say(f"{self.args.hosts} hosts serving at {time.monotonic() - t0:.0f} s")
        deadline = time.monotonic() + 300
        while (up := self.hosts_up()) < self.args.hosts:
            for child in self.children:
                if not child.alive():
                    raise child.died()
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {up} of {self.args.hosts} hosts up in the API")
            time.sleep(1)
        time.sleep(2 * self.args.heartbeat_s)  # the schedulers hear them as the API does
        say(f"every host up at {time.monotonic() - t0:.0f} s")

    def hosts_up(self) -> int:
        try:
            r = httpx.get(f"{self.api_urls[0]}/v1/hosts", headers=auth(), timeout=30)
        except httpx.HTTPError:
            return 0
        if r.status_code != 200:
            return 0
        return sum(h["state"] == "up" for h in r.json()["hosts"])

    def close(self) -> None:
        for proc in self.node_procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.node_procs:
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for child in self.children:
            child.stop()
        self.stack.close()


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def say(text: str) -> None:
    print(f"scale: {text}", file=sys.stderr, flush=True)


def create_through_api(
    api_urls: list[str], kernel: str, n: int, clients: int
) -> tuple[dict[str, str], Counter[str], float]:
    """`n` domains by POST /v1/domains; (domain id → host, failures by status/code, s)."""
    placed: dict[str, str] = {}
    failures: Counter[str] = Counter()
    lock = threading.Lock()
    local = threading.local()

    replicas = iter(range(clients))

    def create(i: int) -> None:
        # Each client keeps to one replica: a keep-alive connection left idle while the
        # client waited on the other replica's create (seconds under this load) is one the
        # server closes after its 5 s, racing the client's next request on it.
        if not hasattr(local, "http"):
            with lock:
                url = api_urls[next(replicas) % len(api_urls)]
            local.http = httpx.Client(base_url=url, headers=auth(), timeout=600)
        body = {
            "name": f"scale-api-{i:05d}",
            "vcpus": 1,
            "memory_mib": domain_memory(i),
            "boot": {"kernel": kernel},
        }
        try:
            r = local.http.post("/v1/domains", json=body)
        except (httpx.ReadError, httpx.RemoteProtocolError):
            # The connection went as the request went out: sent again; if the first one did
            # arrive, the name is taken and the domain is the one it made.
            r = local.http.post("/v1/domains", json=body)
            if r.status_code == 409:
                found = local.http.get("/v1/domains", params={"name": body["name"]})
                if found.status_code == 200 and found.json()["domains"]:
                    r = httpx.Response(201, json=found.json()["domains"][0])
        with lock:
            if r.status_code == 201:
                placed[r.json()["id"]] = r.json()["host"]
            else:
                failures[f"{r.status_code} {r.json().get('code', '')}"] += 1

    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(create, range(n)))
    return placed, failures, time.monotonic() - started


def schedule_directly(
    url: str, kernel: str, first: int, n: int, clients: int
) -> tuple[dict[str, str], Counter[str], Counter[int], float]:
    """`n` ScheduleDomain RPCs to the scheduler queue; (id → host, failures, hosts tried, s)."""
    from protos import routing
    from protos.domain import BootSpec, DomainSpec
    from protos.scheduler import Placement, ScheduleDomain
    from services.bus import Bus, RemoteError

    bus = Bus(url, source="scale-client").start(timeout=60)  # a connection per calling thread
    placed: dict[str, str] = {}
    failures: Counter[str] = Counter()
    tries: Counter[int] = Counter()
    lock = threading.Lock()

    def place(i: int) -> None:
        spec = DomainSpec(
            name=f"scale-sched-{i:05d}",
            vcpus=1,
            memory_mib=domain_memory(i),
            boot=BootSpec(kernel=kernel),
        )
        command = ScheduleDomain(spec=spec, project="scale", privileged=True, max_attempts=5)
        try:
            reply = bus.call(routing.SCHEDULER_QUEUE, command, timeout=300)
        except RemoteError as exc:
            with lock:
                failures[exc.code] += 1
            return
        except Exception as exc:  # the broker too slow to take a connection: counted
            with lock:
                failures[type(exc).__name__] += 1
            return
        assert isinstance(reply, Placement)
        with lock:
            placed[str(spec.uuid)] = reply.host
            tries[len(reply.attempts) + 1] += 1

    try:
        started = time.monotonic()
        with ThreadPoolExecutor(clients * 2) as pool:
            list(pool.map(place, range(first, first + n)))
        return placed, failures, tries, time.monotonic() - started
    finally:
        bus.close()


def check(
    dep: Deployment, via_api: dict[str, str], direct: dict[str, str]
) -> tuple[list[str], dict[str, int]]:
    """Violations, and counts, from the hosts' own lists and the registry."""
    from protos import routing
    from protos.commands import ListDomains
    from protos.domain import PowerState
    from protos.replies import DomainList
    from services.bus import Bus

    bad: list[str] = []
    on_hosts: dict[str, str] = {}
    with Bus(dep.cluster.url, source="scale-check") as bus:
        bus.start(timeout=60)
        for i in range(dep.args.hosts):
            host = host_name(i)
            reply = bus.call(routing.compute_queue(host), ListDomains(), timeout=60)
            assert isinstance(reply, DomainList)
            vcpus = sum(d.vcpus for d in reply.domains)
            memory = sum(d.memory_mib for d in reply.domains)
            if vcpus > host_vcpus(i) or memory > host_memory_mib(i):
                bad.append(f"{host} over-committed by its own account: {vcpus} vCPUs, {memory} MiB")
            for d in reply.domains:
                if d.state is not PowerState.RUNNING:
                    bad.append(f"{host}: {d.domain_id} is {d.state}")
                if str(d.domain_id) in on_hosts:
                    bad.append(f"{d.domain_id} on {on_hosts[str(d.domain_id)]} and {host}")
                on_hosts[str(d.domain_id)] = host
    wanted = {**via_api, **direct}
    if on_hosts != wanted:
        missing = set(wanted) - set(on_hosts)
        extra = set(on_hosts) - set(wanted)
        moved = [d for d in set(wanted) & set(on_hosts) if wanted[d] != on_hosts[d]]
        bad.append(
            f"hosts vs placements: {len(missing)} missing, {len(extra)} extra, "
            f"{len(moved)} elsewhere (e.g. {sorted(missing | extra)[:3]})"
        )
    r = httpx.get(f"{dep.api_urls[1]}/v1/domains", headers=auth(), timeout=300)
    registry = {d["id"]: d for d in r.json()["domains"]}
    per_host: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0])
    for domain_id, d in registry.items():
        if d["state"] != "running" or d["task"] != "none":
            bad.append(f"registry: {d['name']} {d['state']}/{d['task']}")
        if via_api.get(domain_id) != d["host"]:
            bad.append(f"registry: {d['name']} on {d['host']}, placed on {via_api.get(domain_id)}")
        per_host[d["host"]][0] += d["vcpus"]
        per_host[d["host"]][1] += d["memory_mib"]
    if set(registry) != set(via_api):
        bad.append(f"registry holds {len(registry)} domains, {len(via_api)} were created")
    for i in range(dep.args.hosts):
        vcpus, memory = per_host.get(host_name(i), [0, 0])
        if vcpus > host_vcpus(i) or memory > host_memory_mib(i):
            bad.append(f"{host_name(i)} over-committed in the registry: {vcpus}, {memory} MiB")
    return bad, {"on_hosts": len(on_hosts), "in_registry": len(registry)}


def main() -> int:
    if "--serve-nodes" in sys.argv:
        return serve_nodes([a for a in sys.argv[1:] if a != "--serve-nodes"])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="1,000 hosts and 10,000 domains")
    parser.add_argument("--hosts", type=int, default=200)
    parser.add_argument("--domains", type=int, default=1000)
    parser.add_argument("--api-share", type=float, default=0.5, help="share created via the API")
    parser.add_argument("--per-process", type=int, default=50, help="logical hosts a process")
    parser.add_argument("--clients", type=int, default=16, help="client threads")
    parser.add_argument("--heartbeat-s", type=float, default=None, help="(2, 5 with --full)")
    args = parser.parse_args()
    if args.full:
        args.hosts, args.domains = 1000, 10000
    if args.heartbeat_s is None:
        args.heartbeat_s = 5.0 if args.hosts > 500 else 2.0
    from tests.bootfiles import KERNEL

    base = Path(tempfile.mkdtemp(prefix="flotilla-scale-run-"))
    dep = Deployment(base, args)
    ok = False
    try:
        dep.start()
        n_api = round(args.domains * args.api_share)
        via_api, api_fail, api_s = create_through_api(dep.api_urls, KERNEL, n_api, args.clients)
        say(f"{len(via_api)} created through the API in {api_s:.1f} s; refused: {dict(api_fail)}")
        direct, sched_fail, tries, sched_s = schedule_directly(
            dep.cluster.url, KERNEL, n_api, args.domains - n_api, args.clients
        )
        say(
            f"{len(direct)} placed directly in {sched_s:.1f} s; refused: {dict(sched_fail)}; "
            f"hosts tried per placement: {dict(tries)}"
        )
        bad, counts = check(dep, via_api, direct)
        if api_fail or sched_fail:
            bad.append(f"not placed: api {dict(api_fail)}, scheduler {dict(sched_fail)}")
        for line in bad[:50]:
            say(f"VIOLATION {line}")
        ok = not bad
        sizes = {
            "hosts": args.hosts,
            "total_domains": args.domains,
            "api_replicas": 2,
            "scheduler_replicas": 3,
            "broker_nodes": 3,
            "registry": "postgresql",
        }
        emit(
            [
                {
                    "metric": "api.creates_per_s",
                    "value": round(len(via_api) / api_s, 2),
                    "unit": "creates/s",
                    "domains": n_api,
                    "clients": args.clients,
                    **sizes,
                },
                {
                    "metric": "sched.decisions_per_s",
                    "value": round(len(direct) / sched_s, 2),
                    "unit": "placements/s",
                    "domains": args.domains - n_api,
                    "hosts_tried": dict(tries),
                    **sizes,
                },
                {
                    "metric": "scale.invariants_held",
                    "value": int(ok),
                    "unit": "bool",
                    "violations": len(bad),
                    "target": "1",
                    **counts,
                    **sizes,
                },
            ]
        )
    finally:
        dep.close()
        if ok:
            shutil.rmtree(base, ignore_errors=True)
        else:
            say(f"logs kept under {base}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
