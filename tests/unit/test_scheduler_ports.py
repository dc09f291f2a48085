"""The scheduler's side of ports, without a broker: AllocatePorts before any host is asked,
the ports in DefineDomain (the same ones on a retry elsewhere), BindPorts with each asked
host's VXLAN address from its heartbeat beside its define and start, ReleasePorts when
placement fails, and the network service's refusals or absence as the caller's answer with
no host asked."""

from __future__ import annotations

import threading
import time
import uuid
from ipaddress import IPv4Address, IPv4Interface

import pytest

from protos.base import Message
from protos.bindings import NetworkBinding, PortBinding
from protos.commands import Command, DefineDomain
from protos.domain import NicSpec
from protos.network import AllocatePorts, BindPorts, PortBindings, ReleasePorts
from protos.replies import Done
from protos.scheduler import ScheduleDomain
from services.bus import NoRouteError, RemoteError, ServiceError
from services.scheduler.service import SchedulerService
from tests.unit.scheduler_fakes import FakeComputes, Sent, route, schedule, service, spec

NET = NetworkBinding(
    network_id=uuid.UUID(int=1),
    name="blue",
    mode="nat",
    mtu=1450,
    gateway=IPv4Interface("10.30.0.1/24"),
    vni=77,
)


class FakeNetwork:
    """The network service behind the scheduler's `call` (queue `network`), idempotent by
    domain like the real one; `refuse` answers every command with that error code."""

    def __init__(self) -> None:
        self.calls: list[Command] = []
        self.allocated: dict[uuid.UUID, list[PortBinding]] = {}
        self.refuse: str | None = None
        self.absent = False

    def __call__(self, command: Command) -> Message:
        if self.absent:
            raise NoRouteError("flotilla.commands", "network")
        self.calls.append(command)
        if self.refuse:
            raise RemoteError(self.refuse, f"network says {self.refuse}", {"field": "nics.0"})
        if isinstance(command, AllocatePorts):
            ports = self.allocated.setdefault(
                command.domain_id,
                [
                    PortBinding(
                        port_id=uuid.uuid4(),
                        network=NET,
                        mac=f"52:54:00:00:30:{i + 2:02x}",
                        ipv4=IPv4Address(f"10.30.0.{i + 2}"),
                    )
                    for i, _ in enumerate(command.nics)
                ],
            )
            return PortBindings(ports=ports)
        if isinstance(command, ReleasePorts):
            self.allocated.pop(command.domain_id, None)
        return Done()


def wired(computes: FakeComputes, network: FakeNetwork, **config: object) -> SchedulerService:
    svc = service(computes, **config)

    route(svc, computes, lambda sent: network(sent.command) if sent.queue == "network" else None)
    # Each host says where its VXLAN endpoint is.
    for beat in computes.heartbeats():
        vtep = IPv4Address(f"192.0.2.{ord(beat.host[0]) - ord('a') + 1}")
        inventory = beat.inventory.model_copy(update={"vtep": vtep})
        svc.state.on_heartbeat(
            beat.model_copy(update={"inventory": inventory}),
            sent_at=time.time(),
            now=time.monotonic(),
        )
    return svc


def with_nics(n: int = 1) -> ScheduleDomain:
    s = spec().model_copy(update={"nics": [NicSpec(network="blue") for _ in range(n)]})
    return ScheduleDomain(spec=s, project="p")


def test_ports_are_allocated_first_defined_with_the_domain_and_bound_to_its_host() -> None:
    computes, network = FakeComputes({"a": (4, 4096), "b": (4, 2048)}), FakeNetwork()
    svc = wired(computes, network, top_n=1)
    cmd = with_nics(2)
    placement = schedule(svc, cmd)
    assert placement.host == "a"
    allocate, bind = network.calls
    assert isinstance(allocate, AllocatePorts)
    assert (allocate.domain_id, allocate.project, allocate.nics) == (
        cmd.spec.uuid,
        "p",
        cmd.spec.nics,
    )
    assert bind == BindPorts(domain_id=cmd.spec.uuid, host="a", vtep=IPv4Address("192.0.2.1"))
    defines = [c for c in computes.commands if isinstance(c, DefineDomain)]
    assert [list(d.ports) for d in defines] == [network.allocated[cmd.spec.uuid]]


