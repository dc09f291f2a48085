"""The network service's handlers on a real SQLite catalog (no broker): IPAM (exhaustion,
quarantine, fixed addresses), ports idempotent by domain and by message id, bad input refused
with the field and nothing half-written, projects kept apart, events in the outbox."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from protos.codec import decode, envelope_for
from protos.commands import Command
from protos.domain import NicSpec
from protos.network import (
    AllocatePorts,
    BindPorts,
    CreateNetwork,
    DeleteNetwork,
    GetNetwork,
    GetPort,
    ListBoundPorts,
    ListDhcpLeases,
    ListNetworks,
    ListPorts,
    NetworkInfo,
    ReleasePorts,
)
from services.bus import Context, ServiceError
from services.db import Database, schema_drift, upgrade
from services.network.config import DefaultNetwork, NetworkConfig, NetworkQuota
from services.network.ipam import Pool
from services.network.service import NetworkService
from services.network.tables import CATALOG, addresses, networks, outbox, ports


def ctx(command: Command) -> Context:
    return Context(envelope_for(command, source="test", correlation_id="req-1"))


class Net:
    def __init__(self, service: NetworkService) -> None:
        self.service = service

    def create(self, name: str = "n1", subnet: str = "10.0.0.0/24", **kw: Any) -> NetworkInfo:
        cmd = CreateNetwork(
            network_id=uuid.uuid4(),
            project=kw.pop("project", "alice"),
            name=name,
            subnet=IPv4Network(subnet) if subnet else None,
            **kw,
        )
        return self.service.create_network(cmd, ctx(cmd))

    def allocate(self, *nics: NicSpec, project: str = "alice", domain: uuid.UUID | None = None):  # type: ignore[no-untyped-def]
        cmd = AllocatePorts(domain_id=domain or uuid.uuid4(), project=project, nics=list(nics))
        return cmd, self.service.allocate_ports(cmd, ctx(cmd))

    def rows(self, table: sa.Table) -> list[Any]:
        with self.service.db.transaction() as conn:
            return list(conn.execute(sa.select(table)).mappings())

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        found = []
        for row in self.rows(outbox):
            env = decode(bytes(row["envelope"]))
            found.append((row["routing_key"], env.body))
        return found


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    config = NetworkConfig(
        database_url=f"sqlite:///{tmp_path / 'catalog.db'}",
        quarantine_s=300.0,
        quotas={"tiny": NetworkQuota(networks=1, ports=2)},
    )
    db = Database(config.database_url)
    upgrade(db, CATALOG)
    yield Net(NetworkService(config, db, "network:test"))
    db.close()


def test_migrations_match_the_tables(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    upgrade(db, CATALOG)
    with db.transaction() as conn:
        assert schema_drift(conn, CATALOG) == []
    db.close()


def test_pool_skips_network_broadcast_and_gateway() -> None:
    pool = Pool("n", IPv4Network("10.0.0.0/29"), IPv4Address("10.0.0.1"))
    assert pool.first_free(set()) == IPv4Address("10.0.0.2")
    taken = {IPv4Address(f"10.0.0.{i}") for i in range(2, 7)}
    assert pool.first_free(taken) is None  # .7 is the broadcast


def test_create_network_defaults_gateway_mtu_and_a_unique_vni(net: Net) -> None:
    a = net.create("a", "10.0.0.0/24")
    b = net.create("b", "10.0.1.0/24")
    assert a.gateway == IPv4Address("10.0.0.1")
    assert a.mtu == 1450  # the 1500 underlay less VXLAN's 50
    assert a.vni is not None
    assert b.vni is not None
    assert a.vni != b.vni
    assert [k for k, _ in net.events()] == [
        f"network.created.{a.network_id}",
        f"network.created.{b.network_id}",
    ]
    assert net.events()[0][1]["seq"] == 1


def test_a_retried_create_returns_the_same_network(net: Net) -> None:
    cmd = CreateNetwork(
        network_id=uuid.uuid4(), project="alice", name="n", subnet=IPv4Network("10.0.0.0/24")
    )
    first = net.service.create_network(cmd, ctx(cmd))
    # A new message (the API retrying) with the same network id: the same network, one event.
    again = net.service.create_network(cmd, ctx(cmd))
    assert again.network_id == first.network_id
    assert again.vni == first.vni
    assert len(net.events()) == 1


def test_a_redelivered_command_executes_once(net: Net) -> None:
    cmd = AllocatePorts(domain_id=uuid.uuid4(), project="alice", nics=[NicSpec(network="n1")])
    net.create()
    context = ctx(cmd)
    first = net.service.allocate_ports(cmd, context)
    second = net.service.allocate_ports(cmd, context)
    assert first == second
    assert len(net.rows(ports)) == 1


@pytest.mark.parametrize(
    ("kw", "field", "words"),
    [
        ({"subnet": "10.0.0.0/31"}, "subnet", "too small"),
        ({"subnet": "127.0.0.0/24"}, "subnet", "loopback"),
        ({"subnet": "169.254.1.0/24"}, "subnet", "link-local"),
        ({"subnet": "224.0.0.0/24"}, "subnet", "multicast"),
        ({"subnet": ""}, "subnet", "needs a subnet"),
        ({"gateway": IPv4Address("10.9.0.1")}, "gateway", "not a host address"),
        ({"gateway": IPv4Address("10.0.0.255")}, "gateway", "not a host address"),
        ({"mtu": 1500}, "mtu", "above 1450"),
        ({"host_bridge": "br0"}, "host_bridge", "only a bridge-mode"),
        ({"mode": "bridge", "dhcp": False}, "host_bridge", "names an existing"),
        ({"mode": "bridge", "host_bridge": "br0", "dhcp": False}, "subnet", "host LAN"),
    ],
)
def test_bad_networks_are_refused_with_the_field(
    net: Net, kw: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(ServiceError) as refused:
        net.create(**kw)
    assert refused.value.code == "invalid"
    assert refused.value.details["field"] == field
    assert words in refused.value.message
    assert net.rows(networks) == []
    assert net.events() == []


def test_bridge_mode_network_has_no_subnet_vni_or_dhcp(net: Net) -> None:
    info = net.create("lan", "", mode="bridge", host_bridge="br0", dhcp=False)
    assert (info.subnet, info.vni, info.mtu, info.dhcp) == (None, None, 1500, False)
    _, bindings = net.allocate(NicSpec(network="lan"))
    assert bindings.ports[0].ipv4 is None
    assert bindings.ports[0].network.host_bridge == "br0"
    with pytest.raises(ServiceError, match="bridged") as refused:
        net.allocate(NicSpec(network="lan", ip=IPv4Address("10.0.0.5")))
    assert refused.value.details["field"] == "nics.0.ip"


def test_overlapping_subnets_are_refused_within_and_across_projects(net: Net) -> None:
    net.create("a", "10.0.0.0/24")
    with pytest.raises(ServiceError) as same:
        net.create("b", "10.0.0.128/25")
    assert same.value.code == "conflict"
    assert same.value.details == {"field": "subnet", "reason": "subnet_overlap"}
    assert "network 'a'" in same.value.message
    with pytest.raises(ServiceError) as other:
        net.create("c", "10.0.0.0/16", project="bob")
    assert other.value.details["reason"] == "subnet_overlap"
    assert "'a'" not in other.value.message  # another tenant's names are not told
    assert len(net.rows(networks)) == 1


def test_network_names_are_unique_per_project(net: Net) -> None:
    net.create("a", "10.0.0.0/24")
    with pytest.raises(ServiceError) as refused:
        net.create("a", "10.0.1.0/24")
    assert refused.value.details == {"field": "name", "reason": "name_in_use"}
    net.create("a", "10.0.2.0/24", project="bob")  # another project may use the name


def test_network_quota(net: Net) -> None:
    net.create("a", "10.0.0.0/24", project="tiny")
    with pytest.raises(ServiceError) as refused:
        net.create("b", "10.0.1.0/24", project="tiny")
    assert refused.value.code == "over_quota"
    assert refused.value.details["resource"] == "networks"


def test_port_quota_counts_every_nic_of_the_request(net: Net) -> None:
    net.create("a", "10.0.0.0/24", project="tiny")
    net.allocate(NicSpec(network="a"), project="tiny")
    with pytest.raises(ServiceError) as refused:
        net.allocate(NicSpec(network="a"), NicSpec(network="a"), project="tiny")
    assert refused.value.code == "over_quota"
    assert refused.value.details == {"resource": "ports", "limit": 2, "used": 1, "requested": 2}
    assert len(net.rows(ports)) == 1


def test_allocate_gives_addresses_macs_and_bindings(net: Net) -> None:
    info = net.create()
    cmd, bindings = net.allocate(NicSpec(network="n1"), NicSpec(network="n1"))
    a, b = bindings.ports
    assert (a.ipv4, b.ipv4) == (IPv4Address("10.0.0.2"), IPv4Address("10.0.0.3"))
    assert a.mac.startswith("52:54:00:")
    assert a.mac != b.mac
    assert a.network.network_id == info.network_id
    assert str(a.network.gateway) == "10.0.0.1/24"
    assert a.network.mtu == 1450
    assert a.network.vni == info.vni
    created = [body for key, body in net.events() if key.startswith("port.created.")]
    assert [(e["ipv4"], e["mac"], e["seq"]) for e in created] == [
        ("10.0.0.2", a.mac, 1),
        ("10.0.0.3", b.mac, 1),
    ]
    assert created[0]["domain_id"] == str(cmd.domain_id)


def test_allocate_is_idempotent_by_domain(net: Net) -> None:
    net.create()
    cmd, first = net.allocate(NicSpec(network="n1"))
    # A retry on another host: a new message for the same domain.
    _, again = net.allocate(NicSpec(network="n1"), domain=cmd.domain_id)
    assert again == first
    assert len(net.rows(ports)) == 1
    with pytest.raises(ServiceError) as refused:
        net.allocate(NicSpec(network="n1"), NicSpec(network="n1"), domain=cmd.domain_id)
    assert refused.value.details["reason"] == "domain_has_ports"


def test_fixed_address_and_mac_are_honoured_or_refused(net: Net) -> None:
    net.create()
    _, got = net.allocate(
        NicSpec(network="n1", mac="52:54:00:aa:bb:cc", ip=IPv4Address("10.0.0.50"))
    )
    assert (got.ports[0].mac, got.ports[0].ipv4) == ("52:54:00:aa:bb:cc", IPv4Address("10.0.0.50"))
    cases = [
        (NicSpec(network="n1", ip=IPv4Address("10.0.0.50")), "conflict", "ip_in_use", "ip"),
        (NicSpec(network="n1", mac="52:54:00:aa:bb:cc"), "conflict", "mac_in_use", "mac"),
        (NicSpec(network="n1", ip=IPv4Address("10.0.1.5")), "invalid", None, "ip"),
        (NicSpec(network="n1", ip=IPv4Address("10.0.0.1")), "invalid", None, "ip"),
        (NicSpec(network="n1", ip=IPv4Address("10.0.0.255")), "invalid", None, "ip"),
        (NicSpec(network="nope"), "invalid", None, "network"),
    ]
    for nic, code, reason, field in cases:
        with pytest.raises(ServiceError) as refused:
            # The first NIC is fine: a refusal of the second leaves nothing of the first.
            net.allocate(NicSpec(network="n1"), nic)
        assert refused.value.code == code, nic
        assert refused.value.details["field"] == f"nics.1.{field}"
        if reason:
            assert refused.value.details["reason"] == reason
    assert len(net.rows(ports)) == 1
    assert len(net.rows(addresses)) == 1


def test_a_network_of_another_project_is_not_usable_or_visible(net: Net) -> None:
    theirs = net.create("secret", "10.0.0.0/24", project="bob")
    with pytest.raises(ServiceError) as refused:
        net.allocate(NicSpec(network="secret"))
    assert refused.value.details["field"] == "nics.0.network"
    for command in (
        GetNetwork(network_id=theirs.network_id, project="alice"),
        DeleteNetwork(network_id=theirs.network_id, project="alice"),
        ListDhcpLeases(network_id=theirs.network_id, project="alice"),
        ListPorts(network_id=theirs.network_id, project="alice"),
    ):
        handler = {
            GetNetwork: net.service.get_network,
            DeleteNetwork: net.service.delete_network,
            ListDhcpLeases: net.service.dhcp_leases,
            ListPorts: net.service.list_ports,
        }[type(command)]
        with pytest.raises(ServiceError) as hidden:
            handler(command, ctx(command))  # type: ignore[operator]
        assert hidden.value.code == "not_found"
    assert net.service.list_networks(ListNetworks(project="alice"), None).networks == []
    assert len(net.service.list_networks(ListNetworks(project=None), None).networks) == 1
    _, bob = net.allocate(NicSpec(network="secret"), project="bob")
    port_id = bob.ports[0].port_id
    with pytest.raises(ServiceError, match="not found"):
        net.service.get_port(GetPort(port_id=port_id, project="alice"), None)
    assert net.service.list_ports(ListPorts(project="alice"), None).ports == []


def test_shared_network_is_used_by_all_and_deleted_only_by_an_admin(net: Net) -> None:
    default = net.service.ensure_default(DefaultNetwork(subnet=IPv4Network("192.168.122.0/24")))
    assert default.shared
    assert default.project == "admin"
    assert net.service.ensure_default(DefaultNetwork()).network_id == default.network_id
    _, a = net.allocate(NicSpec(network="default"), project="alice")
    _, b = net.allocate(NicSpec(network="default"), project="bob")
    assert a.ports[0].ipv4 != b.ports[0].ipv4
    alice_leases = net.service.dhcp_leases(
        ListDhcpLeases(network_id=default.network_id, project="alice"), None
    )
    assert [lease.ipv4 for lease in alice_leases.leases] == [a.ports[0].ipv4]  # not bob's
    with pytest.raises(ServiceError) as refused:
        net.service.delete_network(
            DeleteNetwork(network_id=default.network_id, project="alice"), None
        )
    assert refused.value.code == "forbidden"


def test_delete_refused_while_ports_exist(net: Net) -> None:
    info = net.create()
    cmd, _ = net.allocate(NicSpec(network="n1"))
    delete = DeleteNetwork(network_id=info.network_id, project="alice")
    with pytest.raises(ServiceError) as refused:
        net.service.delete_network(delete, ctx(delete))
    assert refused.value.code == "conflict"
    assert refused.value.details == {"reason": "has_ports", "ports": 1}
    release = ReleasePorts(domain_id=cmd.domain_id)
    net.service.release_ports(release, ctx(release))
    net.service.delete_network(delete, ctx(delete))
    assert net.rows(networks) == []
    assert net.rows(addresses) == []
    deleted = [b for k, b in net.events() if k.startswith("network.deleted.")]
    assert deleted[0]["seq"] == 2


def test_bind_and_release_emit_events_with_a_growing_seq(net: Net) -> None:
    net.create()
    cmd, bindings = net.allocate(NicSpec(network="n1"))
    port_id = bindings.ports[0].port_id
    bind = BindPorts(domain_id=cmd.domain_id, host="node-1", vtep=IPv4Address("172.16.0.1"))
    net.service.bind_ports(bind, ctx(bind))
    again = BindPorts(domain_id=cmd.domain_id, host="node-1", vtep=IPv4Address("172.16.0.1"))
    net.service.bind_ports(again, ctx(again))  # already there: no event
    moved = BindPorts(domain_id=cmd.domain_id, host="node-2", vtep=IPv4Address("172.16.0.2"))
    net.service.bind_ports(moved, ctx(moved))
    info = net.service.get_port(GetPort(port_id=port_id, project="alice"), None)
    assert (info.state, info.host) == ("bound", "node-2")
    release = ReleasePorts(domain_id=cmd.domain_id)
    net.service.release_ports(release, ctx(release))
    net.service.release_ports(ReleasePorts(domain_id=cmd.domain_id), None)  # nothing left: ok
    mine = [(k.split(".")[1], b) for k, b in net.events() if k.endswith(str(port_id))]
    assert [(kind, b["seq"]) for kind, b in mine] == [
        ("created", 1),
        ("bound", 2),
        ("bound", 3),
        ("deleted", 4),
    ]
    assert mine[1][1]["vtep"] == "172.16.0.1"
    assert mine[2][1]["host"] == "node-2"
    assert mine[3][1]["host"] == "node-2"
    with pytest.raises(ServiceError, match="no ports"):
        net.service.bind_ports(bind, None)


def test_bound_ports_of_networks_are_their_latest_bound_events(net: Net) -> None:
    """ListBoundPorts: what a compute node that missed events asks for, per network."""
    n1, n2 = net.create(), net.create("n2", "10.1.0.0/24")
    cmd, bindings = net.allocate(NicSpec(network="n1"))
    net.allocate(NicSpec(network="n1"))  # allocated, never bound: not there
    other, _ = net.allocate(NicSpec(network="n2"))
    for domain, host in ((cmd.domain_id, "node-1"), (other.domain_id, "node-2")):
        bind = BindPorts(domain_id=domain, host=host, vtep=IPv4Address("172.16.0.1"))
        net.service.bind_ports(bind, ctx(bind))
    ask = ListBoundPorts(network_ids=[n1.network_id, uuid.uuid4()])
    (found,) = net.service.bound_ports(ask, ctx(ask)).ports
    latest = [b for k, b in net.events() if k == f"port.bound.{bindings.ports[0].port_id}"]
    assert found.model_dump(mode="json") == latest[-1]
    assert (found.host, found.seq, found.vni) == ("node-1", 2, n1.vni)
    both = ListBoundPorts(network_ids=[n1.network_id, n2.network_id])
    assert len(net.service.bound_ports(both, None).ports) == 2
    assert net.service.bound_ports(ListBoundPorts(network_ids=[]), None).ports == []


def test_released_addresses_are_quarantined_then_reused_oldest_first(net: Net) -> None:
    net.create("small", "10.0.0.0/29")  # .2 to .6: five addresses
    domains = []
    for _ in range(5):
        cmd, _ = net.allocate(NicSpec(network="small"))
        domains.append(cmd.domain_id)
    with pytest.raises(ServiceError) as full:
        net.allocate(NicSpec(network="small"))
    assert full.value.code == "no_capacity"
    assert full.value.details["reason"] == "subnet_exhausted"
    # Release .4 then .2: both quarantined, so the subnet is still full.
    for domain in (domains[2], domains[0]):
        net.service.release_ports(ReleasePorts(domain_id=domain), None)
    with pytest.raises(ServiceError) as still:
        net.allocate(NicSpec(network="small"))
    assert still.value.code == "no_capacity"
    with pytest.raises(ServiceError) as asked:
        net.allocate(NicSpec(network="small", ip=IPv4Address("10.0.0.4")))
    assert asked.value.details["reason"] == "ip_quarantined"
    # Age the quarantine: .4 was released first, so it comes back first.
    with net.service.db.transaction() as conn:
        conn.execute(
            sa.update(addresses)
            .where(addresses.c.port_id.is_(None))
            .values(released_at=addresses.c.released_at - 301)
        )
    _, got = net.allocate(NicSpec(network="small"))
    assert got.ports[0].ipv4 == IPv4Address("10.0.0.4")
    _, got = net.allocate(NicSpec(network="small"))
    assert got.ports[0].ipv4 == IPv4Address("10.0.0.2")


def test_fresh_addresses_go_before_quarantined_ones(net: Net) -> None:
    net.create()
    cmd, first = net.allocate(NicSpec(network="n1"))
    net.service.release_ports(ReleasePorts(domain_id=cmd.domain_id), None)
    with net.service.db.transaction() as conn:
        conn.execute(sa.update(addresses).values(released_at=0.0))
    _, second = net.allocate(NicSpec(network="n1"))
    assert second.ports[0].ipv4 == IPv4Address("10.0.0.3") != first.ports[0].ipv4


def test_leases_are_the_static_allocations(net: Net) -> None:
    info = net.create()
    cmd, bindings = net.allocate(NicSpec(network="n1"), NicSpec(network="n1"))
    leases = net.service.dhcp_leases(
        ListDhcpLeases(network_id=info.network_id, project="alice"), None
    ).leases
    assert [(x.mac, x.ipv4, x.domain_id) for x in leases] == [
        (p.mac, p.ipv4, cmd.domain_id) for p in bindings.ports
    ]
    listed = net.service.list_ports(ListPorts(project="alice", domain_id=cmd.domain_id), None)
    assert [p.nic for p in listed.ports] == [0, 1]
    assert all(p.network == "n1" for p in listed.ports)
