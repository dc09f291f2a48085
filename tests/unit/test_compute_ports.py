"""Ports on domains in the compute node, without a broker or netlink: DefineDomain's ports are
checked against the spec's NICs, kept with the definition (across a store reopen), handed to
the driver in order and shown in dominfo; a binding becomes the host's plumbing models with the
node's own settings; port events from other hosts are kept (replayed ones ignored)."""

from __future__ import annotations

import uuid
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pytest

from compute_node.net import HostPlumbing, NetworkMode, NetworkPlumbing, RemoteVtep
from compute_node.networks import HostNetworks, NetSettings, NetworkRefused
from compute_node.store import Store
from protos.bindings import NetworkBinding, PortBinding
from protos.codec import Envelope
from protos.commands import DefineDomain, StartDomain, UndefineDomain
from protos.domain import NicSpec
from protos.network import PortBound, PortDeleted
from protos.replies import ErrorReply
from tests.unit.test_compute_lifecycle import Node
from tests.unit.test_compute_lifecycle import spec as make_spec

NET = NetworkBinding(
    network_id=uuid.UUID(int=7),
    name="blue",
    mode="nat",
    mtu=1450,
    gateway=IPv4Interface("10.20.0.1/24"),
    vni=4242,
)
ENV = Envelope(type="t", body={}, source="test")


def port(n: int, network: NetworkBinding = NET) -> PortBinding:
    return PortBinding(
        port_id=uuid.UUID(int=100 + n),
        network=network,
        mac=f"52:54:00:00:01:{n:02x}",
        ipv4=IPv4Address(f"10.20.0.{n + 10}"),
    )


def test_ports_must_match_the_nics_one_to_one(tmp_path: Path) -> None:
    node = Node(tmp_path)
    spec = make_spec("web").model_copy(update={"nics": [NicSpec(network="blue")]})
    for ports in ([], [port(1), port(2)]):
        reply = node.do(DefineDomain(spec=spec, ports=ports))
        assert isinstance(reply, ErrorReply)
        assert (reply.code, reply.details["field"]) == ("invalid", "ports")
    other = NET.model_copy(update={"name": "red"})
    reply = node.do(DefineDomain(spec=spec, ports=[port(1, other)]))
    assert isinstance(reply, ErrorReply)
    assert reply.code == "invalid"
    assert node.store.get(spec.uuid) is None  # nothing half-defined


def test_ports_are_kept_handed_to_the_driver_and_shown(tmp_path: Path) -> None:
    node = Node(tmp_path)
    nics = [NicSpec(network="blue"), NicSpec(network="blue", mac="52:54:00:00:01:02")]
    spec = make_spec("web").model_copy(update={"nics": nics})
    info = node.ok(DefineDomain(spec=spec, ports=[port(1), port(2)]))
    assert [(i.mac, str(i.ipv4), i.network) for i in info.interfaces] == [
        ("52:54:00:00:01:01", "10.20.0.11", "blue"),
        ("52:54:00:00:01:02", "10.20.0.12", "blue"),
    ]
    node.ok(StartDomain(domain_id=spec.uuid))
    taps = node.driver.nics[spec.uuid]
    assert [t.mac for t in taps] == ["52:54:00:00:01:01", "52:54:00:00:01:02"]
    assert taps[0].tap == info.interfaces[0].tap != taps[1].tap
    # Kept with the definition: a restarted node (a new store on the same file) has them.
    node.store.close()
    reopened = Store(tmp_path / "compute.db", host="node-1", source="compute:node-1")
    record = reopened.get(spec.uuid)
    assert record is not None
    assert record.ports == (port(1), port(2))
    reopened.close()


