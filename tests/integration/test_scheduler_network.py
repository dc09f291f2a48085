"""The scheduler against the real network service (`services.network`) on a real broker, with
in-process compute nodes on FakeDriver: a domain with a NIC gets a port the network service
allocated (MAC and address in the host's DomainInfo), bound to the host that took it
(`port.bound` names the host); a domain no host takes has its port released (`port.deleted`).

Skipped only while `services.network` is not importable (it comes with the network service's
branch); the names used here are that service's (NetworkServer, NetworkConfig,
CreateNetwork)."""

from __future__ import annotations

import importlib
import importlib.util
import queue as queues
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest

from protos import routing
from protos.base import Message
from protos.codec import Envelope
from protos.commands import GetDomainInfo
from protos.domain import NicSpec
from protos.network import PortBound, PortDeleted
from protos.replies import DomainInfo
from protos.scheduler import Placement, ScheduleDomain
from services.bus import Bus, RemoteError
from tests.integration import test_scheduler as scheduler_tests
from tests.integration.conftest import MakeBus
from tests.integration.test_scheduler import StartNodes, StartScheduler, spec

pytestmark = pytest.mark.integration

if importlib.util.find_spec("services.network") is None:
    pytest.skip("services.network (the network service) is not here yet", allow_module_level=True)

# The scheduler tests' fixtures: compute nodes on FakeDriver, a scheduler replica.
start_nodes = scheduler_tests.start_nodes
start_scheduler = scheduler_tests.start_scheduler


@pytest.fixture
def network_service(amqp_url: str, tmp_path: Path) -> Iterator[Any]:
    config_module: Any = importlib.import_module("services.network.config")
    service_module: Any = importlib.import_module("services.network.service")
    server = service_module.NetworkServer(
        config_module.NetworkConfig(
            amqp_url=amqp_url,
            database_url=f"sqlite:///{tmp_path / 'network.db'}",
            replica=f"net-{uuid.uuid4().hex[:6]}",
        )
    ).start()
    yield server
    server.stop()


def create_network(bus: Bus, name: str) -> None:
    protos_network: Any = importlib.import_module("protos.network")
    command = protos_network.CreateNetwork(
        network_id=uuid.uuid4(),
        project="p",
        name=name,
        mode="isolated",
        subnet=IPv4Network("10.123.0.0/24"),
    )
    bus.call(routing.NETWORK_QUEUE, command, timeout=20)


def test_ports_from_the_network_service_are_defined_bound_and_released(
    network_service: Any,
    start_nodes: StartNodes,
    start_scheduler: StartScheduler,
    make_bus: MakeBus,
) -> None:
    hosts = start_nodes(1, vcpus=2, memory_mib=1024)
    host = next(iter(hosts))
    start_scheduler(1)
    bus = make_bus()
    events: queues.Queue[Message] = queues.Queue()

    def heard(_envelope: Envelope, event: Message) -> None:
        events.put(event)

    subscription = bus.subscribe(["port.bound.*", "port.deleted.*"], heard)
    create_network(bus, "blue")
    domain = spec().model_copy(update={"nics": [NicSpec(network="blue")]})
    placed = bus.call(routing.SCHEDULER_QUEUE, ScheduleDomain(spec=domain, project="p"), timeout=60)
    assert isinstance(placed, Placement)
    assert placed.host == host
    info = bus.call(routing.compute_queue(host), GetDomainInfo(domain_id=domain.uuid), timeout=20)
    assert isinstance(info, DomainInfo)
    (nic,) = info.interfaces
    assert nic.network == "blue"
    assert nic.ipv4 is not None
    assert nic.ipv4 in IPv4Network("10.123.0.0/24")
    bound = events.get(timeout=20)
    assert isinstance(bound, PortBound)
    assert (bound.port_id, bound.host, bound.mac) == (nic.port_id, host, nic.mac)

    # Too big for any host: the port allocated for it goes back.
    huge = spec(vcpus=64).model_copy(update={"nics": [NicSpec(network="blue")]})
    with pytest.raises(RemoteError) as raised:
        bus.call(routing.SCHEDULER_QUEUE, ScheduleDomain(spec=huge, project="p"), timeout=60)
    assert raised.value.code == "no_valid_host"
    deleted = events.get(timeout=20)
    assert isinstance(deleted, PortDeleted)
    assert deleted.domain_id == huge.uuid
    subscription.close()
