"""The network service on a real broker: the HTTP API end to end through `flotilla-network`'s
handlers (SQLite catalog), the scheduler's port commands over the `network` queue (idempotent
by domain and by message id), events on the bus, projects kept apart; and two replicas on one
PostgreSQL allocating at once without handing out an address twice."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from protos import routing
from protos.codec import Envelope, envelope_for
from protos.domain import BootSpec, DomainSpec, NicSpec
from protos.network import AllocatePorts, BindPorts, CreateNetwork, PortBindings, ReleasePorts
from services.api import ApiConfig, TokenEntry
from services.api.config import Quota, Role
from services.api.registry import Registry
from services.bus import Bus, Context, RemoteError, ServiceError
from services.cli.client import Exit
from services.cli.main import main as cli_main
from services.db import Database, upgrade
from services.network.config import NetworkConfig, NetworkQuota
from services.network.service import NetworkServer, NetworkService
from services.network.tables import CATALOG, addresses, ports
from tests.integration.conftest import MakeBus
from tests.integration.test_api import ApiServer, auth
from tests.pg import fresh_database

pytestmark = pytest.mark.integration

ADMIN, ALICE, BOB = "net-admin-token", "net-alice-token", "net-bob-token1"


class Lab:
    def __init__(
        self,
        url: str,
        bus: Bus,
        events: list[tuple[str, dict[str, Any]]],
        registry: str,
        network: NetworkServer,
    ) -> None:
        self.network = network
        self.http = httpx.Client(base_url=url, timeout=30)
        self.bus = bus
        self.events = events
        self.registry = registry

    def post(self, token: str = ALICE, **body: Any) -> httpx.Response:
        return self.http.post("/v1/networks", json=body, headers=auth(token))

    def get(self, path: str, token: str = ALICE, **params: Any) -> httpx.Response:
        return self.http.get(path, params=params, headers=auth(token))

    def allocate(self, *nics: NicSpec, project: str = "alice", domain: uuid.UUID | None = None):  # type: ignore[no-untyped-def]
        command = AllocatePorts(domain_id=domain or uuid.uuid4(), project=project, nics=list(nics))
        reply = self.bus.call(routing.NETWORK_QUEUE, command, timeout=20)
        assert isinstance(reply, PortBindings)
        return command, reply


@pytest.fixture
def lab(amqp_url: str, tmp_path: Path, make_bus: MakeBus) -> Iterator[Lab]:
    tag = uuid.uuid4().hex[:6]
    network = NetworkServer(
        NetworkConfig(
            amqp_url=amqp_url,
            database_url=f"sqlite:///{tmp_path / 'catalog.db'}",
            replica=f"net-test-{tag}",
            quotas={"bob": NetworkQuota(networks=1, ports=1)},
        )
    ).start()
    server = ApiServer(
        ApiConfig(
            amqp_url=amqp_url,
            database_url=f"sqlite:///{tmp_path}/registry.db",
            tokens=[
                TokenEntry(token=ADMIN, project="ops", role=Role.ADMIN),
                TokenEntry(token=ALICE, project="alice"),
                TokenEntry(token=BOB, project="bob"),
            ],
            consume_events=False,
            rpc_timeout_s=20,
        )
    )
    bus = make_bus("scheduler-standin")
    events: list[tuple[str, dict[str, Any]]] = []
    lock = threading.Lock()

    def seen(envelope: Envelope, _event: object) -> None:
        with lock:
            events.append((envelope.type, envelope.body))

    subscription = bus.subscribe(["network.#", "port.#"], seen)
    try:
        lab = Lab(server.start(), bus, events, f"sqlite:///{tmp_path}/registry.db", network)
        yield lab
        lab.http.close()
    finally:
        subscription.close()
        server.stop()
        network.stop()


def problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    return body


def wait_for(lab: Lab, count: int) -> list[tuple[str, dict[str, Any]]]:
    import time

    deadline = time.monotonic() + 15
    while len(lab.events) < count:
        assert time.monotonic() < deadline, lab.events
        time.sleep(0.05)
    return list(lab.events)


def test_networks_and_ports_end_to_end(lab: Lab) -> None:
    r = lab.post(name="web", subnet="10.20.0.0/24")
    assert r.status_code == 201, r.text
    net = r.json()
    assert r.headers["location"] == f"/v1/networks/{net['network_id']}"
    assert (net["gateway"], net["mtu"], net["mode"]) == ("10.20.0.1", 1450, "nat")
    assert lab.get(f"/v1/networks/{net['network_id']}").json()["name"] == "web"
    assert [n["name"] for n in lab.get("/v1/networks").json()["networks"]] == ["web"]

    # The scheduler's side: ports for a domain, bound to a host.
    cmd, bindings = lab.allocate(
        NicSpec(network="web"), NicSpec(network="web", ip=IPv4Address("10.20.0.99"))
    )
    lab.bus.call(
        routing.NETWORK_QUEUE,
        BindPorts(domain_id=cmd.domain_id, host="node-a", vtep=IPv4Address("192.0.2.1")),
        timeout=20,
    )
    ports = lab.get("/v1/ports", domain=str(cmd.domain_id)).json()["ports"]
    assert [(p["nic"], p["ipv4"], p["mac"], p["state"]) for p in ports] == [
        (0, "10.20.0.2", bindings.ports[0].mac, "bound"),
        (1, "10.20.0.99", bindings.ports[1].mac, "bound"),
    ]
    assert ports[0]["host"] != "node-a"  # a member sees a host alias, not the name
    assert lab.get("/v1/ports", ADMIN, domain=str(cmd.domain_id)).json()["ports"][0]["host"] == (
        "node-a"
    )
    one = lab.get(f"/v1/ports/{ports[1]['port_id']}").json()
    assert one["ipv4"] == "10.20.0.99"
    leases = lab.get(f"/v1/networks/{net['network_id']}/dhcp-leases").json()["leases"]
    assert sorted((x["mac"], x["ipv4"]) for x in leases) == sorted(
        (p.mac, str(p.ipv4)) for p in bindings.ports
    )

    # Deleting a network with ports is refused and changes nothing.
    p = problem(lab.http.delete(f"/v1/networks/{net['network_id']}", headers=auth(ALICE)), 409)
    assert p["reason"] == "has_ports"
    lab.bus.call(routing.NETWORK_QUEUE, ReleasePorts(domain_id=cmd.domain_id), timeout=20)
    r = lab.http.delete(f"/v1/networks/{net['network_id']}", headers=auth(ALICE))
    assert r.status_code == 204, r.text
    problem(lab.get(f"/v1/networks/{net['network_id']}"), 404)

    events = wait_for(lab, 8)
    assert [t for t, _ in events] == [
        "network.created",
        "port.created",
        "port.created",
        "port.bound",
        "port.bound",
        "port.deleted",
        "port.deleted",
        "network.deleted",
    ]
    first_port = [b for _, b in events if b.get("port_id") == str(bindings.ports[0].port_id)]
    assert [b["seq"] for b in first_port] == [1, 2, 3]
    assert first_port[1]["vtep"] == "192.0.2.1"


def test_a_domain_shows_its_nics_from_its_ports(lab: Lab) -> None:
    lab.post(name="web", subnet="10.21.0.0/24")
    spec = DomainSpec(
        name=f"d-{uuid.uuid4().hex[:6]}",
        boot=BootSpec(kernel="/boot/k"),
        nics=[NicSpec(network="web"), NicSpec(network="web", mac="52:54:00:00:00:07")],
    )
    registry = Registry.open(lab.registry)
    try:
        registry.domains.create(spec, "alice", Quota())
    finally:
        registry.close()
    _, bindings = lab.allocate(*spec.nics, domain=spec.uuid)
    view = lab.get(f"/v1/domains/{spec.uuid}").json()
    assert view["interfaces"] == [
        {
            "nic": i,
            "network": "web",
            "network_id": str(p.network.network_id),
            "port_id": str(p.port_id),
            "mac": p.mac,
            "ipv4": str(p.ipv4),
        }
        for i, p in enumerate(bindings.ports)
    ]
    assert view["interfaces"][1]["mac"] == "52:54:00:00:00:07"
    listed = lab.get("/v1/domains").json()["domains"]
    assert listed[0]["interfaces"] is None  # asked for one domain only
    # With the network service away, the domain's view still answers, soon, without them.
    lab.network.stop()
    started = time.monotonic()
    r = lab.get(f"/v1/domains/{spec.uuid}")
    assert r.status_code == 200
    assert r.json()["interfaces"] is None
    assert time.monotonic() - started < 10


def test_the_cli_verbs(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--api", str(lab.http.base_url).rstrip("/"), "--token", ALICE]

    def run(*argv: str, code: int = 0) -> str:
        """stdout, or stderr when the verb failed."""
        assert cli_main([*base, *argv]) == code, capsys.readouterr()
        out, err = capsys.readouterr()
        return out if code == 0 else err

    assert "Network lan created" in run("net-create", "lan", "--subnet", "10.60.0.0/24")
    refused = run("net-create", "lan2", "--subnet", "10.60.0.0/25", code=Exit.CONFLICT)
    assert "overlaps 10.60.0.0/24" in refused
    listed = run("net-list")
    assert "lan" in listed
    assert "10.60.0.0/24" in listed
    info = run("net-info", "lan")
    assert "Gateway:" in info
    assert "10.60.0.1" in info
    assert "1450" in info
    spec = DomainSpec(name="web-1", boot=BootSpec(kernel="/boot/k"), nics=[NicSpec(network="lan")])
    registry = Registry.open(lab.registry)
    try:
        registry.domains.create(spec, "alice", Quota())
    finally:
        registry.close()
    _, bindings = lab.allocate(*spec.nics, domain=spec.uuid)
    mac, ip = bindings.ports[0].mac, str(bindings.ports[0].ipv4)
    leases = run("net-dhcp-leases", "lan")
    assert mac in leases
    assert ip in leases
    assert mac in run("port-list", "--network", "lan")
    iflist = run("domiflist", "web-1")
    assert "nic0" in iflist
    assert mac in iflist
    assert f"{mac} {ip} (lan)" in run("dominfo", "web-1")
    assert "has 1 port" in run("net-delete", "lan", code=Exit.CONFLICT)
    lab.bus.call(routing.NETWORK_QUEUE, ReleasePorts(domain_id=spec.uuid), timeout=20)
    assert "deleted" in run("net-delete", "lan")
    run("net-info", "lan", code=Exit.NOT_FOUND)


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"name": "x", "subnet": "10.0.0.0/31"}, 422, "subnet"),
        ({"name": "x", "subnet": "10.0.0.1/24"}, 422, "subnet"),  # host bits set
        ({"name": "x", "subnet": "10.0.0.0/24", "gateway": "10.1.0.1"}, 422, "gateway"),
        ({"name": "x", "subnet": "10.0.0.0/24", "mtu": 9000}, 422, "mtu"),
        ({"name": "x", "mode": "isolated"}, 422, "subnet"),
        ({"name": "x", "mode": "bridge", "dhcp": False}, 422, "host_bridge"),
        ({"name": "x", "subnet": "10.0.0.0/24", "shared": True}, 403, None),
        ({"name": "bad name", "subnet": "10.0.0.0/24"}, 422, "name"),
        ({"name": "x", "subnet": "10.0.0.0/24", "color": "red"}, 422, "color"),
        ({"name": "x", "subnet": "10.0.0.0/24", "mtu": "1400"}, 422, "mtu"),
        ({"name": "x", "subnet": "10.0.0.0/24", "mtu": 1400.5}, 422, "mtu"),
    ],
)
def test_bad_networks_get_a_clear_4xx_and_nothing_is_created(
    lab: Lab, body: dict[str, Any], status: int, field: str | None
) -> None:
    p = problem(lab.post(**body), status)
    if field is not None:
        assert p["field"] == field, p
    assert lab.get("/v1/networks", ADMIN).json()["networks"] == []


def test_an_mtu_is_an_integer_as_json_schema_says(lab: Lab) -> None:
    r = lab.post(name="jumbo", subnet="10.34.0.0/24", mtu=1400.0)
    assert r.status_code == 201, r.text
    assert r.json()["mtu"] == 1400


def test_overlap_name_quota_and_other_projects(lab: Lab) -> None:
    mine = lab.post(name="a", subnet="10.30.0.0/24").json()
    p = problem(lab.post(name="b", subnet="10.30.0.0/25"), 409)
    assert (p["field"], p["reason"]) == ("subnet", "subnet_overlap")
    p = problem(lab.post(BOB, name="b", subnet="10.30.0.128/25"), 409)  # another project too
    assert p["reason"] == "subnet_overlap"
    assert "'a'" not in p["detail"]
    p = problem(lab.post(name="a", subnet="10.31.0.0/24"), 409)
    assert (p["field"], p["reason"]) == ("name", "name_in_use")
    assert lab.post(BOB, name="a", subnet="10.32.0.0/24").status_code == 201
    p = problem(lab.post(BOB, name="c", subnet="10.33.0.0/24"), 403)
    assert (p["code"], p["resource"], p["limit"]) == ("over_quota", "networks", 1)
    # Bob sees none of Alice's.
    assert [n["name"] for n in lab.get("/v1/networks", BOB).json()["networks"]] == ["a"]
    for path in (
        f"/v1/networks/{mine['network_id']}",
        f"/v1/networks/{mine['network_id']}/dhcp-leases",
    ):
        problem(lab.get(path, BOB), 404)
    problem(lab.get("/v1/ports", BOB, network=mine["network_id"]), 404)
    problem(lab.http.delete(f"/v1/networks/{mine['network_id']}", headers=auth(BOB)), 404)
    assert len(lab.get("/v1/networks", ADMIN).json()["networks"]) == 2
    # Nor can Bob's domains use it: his "a" is his own network.
    _, bindings = lab.allocate(NicSpec(network="a"), project="bob")
    assert str(bindings.ports[0].network.network_id) != mine["network_id"]
    with pytest.raises(RemoteError) as over:
        lab.allocate(NicSpec(network="a"), project="bob")
    assert over.value.code == "over_quota"
    problem(lab.get(f"/v1/ports/{bindings.ports[0].port_id}"), 404)  # Alice cannot see it


def test_allocate_is_idempotent_by_domain_and_by_message_id(lab: Lab) -> None:
    lab.post(name="n", subnet="10.40.0.0/24")
    cmd, first = lab.allocate(NicSpec(network="n"))
    _, again = lab.allocate(NicSpec(network="n"), domain=cmd.domain_id)
    assert again == first
    message_id = str(uuid.uuid4())
    other = AllocatePorts(domain_id=uuid.uuid4(), project="alice", nics=[NicSpec(network="n")])
    one = lab.bus.call(routing.NETWORK_QUEUE, other, timeout=20, message_id=message_id)
    two = lab.bus.call(routing.NETWORK_QUEUE, other, timeout=20, message_id=message_id)
    assert one == two
    assert len(lab.get("/v1/ports").json()["ports"]) == 2
    with pytest.raises(RemoteError) as taken:
        lab.allocate(NicSpec(network="n", mac=first.ports[0].mac))
    assert (taken.value.code, taken.value.details["field"]) == ("conflict", "nics.0.mac")
    with pytest.raises(RemoteError) as outside:
        lab.allocate(NicSpec(network="n", ip=IPv4Address("10.41.0.5")))
    assert (outside.value.code, outside.value.details["field"]) == ("invalid", "nics.0.ip")


def test_port_events_reach_a_host_queue_only_for_the_networks_it_is_bound_to(
    lab: Lab,
) -> None:
    """Port events carry their network's routing key (BCC) beside their own: a queue bound
    by `netport.*.<network>` gets that network's events, once each even when a catch-all
    pattern matches too, and none of another network's; unbound, none at all."""
    mine = lab.post(name="mine", subnet="10.42.0.0/24").json()
    lab.post(name="theirs", subnet="10.43.0.0/24")
    got: list[tuple[str, str]] = []
    lock = threading.Lock()

    def heard(envelope: Envelope, event: object) -> None:
        with lock:
            got.append((envelope.type, str(getattr(event, "network_id", ""))))

    sub = lab.bus.subscribe(
        [routing.network_ports_pattern(mine["network_id"]), "port.bound.*"],
        heard,
    )
    try:
        for name in ("theirs", "mine"):
            cmd, _ = lab.allocate(NicSpec(network=name))
            bind = BindPorts(domain_id=cmd.domain_id, host="h1", vtep=IPv4Address("10.9.9.9"))
            lab.bus.call(routing.NETWORK_QUEUE, bind, timeout=20)
        deadline = time.monotonic() + 15
        while len(got) < 2:  # mine's created and bound; theirs' bound via port.bound.*
            assert time.monotonic() < deadline, got
            time.sleep(0.05)
        sub.rebind([routing.network_ports_pattern(mine["network_id"])])
        cmd, _ = lab.allocate(NicSpec(network="theirs"))
        lab.bus.call(routing.NETWORK_QUEUE, ReleasePorts(domain_id=cmd.domain_id), timeout=20)
        cmd, _ = lab.allocate(NicSpec(network="mine"))
        while len(got) < 4:
            assert time.monotonic() < deadline, got
            time.sleep(0.05)
        time.sleep(0.3)
        theirs = lab.get("/v1/networks").json()
        theirs_id = next(n["network_id"] for n in theirs["networks"] if n["name"] == "theirs")
        assert got == [
            ("port.bound", theirs_id),  # by the catch-all pattern, before the rebind
            ("port.created", mine["network_id"]),
            ("port.bound", mine["network_id"]),  # matched twice, delivered once
            ("port.created", mine["network_id"]),
        ]
        sub.rebind([])
        lab.allocate(NicSpec(network="mine"))
        time.sleep(0.5)
        assert len(got) == 4
    finally:
        sub.close()


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    with fresh_database(pg_server) as url:
        yield url


