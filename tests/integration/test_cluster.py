"""Flotilla on a three-node RabbitMQ cluster: kill -9 of the node every service is connected
to while guests cycle loses no command, runs none twice, delivers every event, and the
services are back on a live node within 5 s; the node then rejoins and the queues heal."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest

from compute_node.boot_sources import BootFiles
from compute_node.config import ComputeConfig
from compute_node.driver import NicTap, RuntimeInfo
from compute_node.fake import FakeDriver
from compute_node.node import ComputeNode
from protos import routing
from protos.base import Message
from protos.codec import Envelope
from protos.commands import DestroyDomain, StartDomain
from protos.domain import BootSpec, DomainSpec, PowerState
from protos.events import DomainEvent, DomainStarted, StartedDetail
from protos.replies import DomainInfo
from protos.scheduler import Placement, ScheduleDomain
from services.api import ApiConfig, TokenEntry
from services.api.config import Role
from services.api.registry import Registry
from services.broker import BrokerError, PrivateCluster
from services.bus import Bus, ConnectionLost, PublishNacked
from services.bus.topology import QueueDecl, declare
from services.scheduler import Scheduler, SchedulerConfig
from tests.bootfiles import BOOT_DIR, KERNEL
from tests.integration.test_api import ApiServer
from tests.pg import fresh_database

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.cluster]

DOMAINS = 3
CYCLES = 12  # start + destroy, per domain
KILL_AFTER = 4  # cycles of every domain done before node 0 is killed
FAILOVER_LIMIT_S = 5.0


@pytest.fixture(scope="module")
def cluster(broker_cluster: PrivateCluster) -> PrivateCluster:
    """The session's three-node cluster (tests/conftest.py), its default vhost ours."""
    return broker_cluster


class CountingDriver(FakeDriver):
    """The fake hypervisor, counting the side effects each domain saw."""

    def __init__(self) -> None:
        super().__init__()
        self.spawns: Counter[uuid.UUID] = Counter()
        self.destroys: Counter[uuid.UUID] = Counter()

    def spawn(
        self,
        spec: DomainSpec,
        files: BootFiles,
        *,
        paused: bool = False,
        nics: Sequence[NicTap] = (),
    ) -> RuntimeInfo:
        self.spawns[spec.uuid] += 1
        return super().spawn(spec, files, paused=paused, nics=nics)

    def destroy(self, domain_id: uuid.UUID) -> None:
        self.destroys[domain_id] += 1
        super().destroy(domain_id)


class Watcher:
    """An independent subscriber on a quorum queue of its own: every domain event, by id."""

    def __init__(self, bus: Bus, queue: str | None = None) -> None:
        self.queue = queue or f"test-cluster-watch-{uuid.uuid4().hex[:8]}"
        self.seqs: defaultdict[uuid.UUID, list[int]] = defaultdict(list)
        self.ids: set[str] = set()
        self.duplicates = 0
        self._lock = threading.Lock()
        self.subscription = bus.subscribe(["domain.#"], self._on_event, queue=self.queue)

    def _on_event(self, envelope: Envelope, event: Message) -> None:
        if not isinstance(event, DomainEvent):
            return
        with self._lock:
            if envelope.id in self.ids:
                self.duplicates += 1  # at-least-once: a re-published event, same id
                return
            self.ids.add(envelope.id)
            self.seqs[event.domain_id].append(event.seq)

    def count(self, domain_id: uuid.UUID) -> int:
        with self._lock:
            return len(self.seqs[domain_id])


def _wait_reconnected(buses: dict[str, Bus], made: dict[str, int], t0: float) -> dict[str, float]:
    """Seconds from `t0` until each bus's link was connected again on a new connection."""
    took: dict[str, float] = {}
    deadline = t0 + 30
    while len(took) < len(buses) and time.monotonic() < deadline:
        for name, bus in buses.items():
            if name not in took and bus.link.connected and bus.link.connections_made > made[name]:
                took[name] = time.monotonic() - t0
        time.sleep(0.01)
    return took


