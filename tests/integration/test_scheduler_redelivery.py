"""Two scheduler replicas on a real broker: the first dies while its compute call is held, the
broker redelivers the ScheduleDomain to the second, and the domain still lands on one host."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pika
import pytest

from compute_node.boot_sources import BootFiles
from compute_node.config import ComputeConfig
from compute_node.driver import NicTap, RuntimeInfo
from compute_node.fake import FakeDriver
from compute_node.node import ComputeNode
from protos import routing
from protos.domain import DomainSpec
from protos.scheduler import Placement, ScheduleDomain
from services.bus import Bus
from services.scheduler import Scheduler, SchedulerConfig
from tests.bootfiles import BOOT_DIR
from tests.integration.test_scheduler import spec
from tests.tcp_relay import TcpRelay

pytestmark = pytest.mark.integration

HEARTBEAT_S = 0.3


class HeldDriver(FakeDriver):
    """A FakeDriver whose spawns wait for `go` (and say they are waiting in `entered`)."""

    def __init__(self, vcpus: int, memory_mib: int) -> None:
        super().__init__(vcpus, memory_mib)
        self.entered = threading.Event()
        self.go = threading.Event()
        self.spawned: list[uuid.UUID] = []

    def spawn(
        self,
        spec: DomainSpec,
        files: BootFiles,
        *,
        paused: bool = False,
        nics: Sequence[NicTap] = (),
    ) -> RuntimeInfo:
        self.entered.set()
        assert self.go.wait(30)
        self.spawned.append(spec.uuid)
        return super().spawn(spec, files, paused=paused, nics=nics)


def let_go(nodes: dict[str, ComputeNode]) -> None:
    """Every held spawn goes on."""
    for node in nodes.values():
        assert isinstance(node.driver, HeldDriver)
        node.driver.go.set()


@pytest.fixture
def nodes(amqp_url: str, tmp_path: Path) -> Iterator[dict[str, ComputeNode]]:
    """Two compute nodes: spread prefers the roomier first; with the first replica's claim
    of 1 GiB counted there, a replica deciding afresh prefers the second."""
    tag = uuid.uuid4().hex[:6]
    made: dict[str, ComputeNode] = {}
    for i, memory_mib in enumerate((2048, 1536)):
        host = f"redeliver-{tag}-{i}"
        config = ComputeConfig(
            host=host,
            state_dir=tmp_path / host,
            amqp_url=amqp_url,
            driver="fake",
            allowed_boot_dirs=[BOOT_DIR],
            cpu_allocation_ratio=1.0,
            reserved_host_memory_mib=0,
            heartbeat_interval_s=HEARTBEAT_S,
        )
        made[host] = ComputeNode(config, HeldDriver(4, memory_mib)).start()
    yield made
    let_go(made)
    for node in made.values():
        node.stop()


@pytest.fixture
def replica_process(
    amqp_url: str, tmp_path: Path
) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """`start()`: a scheduler replica in a process of its own (so the test can kill it)."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "services.scheduler.main", "--amqp-url", amqp_url]
        argv += ["--replica", f"first-{uuid.uuid4().hex[:6]}", "--top-n", "1", "--workers", "1"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOTILLA_")}
        with (tmp_path / "first-replica.log").open("wb") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def schedule_in_background(
    bus: Bus, domain: DomainSpec
) -> tuple[threading.Thread, list[Placement | BaseException]]:
    """A ScheduleDomain for `domain` on a thread of its own; its reply (or error) lands in
    the list once the thread ends."""
    replies: list[Placement | BaseException] = []

    def request() -> None:
        cmd = ScheduleDomain(spec=domain, project="p")
        try:
            reply = bus.call(routing.SCHEDULER_QUEUE, cmd, timeout=60)
            assert isinstance(reply, Placement)
            replies.append(reply)
        except BaseException as exc:
            replies.append(exc)

    caller = threading.Thread(target=request)
    caller.start()
    return caller, replies


def consumers(amqp_url: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ok = connection.channel().queue_declare(routing.SCHEDULER_QUEUE, passive=True)
        return int(ok.method.consumer_count)
    finally:
        connection.close()


def test_a_redelivered_request_is_placed_on_the_dead_replicas_host(
    amqp_url: str,
    make_bus: Callable[..., Bus],
    nodes: dict[str, ComputeNode],
    replica_process: Callable[[], subprocess.Popen[bytes]],
) -> None:
    first_host, _ = list(nodes)
    # The second replica follows the cluster and its peers' claims, but takes no request yet.
    second = Scheduler(SchedulerConfig(amqp_url=amqp_url, replica="second", top_n=1)).listen()
    try:
        second.wait_for_hosts(2)
        first = replica_process()
        deadline = time.monotonic() + 30
        while consumers(amqp_url) < 1:
            assert first.poll() is None, "the first replica exited"
            assert time.monotonic() < deadline, "the first replica never served"
            time.sleep(0.1)
        time.sleep(4 * HEARTBEAT_S)  # it has heard from both hosts

        domain = spec(memory_mib=1024)
        caller, replies = schedule_in_background(make_bus(), domain)
        held = nodes[first_host].driver
        assert isinstance(held, HeldDriver)
        assert held.entered.wait(30), "the first replica did not start the domain"

        first.send_signal(signal.SIGKILL)  # dies while the host is still starting it
        first.wait(10)
        second.serve()  # the broker redelivers the unacked request to it
        time.sleep(1.0)
        let_go(nodes)
        caller.join(60)

        (reply,) = replies
        assert isinstance(reply, Placement), reply
        assert reply.host == first_host
        holding = [host for host, node in nodes.items() if node.store.get(domain.uuid)]
        assert holding == [first_host]
    finally:
        second.stop()


def test_a_replica_cut_off_from_the_broker_mid_call_leaves_the_request_for_redelivery(
    amqp_url: str,
    make_bus: Callable[..., Bus],
    nodes: dict[str, ComputeNode],
) -> None:
    """The only replica reaches the broker through a relay, which is cut while the chosen
    host is still starting the domain: the replica's call fails on its own lost connection.
    That is no answer from the host: nothing is destroyed there and no other host is asked;
    the request goes back to the broker, and once the replica is back its redelivered copy
    replays the same commands to the same host and answers with that host's placement."""
    first_host, other_host = list(nodes)
    relay, relayed_url = TcpRelay.for_url(amqp_url)
    replica = Scheduler(SchedulerConfig(amqp_url=relayed_url, replica="relayed", top_n=1))
    try:
        replica.start()
        replica.wait_for_hosts(2)
        time.sleep(4 * HEARTBEAT_S)  # it has heard from both hosts
        domain = spec(memory_mib=1024)
        caller, replies = schedule_in_background(make_bus(), domain)
        held = nodes[first_host].driver
        assert isinstance(held, HeldDriver)
        assert held.entered.wait(30), "the replica did not start the domain"
        relay.cut()  # while it waits for the start's answer
        time.sleep(1.5)  # its resend finds no broker: the call fails on the replica's side
        let_go(nodes)
        relay.restore()
        caller.join(60)

        (reply,) = replies
        assert isinstance(reply, Placement), reply
        assert reply.host == first_host
        assert reply.info.state.value == "running"
        holding = [host for host, node in nodes.items() if node.store.get(domain.uuid)]
        assert holding == [first_host]
        assert held.spawned == [domain.uuid]  # started once
        other = nodes[other_host].driver
        assert isinstance(other, HeldDriver)
        assert other.spawned == []
    finally:
        replica.stop()
        relay.close()
