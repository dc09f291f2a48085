"""deploy/rabbitmq/definitions.json loads into a real broker and its users are least-privilege:
a compute node runs as `flotilla-compute` and the network service as `flotilla-network` in vhost
`flotilla`, and neither user can consume the scheduler's queue."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pika
import pika.exceptions
import pytest

from compute_node.config import ComputeConfig
from compute_node.fake import FakeDriver
from compute_node.networks import LEGACY_PORT_PATTERNS, ports_queue
from compute_node.node import ComputeNode
from protos import routing
from protos.commands import DefineDomain
from protos.domain import BootSpec, DomainSpec, NicSpec
from protos.network import (
    AllocatePorts,
    BoundPorts,
    CreateNetwork,
    ListBoundPorts,
    NetworkInfo,
    PortBindings,
)
from protos.replies import DomainInfo
from services.broker import PrivateBroker
from services.bus import Bus
from services.network.config import NetworkConfig
from services.network.service import NetworkServer
from tests.bootfiles import BOOT_DIR, KERNEL

DEFINITIONS = Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq" / "definitions.json"


@pytest.fixture(scope="module")
def node_with_definitions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBroker]:
    # A node of its own: the definitions add a vhost and users, which the shared one need not see.
    node = PrivateBroker(tmp_path_factory.mktemp("rmq-deploy"), name="flotilla-deploy")
    try:
        node.start()
    except Exception as exc:  # same failure mode as the shared broker fixture
        node.stop()
        pytest.fail(f"private rabbitmq-server node failed: {exc}")
    node.ctl("import_definitions", str(DEFINITIONS))
    for user in ("flotilla-compute", "flotilla-scheduler", "flotilla-api", "flotilla-network"):
        node.ctl("change_password", user, f"pw-{user}")
    yield node
    node.stop()


def url(node: PrivateBroker, user: str) -> str:
    return f"amqp://{user}:pw-{user}@127.0.0.1:{node.port}/flotilla"


def test_definitions_are_valid_json_with_every_service_user() -> None:
    data = json.loads(DEFINITIONS.read_text())
    users = {u["name"] for u in data["users"]}
    assert {"flotilla-api", "flotilla-scheduler", "flotilla-compute", "flotilla-network"} <= users
    assert {q["name"] for q in data["queues"]} >= {"flotilla.dead", "scheduler"}


def test_compute_node_runs_as_its_own_user(
    node_with_definitions: PrivateBroker, tmp_path: Path
) -> None:
    node = node_with_definitions
    host = f"deploy-{uuid.uuid4().hex[:6]}"
    config = ComputeConfig(
        host=host,
        state_dir=tmp_path,
        amqp_url=url(node, "flotilla-compute"),
        driver="fake",
        allowed_boot_dirs=[BOOT_DIR],
    )
    compute = ComputeNode(config, FakeDriver()).start()
    try:
        # The scheduler's user may send commands to it.
        with Bus(url(node, "flotilla-scheduler"), source="scheduler") as bus:
            spec = DomainSpec(name="d1", boot=BootSpec(kernel=KERNEL))
            reply = bus.call(compute.queue, DefineDomain(spec=spec), timeout=10)
            assert isinstance(reply, DomainInfo)
    finally:
        compute.stop()


def test_compute_user_cannot_read_the_scheduler_queue(
    node_with_definitions: PrivateBroker,
) -> None:
    conn = pika.BlockingConnection(
        pika.URLParameters(url(node_with_definitions, "flotilla-compute"))
    )
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
            conn.channel().basic_get("scheduler")
        assert err.value.reply_code == 403
    finally:
        if conn.is_open:
            conn.close()


def test_network_service_runs_as_its_own_user(
    node_with_definitions: PrivateBroker, tmp_path: Path
) -> None:
    """Its user may consume `network`, answer and publish events; the scheduler's and the
    API's users may call it; events reach a subscriber."""
    node = node_with_definitions
    network = NetworkServer(
        NetworkConfig(
            amqp_url=url(node, "flotilla-network"),
            database_url=f"sqlite:///{tmp_path / 'catalog.db'}",
        )
    ).start()
    try:
        with Bus(url(node, "flotilla-api"), source="api") as api:
            seen: list[str] = []
            sub = api.subscribe(["network.#", "port.#"], lambda env, _e: seen.append(env.type))
            created = api.call(
                routing.NETWORK_QUEUE,
                CreateNetwork(
                    network_id=uuid.uuid4(),
                    project="p",
                    name="n",
                    subnet=IPv4Network("10.70.0.0/24"),
                ),
                timeout=10,
            )
            assert isinstance(created, NetworkInfo)
            with Bus(url(node, "flotilla-scheduler"), source="scheduler") as scheduler:
                reply = scheduler.call(
                    routing.NETWORK_QUEUE,
                    AllocatePorts(domain_id=uuid.uuid4(), project="p", nics=[NicSpec(network="n")]),
                    timeout=10,
                )
                assert isinstance(reply, PortBindings)
            # A compute node's user asks it for a network's bound ports (l2population).
            with Bus(url(node, "flotilla-compute"), source="compute:h1") as compute:
                bound = compute.call(
                    routing.NETWORK_QUEUE,
                    ListBoundPorts(network_ids=[created.network_id]),
                    timeout=10,
                )
                assert isinstance(bound, BoundPorts)
                assert bound.ports == []  # allocated, not bound yet
            deadline = time.monotonic() + 10
            while seen != ["network.created", "port.created"]:
                assert time.monotonic() < deadline, seen
                time.sleep(0.05)
            sub.close()
    finally:
        network.stop()


def test_network_user_cannot_read_the_scheduler_queue(
    node_with_definitions: PrivateBroker,
) -> None:
    conn = pika.BlockingConnection(
        pika.URLParameters(url(node_with_definitions, "flotilla-network"))
    )
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
            conn.channel().basic_get("scheduler")
        assert err.value.reply_code == 403
    finally:
        if conn.is_open:
            conn.close()


def test_compute_user_can_follow_port_events_on_its_own_queue(
    node_with_definitions: PrivateBroker,
) -> None:
    """l2population: a KVM compute node binds `compute.<host>.ports` to the events exchange
    by its networks' `netport.*.<network>` (reading flotilla.events), unbinds the older
    catch-all patterns, and consumes it."""
    host = f"deploy-{uuid.uuid4().hex[:6]}"
    with Bus(url(node_with_definitions, "flotilla-compute"), source=f"compute:{host}") as bus:
        subscription = bus.subscribe(
            LEGACY_PORT_PATTERNS, lambda _e, _m: None, queue=ports_queue(host)
        )
        try:
            subscription.rebind(
                [routing.network_ports_pattern(str(uuid.uuid4()))], unbind=LEGACY_PORT_PATTERNS
            )
            assert subscription.decl.name == f"compute.{host}.ports"
        finally:
            subscription.close()