def test_a_retry_on_another_host_gets_the_same_ports() -> None:
    computes, network = FakeComputes({"a": (4, 8192), "b": (4, 4096)}), FakeNetwork()
    computes.refuse = {"a": "spawn_failed"}
    svc = wired(computes, network, top_n=1)
    cmd = with_nics()
    placement = schedule(svc, cmd)
    assert placement.host == "b"
    defines = [c for c in computes.commands if isinstance(c, DefineDomain)]
    assert len(defines) == 2
    assert defines[0].ports == defines[1].ports == network.allocated[cmd.spec.uuid]
    # Bound to each host as it was asked: the last binding, b's, is where they live.
    assert network.calls[1:] == [
        BindPorts(domain_id=cmd.spec.uuid, host="a", vtep=IPv4Address("192.0.2.1")),
        BindPorts(domain_id=cmd.spec.uuid, host="b", vtep=IPv4Address("192.0.2.2")),
    ]


def test_ports_are_released_when_no_host_takes_the_domain() -> None:
    computes, network = FakeComputes({"a": (4, 8192)}), FakeNetwork()
    computes.refuse = {"a": "no_capacity"}
    svc = wired(computes, network)
    cmd = with_nics()
    with pytest.raises(ServiceError) as raised:
        schedule(svc, cmd)
    assert raised.value.code == "no_valid_host"
    assert [type(c) for c in network.calls] == [AllocatePorts, BindPorts, ReleasePorts]
    assert network.allocated == {}


@pytest.mark.parametrize("code", ["invalid", "not_found", "conflict"])
def test_a_refusal_of_the_network_service_is_the_answer_and_no_host_is_asked(code: str) -> None:
    computes, network = FakeComputes({"a": (4, 8192)}), FakeNetwork()
    network.refuse = code
    with pytest.raises(ServiceError) as raised:
        schedule(wired(computes, network), with_nics())
    assert (raised.value.code, raised.value.details) == (code, {"field": "nics.0"})
    assert computes.calls == []


def test_without_a_network_service_nics_are_unavailable_and_no_host_is_asked() -> None:
    computes, network = FakeComputes({"a": (4, 8192)}), FakeNetwork()
    network.absent = True
    with pytest.raises(ServiceError) as raised:
        schedule(wired(computes, network), with_nics())
    assert raised.value.code == "unavailable"
    assert "network service" in raised.value.message
    assert computes.calls == []


def test_a_domain_without_nics_never_asks_the_network_service() -> None:
    computes, network = FakeComputes({"a": (4, 8192)}), FakeNetwork()
    network.absent = True
    placement = schedule(wired(computes, network), ScheduleDomain(spec=spec(), project="p"))
    assert placement.host == "a"


def test_the_ports_are_bound_while_the_host_defines_and_starts_the_domain() -> None:
    """BindPorts goes out beside the define (its `port.bound` gives the other hosts their
    forwarding entries while the guest starts), and the placement waits for its answer."""
    computes, network = FakeComputes({"a": (4, 8192)}), FakeNetwork()
    svc = wired(computes, network)
    seen: list[str] = []
    both = threading.Barrier(2, timeout=5)

    def hook(sent: Sent) -> Message | None:
        if isinstance(sent.command, (BindPorts, DefineDomain)):
            seen.append(type(sent.command).__name__)
            both.wait()  # each waits for the other: they run at once, or this breaks
        return network(sent.command) if sent.queue == "network" else None

    route(svc, computes, hook)
    placement = schedule(svc, with_nics())
    assert placement.host == "a"
    assert sorted(seen) == ["BindPorts", "DefineDomain"]