def test_a_redefinition_with_the_same_ports_is_a_no_op(tmp_path: Path) -> None:
    node = Node(tmp_path)
    spec = make_spec("web").model_copy(update={"nics": [NicSpec(network="blue")]})
    node.ok(DefineDomain(spec=spec, ports=[port(1)]))
    node.events()
    node.ok(DefineDomain(spec=spec, ports=[port(1)]))
    assert node.events() == []
    node.ok(DefineDomain(spec=spec, ports=[port(3)]))
    assert [e[1] for e in node.events()] == ["updated"]
    node.do(UndefineDomain(domain_id=spec.uuid))
    assert node.store.get(spec.uuid) is None


def test_a_redefinition_without_ports_for_unchanged_nics_keeps_the_ports(tmp_path: Path) -> None:
    # What the API's attach-disk / detach-disk send: the spec with a disk more, no ports.
    node = Node(tmp_path)
    spec = make_spec("web").model_copy(update={"nics": [NicSpec(network="blue")]})
    node.ok(DefineDomain(spec=spec, ports=[port(1)]))
    node.events()
    redefined = spec.model_copy(update={"metadata": {"disk": "attached"}})
    info = node.ok(DefineDomain(spec=redefined))
    assert [i.port_id for i in info.interfaces] == [port(1).port_id]
    record = node.store.get(spec.uuid)
    assert record is not None
    assert record.ports == (port(1),)
    assert [e[1] for e in node.events()] == ["updated"]
    # Changed NICs need their ports: none given is still refused.
    two = spec.model_copy(update={"nics": [NicSpec(network="blue"), NicSpec(network="blue")]})
    reply = node.do(DefineDomain(spec=two))
    assert isinstance(reply, ErrorReply)
    assert (reply.code, reply.details["field"]) == ("invalid", "ports")


def test_a_binding_becomes_the_hosts_plumbing(tmp_path: Path) -> None:
    settings = NetSettings(uplink="eth0", underlay=IPv4Address("192.0.2.1"))
    network, plumbed = HostNetworks("h1", tmp_path, settings).plumbing(port(1))
    assert network.mode is NetworkMode.NAT
    assert (network.uplink, network.vni, network.mtu) == ("eth0", 4242, 1450)
    assert network.network_id == str(NET.network_id) == plumbed.network_id
    assert (plumbed.mac, str(plumbed.ipv4)) == ("52:54:00:00:01:01", "10.20.0.11")
    # Without an underlay the network stays on this host: no VXLAN.
    alone, _ = HostNetworks("h1", tmp_path, NetSettings(uplink="eth0")).plumbing(port(1))
    assert alone.vni is None
    # nat needs the host's uplink; a port with no address cannot be pinned down.
    with pytest.raises(NetworkRefused, match="net_uplink"):
        HostNetworks("h1", tmp_path, NetSettings()).plumbing(port(1))
    with pytest.raises(NetworkRefused, match="no IPv4"):
        HostNetworks("h1", tmp_path, settings).plumbing(port(1).model_copy(update={"ipv4": None}))


def bound(n: int, seq: int, host: str = "h2") -> PortBound:
    p = port(n)
    return PortBound(
        port_id=p.port_id,
        network_id=NET.network_id,
        project="p",
        mac=p.mac,
        ipv4=p.ipv4,
        vni=4242,
        seq=seq,
        host=host,
        vtep=IPv4Address("192.0.2.2"),
    )


def test_remote_ports_are_kept_across_restarts_and_replays_ignored(tmp_path: Path) -> None:
    networks = HostNetworks("h1", tmp_path, NetSettings(underlay=IPv4Address("192.0.2.1")))
    networks.on_port_event(ENV, bound(1, seq=2))
    networks.on_port_event(ENV, bound(2, seq=1, host="h1"))  # this host's own: no entry
    networks.on_port_event(ENV, bound(1, seq=1))  # older: ignored
    again = HostNetworks("h1", tmp_path, NetSettings(underlay=IPv4Address("192.0.2.1")))
    remotes = {k: r.vtep for k, r in again._remotes.items()}
    assert remotes[str(port(1).port_id)] == RemoteVtep(
        network_id=str(NET.network_id),
        mac="52:54:00:00:01:01",
        ipv4=IPv4Address("10.20.0.11"),
        remote=IPv4Address("192.0.2.2"),
    )
    assert remotes[str(port(2).port_id)] is None
    deleted = PortDeleted(
        port_id=port(1).port_id, network_id=NET.network_id, project="p", mac=port(1).mac, seq=3
    )
    again.on_port_event(ENV, deleted)
    again.on_port_event(ENV, bound(1, seq=2))  # a replayed `bound` after the delete
    assert again._remotes[str(port(1).port_id)].vtep is None