def test_two_replicas_on_one_postgresql_never_share_an_address(pg_url: str) -> None:
    config = NetworkConfig(database_url=pg_url, quotas={"capped": NetworkQuota(ports=5)})
    dbs = [Database(pg_url), Database(pg_url)]
    try:
        upgrade(dbs[0], CATALOG)
        replicas = [NetworkService(config, db, f"network:r{i}") for i, db in enumerate(dbs)]
        create = CreateNetwork(
            network_id=uuid.uuid4(),
            project="admin",
            name="n",
            subnet=IPv4Network("10.50.0.0/25"),
            shared=True,
        )
        replicas[0].create_network(create, None)

        def allocate(i: int, project: str | None = None) -> str:
            # Eight projects: their allocations are not serialised by a project's quota lock.
            command = AllocatePorts(
                domain_id=uuid.uuid4(),
                project=project or f"p{i % 8}",
                nics=[NicSpec(network="n")],
            )
            # With a message context: each replica records the reply in its transaction.
            context = Context(envelope_for(command, source="scheduler"))
            reply = replicas[i % 2].allocate_ports(command, context)
            again = replicas[(i + 1) % 2].allocate_ports(command, context)
            assert again == reply  # the other replica answers from the record
            return str(reply.ports[0].ipv4)

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(allocate, range(125)))  # every usable address of the /25
        assert len(set(got)) == 125
        with pytest.raises(ServiceError, match="no free address"):
            allocate(0)

        # A quota of 5 ports holds against 16 allocations at once on both replicas.
        replicas[0].release_ports(ReleasePorts(domain_id=uuid.uuid4()), None)
        with dbs[0].transaction() as conn:
            conn.execute(sa.delete(addresses))  # room again: the quota is what limits now
            conn.execute(sa.delete(ports))

        def capped(i: int) -> bool:
            try:
                allocate(i, "capped")
            except ServiceError as exc:
                assert exc.code == "over_quota"
                return False
            return True

        with ThreadPoolExecutor(8) as pool:
            assert sum(pool.map(capped, range(16))) == 5
    finally:
        for db in dbs:
            db.close()