def _restart_and_heal(cluster: PrivateCluster, queue: str) -> None:
    """Node 0 comes back, rejoins, and every quorum queue has its 3 members online again."""
    t1 = time.monotonic()
    cluster.restart(0)
    rejoined = time.monotonic() - t1
    members: dict[str, tuple[int, int]] = {}
    deadline = time.monotonic() + 120  # measured up to ~75 s at load 17 on 2 cores
    while time.monotonic() < deadline:
        try:
            members = cluster.quorum_members(via=0)
        except BrokerError:  # a node just back can take over 30 s to list its queues
            continue
        if members and all(m == (3, 3) for m in members.values()):
            break
        time.sleep(0.5)
    healed = time.monotonic() - t1
    print(f"node restarted and rejoined in {rejoined:.1f} s, queues healed in {healed:.1f} s")
    assert queue in members
    assert all(m == (3, 3) for m in members.values()), members
    assert len(cluster.running_nodes()) == 3


def _place(client: Bus, host: str, name: str) -> uuid.UUID:
    spec = DomainSpec(name=name, memory_mib=64, boot=BootSpec(kernel=KERNEL))
    placed = client.call(
        routing.SCHEDULER_QUEUE, ScheduleDomain(spec=spec, project="p"), timeout=60
    )
    assert isinstance(placed, Placement)
    assert placed.host == host
    return spec.uuid


def _cycle_and_kill(
    cluster: PrivateCluster,
    client: Bus,
    client_queue: str,
    domains: list[uuid.UUID],
    buses: dict[str, Bus],
) -> tuple[list[tuple[uuid.UUID, str, PowerState]], dict[str, float]]:
    """Destroy and start every domain CYCLES times from the client, kill -9 node 0 once
    each has done KILL_AFTER cycles; the answers, and each bus's time to reconnect."""
    done = Counter[uuid.UUID]()
    answered: list[tuple[uuid.UUID, str, PowerState]] = []
    kill_ready = threading.Event()
    lock = threading.Lock()

    def cycle(domain_id: uuid.UUID) -> None:
        for _ in range(CYCLES):
            for command, want in (
                (DestroyDomain(domain_id=domain_id), PowerState.SHUTOFF),
                (StartDomain(domain_id=domain_id), PowerState.RUNNING),
            ):
                reply = client.call(client_queue, command, timeout=30)
                assert isinstance(reply, DomainInfo)
                with lock:
                    answered.append((domain_id, command.TYPE, reply.state))
                assert reply.state is want, (command.TYPE, reply)
            with lock:
                done[domain_id] += 1
                if all(done[d] >= KILL_AFTER for d in domains):
                    kill_ready.set()

    with ThreadPoolExecutor(DOMAINS) as pool:
        futures = [pool.submit(cycle, d) for d in domains]
        assert kill_ready.wait(60)
        made = {name: bus.link.connections_made for name, bus in buses.items()}
        t0 = time.monotonic()
        cluster.kill(0)
        took = _wait_reconnected(buses, made, t0)
        for future in futures:
            future.result(timeout=120)  # raises if a command was lost or refused
    return answered, took


def _leader(cluster: PrivateCluster, queue: str, via: int) -> str:
    out = cluster.nodes[via].ctl("list_queues", "name", "leader", "--formatter", "json")
    return next(str(q["leader"]) for q in json.loads(out) if q["name"] == queue)


ADMIN = "ct-admin-token"