def test_an_answer_of_the_network_service_merges_with_events_by_seq(tmp_path: Path) -> None:
    """ListBoundPorts' answer: newer ports are taken, older ones ignored, a known port the
    answer lacks is forgotten only if it was recorded before the question was asked."""
    networks = HostNetworks("h1", tmp_path, NetSettings(underlay=IPv4Address("192.0.2.1")))
    networks.on_port_event(ENV, bound(1, seq=3))  # known before the question
    asked = networks.tick
    networks.on_port_event(ENV, bound(2, seq=2))  # heard after it was asked
    networks.learn([str(NET.network_id)], [bound(1, seq=2), bound(3, seq=2)], asked).result()
    vteps = {k: r.vtep for k, r in networks._remotes.items()}
    # port 1: the answer's seq 2 is older than the event's 3, and it was in the answer;
    # port 3: learned from the answer alone; port 2: not in the answer, but newer than it.
    assert vteps[str(port(1).port_id)] is not None
    assert vteps[str(port(3).port_id)] is not None
    assert vteps[str(port(2).port_id)] is not None
    # Asked again later, the service knows port 3 only: 1 and 2 were released meanwhile.
    networks.learn([str(NET.network_id)], [bound(3, seq=2)], networks.tick).result()
    vteps = {k: r.vtep for k, r in networks._remotes.items()}
    assert vteps[str(port(1).port_id)] is None
    assert vteps[str(port(2).port_id)] is None
    assert vteps[str(port(3).port_id)] is not None
    # Another network's ports are not touched by an answer about this one.
    networks.learn([str(uuid.uuid4())], [], networks.tick).result()
    assert networks._remotes[str(port(3).port_id)].vtep is not None


class _RecordingPlumber:
    """What HostNetworks asks of the kernel's forwarding entries, recorded (the plumber
    itself is tested against netlink in tests/integration/test_net_plumbing.py)."""

    def __init__(self, network: NetworkPlumbing) -> None:
        self.desired = HostPlumbing(networks=(network,), ports=(), remotes=())
        self.calls: list[tuple[str, str]] = []

    def fdb_add(self, remote: RemoteVtep) -> None:
        self.calls.append(("add", remote.mac))

    def fdb_del(self, remote: RemoteVtep) -> None:
        self.calls.append(("del", remote.mac))


def test_a_port_missed_as_deleted_does_not_take_its_successors_entries(tmp_path: Path) -> None:
    """A port deleted while this host did not hear it, found gone by an answer, shares its
    MAC and address with the port that took its place: the entries stay."""
    settings = NetSettings(uplink="eth0", underlay=IPv4Address("192.0.2.1"))
    networks = HostNetworks("h1", tmp_path, settings)
    network, _ = networks.plumbing(port(1))
    plumber = _RecordingPlumber(network)
    networks._plumber = plumber  # type: ignore[assignment]
    old = bound(1, seq=2)
    networks.on_port_event(ENV, old)
    successor = bound(1, seq=2).model_copy(update={"port_id": uuid.uuid4()})
    networks.on_port_event(ENV, successor)
    assert plumber.calls == [("add", old.mac), ("add", old.mac)]
    networks.learn([str(NET.network_id)], [successor], networks.tick).result()
    assert networks._remotes[str(old.port_id)].vtep is None
    assert ("del", old.mac) not in plumber.calls