class Api:
    """Two API replicas on one PostgreSQL database, on the cluster."""

    def __init__(self, amqp_url: str, database_url: str) -> None:
        config = ApiConfig(
            amqp_url=amqp_url,
            database_url=database_url,
            tokens=[TokenEntry(token=ADMIN, project="ops", role=Role.ADMIN)],
            rpc_timeout_s=30,
            schedule_timeout_s=60,
        )
        self.servers = [ApiServer(config), ApiServer(config)]
        headers = {"Authorization": f"Bearer {ADMIN}"}
        self.a, self.b = (
            httpx.Client(base_url=server.start(), headers=headers, timeout=60)
            for server in self.servers
        )
        self.registry = Registry.open(database_url)

    def create(self, http: httpx.Client, name: str) -> dict[str, Any]:
        r = http.post("/v1/domains", json={"name": name, "boot": {"kernel": KERNEL}})
        assert r.status_code == 201, r.text
        body: dict[str, Any] = r.json()
        return body

    def healthy_within(self, limit: float) -> float:
        t0 = time.monotonic()
        while any(http.get("/healthz").status_code != 200 for http in (self.a, self.b)):
            assert time.monotonic() - t0 < limit, [h.get("/healthz").text for h in (self.a, self.b)]
            time.sleep(0.05)
        return time.monotonic() - t0

    def logged_seqs(self, domain_id: uuid.UUID) -> list[int]:
        return sorted(e.seq for e in self.registry.events.after(0, domain_id=domain_id))

    def check_after_failover(self, before: str, host: str, events: dict[uuid.UUID, int]) -> None:
        """Both replicas healthy again; an action through one seen by the other, a create
        through the other; their shared queue lost no event (each logged once)."""
        print(f"both API replicas healthy {self.healthy_within(FAILOVER_LIMIT_S):.2f} s later")
        paused = self.b.post(f"/v1/domains/{before}/actions", json={"action": "pause"})
        assert paused.json()["state"] == "paused", paused.text
        after = self.create(self.a, f"ct-api-after-{host}")
        assert after["state"] == "running"
        deadline = time.monotonic() + 20
        while self.a.get(f"/v1/domains/{before}").json()["seq"] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        deadline = time.monotonic() + 20
        while any(len(self.logged_seqs(d)) < n for d, n in events.items()):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        for d, n in events.items():
            assert self.logged_seqs(d) == list(range(1, n + 1))

    def close(self) -> None:
        self.a.close()
        self.b.close()
        for server in self.servers:
            server.stop()
        self.registry.close()


def test_kill_9_of_the_connected_node_loses_nothing_and_the_node_rejoins(
    cluster: PrivateCluster, tmp_path: Path, pg_server: str
) -> None:
    with fresh_database(pg_server) as database_url:
        _kill_9_while_guests_cycle(cluster, tmp_path, database_url)


def _kill_9_while_guests_cycle(cluster: PrivateCluster, tmp_path: Path, database_url: str) -> None:
    url = cluster.url
    driver = CountingDriver()
    host = f"ct-{uuid.uuid4().hex[:6]}"
    config = ComputeConfig(
        host=host,
        state_dir=tmp_path / host,
        amqp_url=url,
        driver="fake",
        allowed_boot_dirs=[BOOT_DIR],
        heartbeat_interval_s=0.3,
    )
    node = ComputeNode(config, driver).start()
    scheduler = Scheduler(SchedulerConfig(amqp_url=url, replica="ct-sched")).start()
    client = Bus(url, source="ct-client").start()
    watcher_bus = Bus(url, source="ct-watcher").start()
    watcher = Watcher(watcher_bus)
    api = Api(url, database_url)
    try:
        scheduler.wait_for_hosts(1)
        before = api.create(api.a, f"ct-api-{host}")
        first = cluster.nodes[0].port
        buses = {
            "compute": node.bus,
            "scheduler": scheduler.bus,
            "client": client,
            "watcher": watcher_bus,
        }
        # The URL list is tried in order: every service is on node 0, the one to be killed.
        assert {b.link.params.port for b in buses.values()} == {first}
        assert cluster.quorum_members()[watcher.queue] == (3, 3)

        domains = [_place(client, host, f"ct-{i}-{host}") for i in range(DOMAINS)]
        assert all(driver.spawns[d] == 1 for d in domains)  # placement defines and starts
        client_queue = routing.compute_queue(host)

        answered, took = _cycle_and_kill(cluster, client, client_queue, domains, buses)
        print(f"\nreconnected after kill -9 (s): { {k: round(v, 3) for k, v in took.items()} }")
        assert set(took) == set(buses), f"not reconnected: {set(buses) - set(took)}"
        assert max(took.values()) < FAILOVER_LIMIT_S, took
        assert {b.link.params.port for b in buses.values()} <= {n.port for n in cluster.nodes[1:]}

        # 0 commands lost: every command answered, in order, with the state it asked for.
        assert len(answered) == DOMAINS * CYCLES * 2
        # 0 side effects twice: the hypervisor saw each start and destroy exactly once.
        for d in domains:
            assert driver.spawns[d] == 1 + CYCLES, (d, driver.spawns[d])
            assert driver.destroys[d] == CYCLES, (d, driver.destroys[d])
        # Every event delivered: defined, started, then stopped/started per cycle; seq 1..n.
        expected = 2 + 2 * CYCLES
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(watcher.count(d) < expected for d in domains):
            time.sleep(0.1)
        for d in domains:
            assert sorted(watcher.seqs[d]) == list(range(1, expected + 1)), watcher.seqs[d]
        print(f"events: {DOMAINS * expected}, re-published duplicates: {watcher.duplicates}")

        # The scheduler still places, through the surviving nodes.
        _place(client, host, f"ct-after-{host}")

        api.check_after_failover(before["id"], host, dict.fromkeys(domains, expected))

        _restart_and_heal(cluster, watcher.queue)
    finally:
        api.close()
        watcher.subscription.close()
        watcher_bus.close()
        client.close()
        scheduler.stop()
        node.stop()


def test_a_publisher_whose_channel_met_a_queue_without_leader_gets_through_after_the_election(
    cluster: PrivateCluster,
) -> None:
    """RabbitMQ 3.10 pins a channel's first route to a quorum queue to the leader the queue's
    record names at that moment; if that node is dead (the queue is electing a new leader),
    every later publish on that channel to that queue is nacked, for as long as the channel
    lives, while a new channel is accepted at once. A compute node reconnecting right after a
    broker node died hit this about one run in four: its outbox was refused until the dead
    node came back. The bus must replace a channel that keeps being refused.

    Deterministic here: node 2 is stopped and node 0 (the queue's leader) killed, so the queue
    cannot elect a leader while the publisher's channel first routes to it; then node 2
    comes back, a leader is elected, and the publish must go through."""
    queue = f"test-cluster-elect-{uuid.uuid4().hex[:8]}"
    node1 = cluster.urls[1]
    # The queue's leader on node 0 (declared there: RabbitMQ places the leader locally).
    declare(pika.URLParameters(cluster.urls[0]), [QueueDecl(queue, "events", ("domain.#",))])
    assert cluster.nodes[0].nodename in _leader(cluster, queue, via=0)
    publisher = Bus(node1, source="ct-elect-pub").start()
    watcher_bus = Bus(node1, source="ct-elect-watcher").start()
    watcher = Watcher(watcher_bus, queue=queue)
    domain = uuid.uuid4()
    event = DomainStarted(
        domain_id=domain,
        name="elect",
        host="h",
        seq=1,
        state=PowerState.RUNNING,
        detail=StartedDetail.BOOTED,
    )
    try:
        cluster.nodes[2].ctl("stop_app")
        cluster.kill(0)
        # No majority: the queue has no leader, the publish is refused (nacked, or at load
        # ~28 not even answered within 30 s).
        with pytest.raises((PublishNacked, ConnectionLost)):
            publisher.publish_event(event, timeout=30)
        cluster.nodes[2].ctl("start_app", timeout=60)
        t0 = time.monotonic()
        refusals = 0
        confirmed_after = None
        while time.monotonic() - t0 < 20:
            try:
                publisher.publish_event(event, timeout=10)
            except (PublishNacked, ConnectionLost):  # refused, or cut by a channel replaced
                refusals += 1
                time.sleep(0.2)
                continue
            confirmed_after = time.monotonic() - t0
            break
        print(f"\nconfirmed {confirmed_after} s after node 2 was back; {refusals} refusals")
        assert confirmed_after is not None, f"still refused after 20 s ({refusals} refusals)"
        deadline = time.monotonic() + 10
        while watcher.count(domain) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watcher.seqs[domain][:1] == [1]
    finally:
        publisher.close()
        watcher.subscription.close()
        watcher_bus.close()
        # Node 0 back (the queues' members are not waited for: after this sequence one
        # member of each stayed offline for minutes in two runs out of three at load 17-28).
        cluster.restart(0, timeout=180)
        assert len(cluster.running_nodes()) == 3
