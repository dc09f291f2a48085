"""The HTTP API without a broker: a fake cloud answers the API's RPCs with real compute-node
lifecycle services (FakeDriver) dispatched in-process, and feeds their events to the registry,
so the API's view follows what the hosts did. The same flows run on a real broker in
tests/integration/test_api.py."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from compute_node.boot_sources import BootSources
from compute_node.fake import FakeDriver
from compute_node.lifecycle import Lifecycle
from compute_node.resources import Claims
from compute_node.store import Store
from protos import routing
from protos.base import Message
from protos.bindings import NetworkBinding, PortBinding
from protos.codec import decode, envelope_for, parse_body
from protos.commands import Command, DefineDomain, StartDomain
from protos.domain import DomainSpec, PowerState, TaskState
from protos.events import DomainEvent
from protos.host import HostHeartbeat, HostInventory
from protos.network import ReleasePorts
from protos.replies import DomainInfo, Done, ErrorReply
from protos.scheduler import Attempt, Placement, ScheduleDomain
from services.api import ApiConfig, Quota, TokenEntry, create_app, finishing, reaping
from services.api.config import Role
from services.api.metrics import ApiMetrics
from services.api.orphans import GRACE_S, OrphanSweeper
from services.api.projection import EventProjector
from services.api.registry import Registry
from services.api.visibility import HOST_ALIAS_KEY_NAME, host_alias
from services.bus import ConnectionLost, Context, NoRouteError, RemoteError, RpcTimeout
from services.bus.service import dispatch
from tests.bootfiles import BOOT_DIR, KERNEL

ADMIN, ALICE, BOB = "admin-token-1", "alice-token-1", "bob-token-12"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def fake_ports(spec: DomainSpec) -> list[PortBinding]:
    """Ports for the spec's NICs as a network service would allocate them (hand-made)."""
    ports = []
    for i, nic in enumerate(spec.nics):
        network = NetworkBinding(
            network_id=uuid.uuid5(spec.uuid, nic.network),
            name=nic.network,
            mode="isolated",
            mtu=1450,
            gateway=IPv4Interface("10.9.0.1/24"),
        )
        ports.append(
            PortBinding(
                port_id=uuid.uuid5(spec.uuid, f"port-{i}"),
                network=network,
                mac=nic.mac or f"52:54:00:00:00:{i + 2:02x}",
                ipv4=nic.ip or IPv4Address(f"10.9.0.{i + 2}"),
            )
        )
    return ports


class FakeCloud:
    """Answers `Bus.call` like the scheduler and compute nodes would, in-process."""

    def __init__(self, base: Path, registry: Registry, hosts: tuple[str, ...] = ("h1",)) -> None:
        self.registry = registry
        self.nodes: dict[str, Lifecycle] = {}
        self.projector = EventProjector(registry, ApiMetrics(), lambda: None)
        self.no_valid_host = False
        self.broken = False
        self.calls: list[tuple[str, Command]] = []
        for host in hosts:
            driver = FakeDriver(vcpus=8, memory_mib=8192)
            store = Store(base / host / "compute.db", host=host, source=f"compute:{host}")
            inventory = HostInventory(
                capacity=driver.host_resources(), kvm=driver.capabilities().kvm
            )
            self.nodes[host] = Lifecycle(
                host, store, driver, Claims(inventory, 0), BootSources([BOOT_DIR])
            )

    def call(self, queue: str, command: Command, *, timeout: float = 30.0, **_: Any) -> Message:
        self.calls.append((queue, command))
        if self.broken:
            raise ConnectionLost("broker unreachable")
        if queue == routing.SCHEDULER_QUEUE:
            assert isinstance(command, ScheduleDomain)
            return self._schedule(command)
        if queue == routing.NETWORK_QUEUE:
            assert isinstance(command, ReleasePorts)
            return Done()
        if queue == routing.STORAGE_QUEUE:  # no storage service in this cloud
            raise NoRouteError(routing.COMMANDS_EXCHANGE, queue)
        host = queue.removeprefix("compute.")
        return self._compute(host, command)

    def _schedule(self, command: ScheduleDomain) -> Placement:
        if self.no_valid_host:
            raise RemoteError(
                "no_valid_host",
                "no host fits 1 vCPU, 64 MiB: h1 (no_capacity)",
                {
                    "attempts": [{"host": "h1", "code": "no_capacity", "message": "h1 is full"}],
                    "filtered": {"memory": ["h2"]},
                },
            )
        host = next(iter(self.nodes))
        define = DefineDomain(
            spec=command.spec, privileged=command.privileged, ports=fake_ports(command.spec)
        )
        info = self._compute(host, define)
        if command.start:
            info = self._compute(host, StartDomain(domain_id=command.spec.uuid))
        assert isinstance(info, DomainInfo)
        return Placement(host=host, info=info, attempts=[Attempt(host="h0", code="x", message="y")])

    def _compute(self, host: str, command: Command) -> Message:
        node = self.nodes[host]
        envelope = envelope_for(command, source="test")
        reply = dispatch(node, command, Context(envelope))
        self.pump()
        if isinstance(reply, ErrorReply):
            raise RemoteError(reply.code, reply.message, reply.details)
        return reply

    def pump(self) -> None:
        """Deliver the hosts' pending events to the API's projection."""
        for node in self.nodes.values():
            items = node.store.outbox()
            for item in items:
                envelope = decode(item.body)
                event = parse_body(envelope)
                assert isinstance(event, DomainEvent)
                ctx = Context(envelope, routing_key=item.routing_key)
                self.projector.domain_event(event, ctx)
            if items:
                node.store.outbox_done(items[-1].row)

    def close(self) -> None:
        for node in self.nodes.values():
            node.store.close()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = Registry.open(f"sqlite:///{tmp_path}/registry.db")
    yield reg
    reg.close()


@pytest.fixture
def cloud(tmp_path: Path, registry: Registry) -> Iterator[FakeCloud]:
    fake = FakeCloud(tmp_path, registry)
    yield fake
    fake.close()


CONFIG = ApiConfig(
    tokens=[
        TokenEntry(token=ADMIN, project="ops", role=Role.ADMIN),
        TokenEntry(token=ALICE, project="alice"),
        TokenEntry(token=BOB, project="bob"),
    ],
    default_quota=Quota(domains=5, vcpus=8, memory_mib=1024),
    quotas={"bob": Quota(domains=1)},
)


@pytest.fixture
def client(registry: Registry, cloud: FakeCloud) -> Iterator[TestClient]:
    app = create_app(CONFIG, registry=registry, bus=cloud)
    with TestClient(app) as c:
        yield c


def body(name: str = "", **kw: Any) -> dict[str, Any]:
    return {"name": name or f"g-{uuid.uuid4().hex[:6]}", "boot": {"kernel": KERNEL}, **kw}


def create(client: TestClient, token: str = ALICE, **kw: Any) -> dict[str, Any]:
    r = client.post("/v1/domains", json=body(**kw), headers=auth(token))
    assert r.status_code == 201, r.text
    data: dict[str, Any] = r.json()
    return data


def problem(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    data: dict[str, Any] = r.json()
    assert {"type", "title", "status", "detail", "code"} <= data.keys()
    assert data["status"] == status
    return data


def alias(registry: Registry, project: str, host: str) -> str:
    return host_alias(registry.access.secret(HOST_ALIAS_KEY_NAME), project, host)


def test_create_places_and_starts(client: TestClient, registry: Registry) -> None:
    r = client.post("/v1/domains", json=body("web", vcpus=2), headers=auth(ALICE))
    assert r.status_code == 201, r.text
    d = r.json()
    assert r.headers["location"] == f"/v1/domains/{d['id']}"
    # A member sees its project's alias of the host, never the host's name.
    assert (d["name"], d["project"], d["host"], d["state"], d["task"]) == (
        "web",
        "alice",
        alias(registry, "alice", "h1"),
        "running",
        "none",
    )
    assert d["seq"] >= 2  # defined, started
    assert d["attempts"] == [{"host": alias(registry, "alice", "h0"), "code": "x", "message": "y"}]
    got = client.get(f"/v1/domains/{d['id']}", headers=auth(ALICE)).json()
    assert got["state"] == "running"
    assert got["spec"]["vcpus"] == 2
    assert got["host"] == d["host"]
    assert client.get(f"/v1/domains/{d['id']}", headers=auth(ADMIN)).json()["host"] == "h1"


def test_create_with_start_false_only_defines(client: TestClient, cloud: FakeCloud) -> None:
    d = create(client, start=False)
    assert d["state"] == "shutoff"
    schedule = [c for q, c in cloud.calls if q == "scheduler"]
    assert isinstance(schedule[0], ScheduleDomain)
    assert schedule[0].start is False
    assert schedule[0].project == "alice"


def test_list_filters_and_project_scope(client: TestClient) -> None:
    a = create(client, name="a")
    create(client, name="b", start=False)
    create(client, token=BOB, name="c")
    names = [d["name"] for d in client.get("/v1/domains", headers=auth(ALICE)).json()["domains"]]
    assert names == ["a", "b"]
    running = client.get("/v1/domains?state=running", headers=auth(ALICE)).json()["domains"]
    assert [d["id"] for d in running] == [a["id"]]
    assert client.get("/v1/domains?host=h2", headers=auth(ALICE)).json()["domains"] == []
    assert len(client.get("/v1/domains?name=a", headers=auth(ALICE)).json()["domains"]) == 1
    everyone = client.get("/v1/domains", headers=auth(ADMIN)).json()["domains"]
    assert sorted(d["project"] for d in everyone) == ["alice", "alice", "bob"]
    # A member cannot widen the scope with ?project=.
    theirs = client.get("/v1/domains?project=bob", headers=auth(ALICE)).json()["domains"]
    assert {d["project"] for d in theirs} == {"alice"}
    bad = problem(client.get("/v1/domains?state=flying", headers=auth(ALICE)), 422)
    assert bad["field"] == "state"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"boot": {"kernel": "/k"}}, "name"),
        (body(vcpus=0), "vcpus"),
        (body(memory_mib="lots"), "memory_mib"),
        ({"name": "x", "boot": {"kernel": "/k", "bogus": 1}}, "boot.bogus"),
        (body(nics=[{"network": "n", "mac": "01:00:00:00:00:00"}]), "nics.0.mac"),
        (body(start="maybe"), "start"),
    ],
)
def test_invalid_bodies_name_the_field(
    client: TestClient, payload: dict[str, Any], field: str
) -> None:
    p = problem(client.post("/v1/domains", json=payload, headers=auth(ALICE)), 422)
    assert p["field"] == field
    assert p["code"] == "invalid"
    assert p["errors"][0]["field"] == field


def test_other_projects_domains_are_404(client: TestClient) -> None:
    d = create(client, token=BOB)
    url = f"/v1/domains/{d['id']}"
    for r in (
        client.get(url, headers=auth(ALICE)),
        client.post(f"{url}/actions", json={"action": "pause"}, headers=auth(ALICE)),
        client.get(f"{url}/console", headers=auth(ALICE)),
        client.delete(url, headers=auth(ALICE)),
    ):
        assert problem(r, 404)["code"] == "not_found"
    assert client.get(url, headers=auth(BOB)).status_code == 200
    assert client.get(url, headers=auth(ADMIN)).status_code == 200
    missing = problem(client.get(f"/v1/domains/{uuid.uuid4()}", headers=auth(BOB)), 404)
    assert missing["detail"].endswith("not found")


def test_quotas_are_403_and_count_resources(client: TestClient) -> None:
    create(client, token=BOB)
    p = problem(client.post("/v1/domains", json=body(), headers=auth(BOB)), 403)
    assert (p["code"], p["resource"], p["limit"], p["used"]) == ("over_quota", "domains", 1, 1)
    p = problem(client.post("/v1/domains", json=body(vcpus=9), headers=auth(ALICE)), 403)
    assert (p["resource"], p["limit"], p["requested"]) == ("vcpus", 8, 9)
    project = client.get("/v1/projects/bob", headers=auth(BOB)).json()
    assert project["usage"]["domains"] == 1
    assert project["quota"]["domains"] == 1
    assert client.get("/v1/projects/bob", headers=auth(ALICE)).status_code == 404
    # An admin raises bob's quota through the API.
    r = client.put("/v1/projects/bob/quota", json={"domains": 2}, headers=auth(ADMIN))
    assert r.status_code == 200, r.text
    assert "images" not in r.json()["usage"]  # the storage service's part: none here
    limits = {"domains": 2, "images": 3, "image_gib": 4}
    r = client.put("/v1/projects/bob/quota", json=limits, headers=auth(ADMIN))
    assert r.status_code == 200, r.text
    quota = client.get("/v1/projects/bob", headers=auth(BOB)).json()["quota"]
    assert {k: quota[k] for k in limits} == limits
    create(client, token=BOB)
    assert client.put("/v1/projects/bob/quota", json={}, headers=auth(BOB)).status_code == 403


def test_duplicate_name_is_409(client: TestClient) -> None:
    create(client, name="same")
    p = problem(client.post("/v1/domains", json=body("same"), headers=auth(ALICE)), 409)
    assert p["code"] == "name_in_use"
    # Names are unique across projects; the answer does not say whose it is.
    p = problem(client.post("/v1/domains", json=body("same"), headers=auth(BOB)), 409)
    assert "alice" not in json.dumps(p)


def act(client: TestClient, domain_id: str, action: str, **kw: Any) -> Any:
    return client.post(
        f"/v1/domains/{domain_id}/actions", json={"action": action, **kw}, headers=auth(ALICE)
    )


def test_actions_follow_the_state_table(client: TestClient, cloud: FakeCloud) -> None:
    d = create(client)
    assert act(client, d["id"], "pause").json()["state"] == "paused"
    calls = len(cloud.calls)
    assert act(client, d["id"], "pause").json()["state"] == "paused"  # already so: no command
    assert len(cloud.calls) == calls
    p = problem(act(client, d["id"], "shutdown"), 409)
    assert (p["code"], p["state"], p["task"], p["action"]) == (
        "conflict",
        "paused",
        "none",
        "shutdown",
    )
    assert "not running" in p["detail"]
    assert act(client, d["id"], "resume").json()["state"] == "running"
    rebooted = act(client, d["id"], "reboot", mode="reset").json()
    assert rebooted["state"] == "running"
    assert act(client, d["id"], "shutdown").json()["state"] == "shutoff"
    problem(act(client, d["id"], "destroy"), 409)
    assert act(client, d["id"], "start").json()["state"] == "running"
    assert act(client, d["id"], "destroy").json()["state"] == "shutoff"
    started = act(client, d["id"], "start", paused=True).json()
    assert started["state"] == "paused"
    assert problem(act(client, d["id"], "explode"), 422)["field"] == "action"
    assert problem(act(client, d["id"], "reboot", mode="hard"), 422)["field"] == "mode"


def test_console_returns_recent_output(client: TestClient) -> None:
    d = create(client)
    r = client.get(f"/v1/domains/{d['id']}/console", headers=auth(ALICE))
    assert r.status_code == 200, r.text
    assert "READY" in r.json()["data"]
    assert r.json()["truncated"] is False
    tail = client.get(f"/v1/domains/{d['id']}/console?max_bytes=6", headers=auth(ALICE)).json()
    assert tail == {"domain_id": d["id"], "data": "READY\n", "truncated": True}


def test_delete_destroys_undefines_and_removes(client: TestClient, cloud: FakeCloud) -> None:
    d = create(client)
    r = client.delete(f"/v1/domains/{d['id']}", headers=auth(ALICE))
    assert r.status_code in (202, 204), r.text
    assert client.get(f"/v1/domains/{d['id']}", headers=auth(ALICE)).status_code == 404
    sent = [type(c).__name__ for q, c in cloud.calls if q == "compute.h1"]
    assert sent[-2:] == ["DestroyDomain", "UndefineDomain"]
    assert cloud.nodes["h1"].store.get(uuid.UUID(d["id"])) is None


def test_delete_releases_the_ports_of_a_domain_with_nics(
    client: TestClient, cloud: FakeCloud
) -> None:
    plain = create(client)
    client.delete(f"/v1/domains/{plain['id']}", headers=auth(ALICE))
    assert [c for q, c in cloud.calls if q == routing.NETWORK_QUEUE] == []
    d = create(client, nics=[{"network": "blue"}])
    r = client.delete(f"/v1/domains/{d['id']}", headers=auth(ALICE))
    assert r.status_code in (202, 204), r.text
    released = [c for q, c in cloud.calls if q == routing.NETWORK_QUEUE]
    assert released == [ReleasePorts(domain_id=uuid.UUID(d["id"]))]
    # After the host undefined it, never before.
    kinds = [type(c).__name__ for _, c in cloud.calls]
    assert kinds.index("ReleasePorts") > kinds.index("UndefineDomain")


def test_a_delete_before_placement_removes_the_domain_wherever_it_appears(
    client: TestClient, cloud: FakeCloud, registry: Registry
) -> None:
    """The create's API replica is gone (its record stays `scheduling`, no host) and the
    scheduler defines the domain later (`start: false`): the DELETE answered 202 must still
    hold. The definition gets it undefined on its host; the sweep then ends the tombstone."""
    ctx = client.app.state.ctx  # type: ignore[attr-defined]
    cloud.projector.reap = functools.partial(reaping.reap, ctx)
    s = DomainSpec.model_validate(body(memory_mib=64))
    registry.domains.create(s, "alice", Quota())
    r = client.delete(f"/v1/domains/{s.uuid}", headers=auth(ALICE))
    assert r.status_code == 202, r.text
    assert (r.json()["task"], r.json()["host"]) == ("deleting", None)
    assert registry.domains.usage("alice")["domains"] == 1  # counts until a host confirms

    cloud._compute("h1", DefineDomain(spec=s, privileged=True))  # the late placement
    assert cloud.nodes["h1"].store.get(s.uuid) is None  # undefined there again
    record = registry.domains.get(s.uuid)
    assert record is not None
    assert (record.task, record.host) == (TaskState.DELETING, None)  # a refusal may follow
    sweeper = OrphanSweeper(
        registry, -GRACE_S, reap=functools.partial(reaping.reap, ctx),
        release=functools.partial(reaping.release, ctx),
    )  # fmt: skip
    sweeper.sweep()
    assert registry.domains.get(s.uuid) is None
    assert client.get(f"/v1/domains/{s.uuid}", headers=auth(ALICE)).status_code == 404

    # The tombstone is settled; a create's retry then defines and starts it on a host (its
    # first host was stuck, then cleaned up; this cloud has one host): no record, yet it is
    # taken off there too (the reap runs in the projection here, on its own thread in the API).
    cloud._compute("h1", DefineDomain(spec=s, privileged=True))
    assert cloud.nodes["h1"].store.get(s.uuid) is None
    assert registry.domains.get(s.uuid) is None


def test_a_removed_domains_reap_its_host_did_not_answer_is_run_again_by_the_sweep(
    client: TestClient, cloud: FakeCloud, registry: Registry
) -> None:
    """A deleted domain (record removed) comes up on a host afterwards; the reap's calls to
    that host fail (the broker is away): the guest must not be left running unknown. The
    reap stays pending, and the sweep runs it again once the host answers."""
    ctx = client.app.state.ctx  # type: ignore[attr-defined]
    cloud.projector.reap = functools.partial(reaping.reap, ctx)
    s = DomainSpec.model_validate(body(memory_mib=64))
    registry.domains.create(s, "alice", Quota())
    assert registry.domains.remove(s.uuid)
    cloud.broken = True  # the reap's calls fail; the late create's own calls are direct
    cloud._compute("h1", DefineDomain(spec=s, privileged=True))
    cloud._compute("h1", StartDomain(domain_id=s.uuid))
    assert cloud.nodes["h1"].store.get(s.uuid) is not None  # left there, for now
    sweeper = OrphanSweeper(registry, -GRACE_S, reap=cloud.projector.reap, reap_retry_s=-1)
    sweeper.sweep()  # still broken: tried, and still pending
    assert cloud.nodes["h1"].store.get(s.uuid) is not None
    cloud.broken = False
    sweeper.sweep()
    assert cloud.nodes["h1"].store.get(s.uuid) is None  # destroyed and undefined there
    assert registry.domains.due_reaps(older_than_s=-1) == []  # done: nothing pending
    assert registry.domains.get(s.uuid) is None


def test_delete_when_the_registry_lags_the_host(client: TestClient, cloud: FakeCloud) -> None:
    d = create(client)
    domain_id = uuid.UUID(d["id"])
    # The guest powered itself off, and that event has not reached the API yet.
    cloud.nodes["h1"].driver.guest_poweroff(domain_id)  # type: ignore[attr-defined]
    r = client.delete(f"/v1/domains/{d['id']}", headers=auth(ALICE))
    assert r.status_code in (202, 204), r.text
    cloud.pump()
    assert client.get(f"/v1/domains/{d['id']}", headers=auth(ALICE)).status_code == 404


def test_no_valid_host_is_503_with_the_fault(
    client: TestClient, cloud: FakeCloud, registry: Registry
) -> None:
    registry.hosts.record(beat(cloud, "h1"))  # the API knows the host by its heartbeats
    cloud.no_valid_host = True
    p = problem(client.post("/v1/domains", json=body("big"), headers=auth(ALICE)), 503)
    assert p["code"] == "no_valid_host"
    assert p["fault"]["code"] == "no_valid_host"
    h1, h2 = alias(registry, "alice", "h1"), alias(registry, "alice", "h2")
    assert p["attempts"] == [{"host": h1, "code": "no_capacity", "message": f"{h1} is full"}]
    assert p["filtered"] == {"memory": [h2]}
    assert p["detail"] == f"no host fits 1 vCPU, 64 MiB: {h1} (no_capacity)"
    assert p["fault"]["message"] == p["detail"]
    assert "h1" not in json.dumps(p)
    # Placed nowhere, so nothing is left: no record, nothing counting against the quota.
    assert client.get(f"/v1/domains/{p['domain_id']}", headers=auth(ALICE)).status_code == 404
    usage = client.get("/v1/projects/alice", headers=auth(ADMIN)).json()["usage"]
    assert usage["domains"] == 0


def test_broker_unreachable_is_503(client: TestClient, cloud: FakeCloud) -> None:
    cloud.broken = True
    p = problem(client.post("/v1/domains", json=body(), headers=auth(ALICE)), 503)
    assert p["code"] == "broker_unavailable"


def test_auth(client: TestClient) -> None:
    p = problem(client.get("/v1/domains"), 401)
    assert p["code"] == "unauthorized"
    problem(client.get("/v1/domains", headers=auth("not-a-token")), 401)
    problem(client.get("/v1/domains", headers={"Authorization": f"Basic {ALICE}"}), 401)
    assert problem(client.get("/v1/hosts", headers=auth(ALICE)), 403)["code"] == "forbidden"
    problem(client.post("/v1/tokens", json={"project": "carol"}, headers=auth(ALICE)), 403)
    r = client.post(
        "/v1/tokens", json={"project": "carol", "description": "ci"}, headers=auth(ADMIN)
    )
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    d = create(client, token=token)
    assert d["project"] == "carol"
    listed = client.get("/v1/tokens", headers=auth(ADMIN)).json()["tokens"]
    assert [t["project"] for t in listed] == ["carol"]
    assert "token" not in listed[0]
    assert client.delete(f"/v1/tokens/{r.json()['id']}", headers=auth(ADMIN)).status_code == 204
    problem(client.get("/v1/domains", headers=auth(token)), 401)
    bad = problem(
        client.post("/v1/tokens", json={"project": "no spaces"}, headers=auth(ADMIN)), 422
    )
    assert bad["field"] == "project"


def beat(cloud: FakeCloud, host: str, enabled: bool = True) -> HostHeartbeat:
    node = cloud.nodes[host]
    return HostHeartbeat(
        host=host,
        version="0.1.0",
        interval_s=2.0,
        enabled=enabled,
        inventory=node.claims.inventory,
        usage=node.claims.usage(),
    )


def test_hosts_view_and_enable_disable(
    client: TestClient, cloud: FakeCloud, registry: Registry
) -> None:
    create(client, vcpus=2)
    registry.hosts.record(beat(cloud, "h1"))
    registry.hosts.record(beat(cloud, "h1").model_copy(update={"host": "h9"}), seen_at=1.0)
    hosts = {h["name"]: h for h in client.get("/v1/hosts", headers=auth(ADMIN)).json()["hosts"]}
    assert hosts["h1"]["state"] == "up"
    assert hosts["h9"]["state"] == "down"
    assert hosts["h1"]["usage"]["vcpus"] == 2
    assert hosts["h1"]["capacity"] == {"vcpus": 8, "memory_mib": 8192, "disk_gib": 0}
    assert hosts["h1"]["kvm"] == "none"
    r = client.post("/v1/hosts/h1/disable", json={"reason": "maintenance"}, headers=auth(ADMIN))
    assert r.status_code == 200, r.text
    assert r.json()["enabled"] is False
    assert cloud.nodes["h1"].enabled is False
    assert cloud.nodes["h1"].disabled_reason == "maintenance"
    assert client.post("/v1/hosts/h1/enable", headers=auth(ADMIN)).json()["enabled"] is True
    assert cloud.nodes["h1"].enabled is True
    problem(client.post("/v1/hosts/nope/enable", headers=auth(ADMIN)), 404)
    problem(client.get("/v1/hosts/nope", headers=auth(ADMIN)), 404)


def test_a_hosts_vtep_and_network_warnings_are_shown(
    client: TestClient, cloud: FakeCloud, registry: Registry
) -> None:
    heard = beat(cloud, "h1")
    warning = "ip filter FORWARD: forward hook with policy drop: NAT'd guest traffic is dropped"
    inventory = heard.inventory.model_copy(
        update={"vtep": IPv4Address("192.0.2.7"), "network_warnings": [warning]}
    )
    registry.hosts.record(heard.model_copy(update={"inventory": inventory}))
    h1 = client.get("/v1/hosts/h1", headers=auth(ADMIN)).json()
    assert (h1["vtep"], h1["network_warnings"]) == ("192.0.2.7", [warning])


def test_a_hosts_pools_are_shown_as_its_heartbeat_says(
    client: TestClient, cloud: FakeCloud, registry: Registry
) -> None:
    heard = beat(cloud, "h1")
    pooled = heard.inventory.model_copy(update={"pools": ["default", "fast"]})
    registry.hosts.record(heard.model_copy(update={"inventory": pooled}))
    # A host whose heartbeat names no pools (HostHeartbeat 1.2) shows none, not an empty list.
    registry.hosts.record(heard.model_copy(update={"host": "h2"}))
    hosts = {h["name"]: h for h in client.get("/v1/hosts", headers=auth(ADMIN)).json()["hosts"]}
    assert hosts["h1"]["pools"] == ["default", "fast"]
    assert hosts["h2"]["pools"] is None
    assert client.get("/v1/hosts/h1", headers=auth(ADMIN)).json()["pools"] == ["default", "fast"]


def sse(text: str) -> list[dict[str, Any]]:
    """The data of each SSE message, with its id checked against the data's."""
    out = []
    for block in text.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if not line.startswith(":")
        )
        if "data" in fields:
            data = json.loads(fields["data"])
            assert int(fields["id"]) == data["id"]
            assert fields["event"] == data["type"]
            out.append(data)
    return out


def test_events_stream_is_scoped_filtered_and_resumable(client: TestClient) -> None:
    a = create(client)
    create(client, token=BOB)
    act(client, a["id"], "pause")
    r = client.get("/v1/events?since=0&follow=false", headers=auth(ALICE))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    mine = sse(r.text)
    assert [e["type"] for e in mine] == ["domain.defined", "domain.started", "domain.suspended"]
    assert {e["project"] for e in mine} == {"alice"}
    assert [e["seq"] for e in mine] == sorted(e["seq"] for e in mine)
    everything = sse(client.get("/v1/events?since=0&follow=false", headers=auth(ADMIN)).text)
    assert len(everything) == 5
    starts = sse(
        client.get(
            "/v1/events?since=0&follow=false&pattern=domain.started.*", headers=auth(ADMIN)
        ).text
    )
    assert [e["type"] for e in starts] == ["domain.started", "domain.started"]
    resumed = client.get(
        "/v1/events?follow=false",
        headers={**auth(ALICE), "Last-Event-ID": str(mine[0]["id"])},
    )
    assert [e["id"] for e in sse(resumed.text)] == [e["id"] for e in mine[1:]]
    by_seq = client.get(
        f"/v1/events?follow=false&domain={a['id']}&since_seq={mine[1]['seq']}",
        headers=auth(ALICE),
    )
    assert [e["type"] for e in sse(by_seq.text)] == ["domain.suspended"]
    # Without a starting point a stream begins with what is logged from now on.
    assert sse(client.get("/v1/events?follow=false", headers=auth(ALICE)).text) == []
    bad = problem(client.get("/v1/events?pattern=a..b", headers=auth(ALICE)), 422)
    assert bad["field"] == "pattern"
    problem(client.get("/v1/events?since_seq=1", headers=auth(ALICE)), 422)


def test_healthz_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    create(client)
    client.get("/v1/domains/not-a-uuid", headers=auth(ALICE))
    text = client.get("/metrics").text
    assert 'flotilla_api_requests_total{method="POST",route="/v1/domains",status="201"} 1.0' in text
    assert 'route="/v1/domains/{domain_id}",status="422"' in text
    assert "flotilla_api_request_seconds_bucket" in text
    assert "flotilla_api_rpc_errors_total" in text


def test_unknown_routes_are_problems(client: TestClient) -> None:
    assert problem(client.get("/v2/nothing"), 404)["code"] == "not_found"
    assert problem(client.put("/v1/domains", headers=auth(ALICE)), 405)["code"] == (
        "method_not_allowed"
    )


def test_serves_without_a_broker(tmp_path: Path) -> None:
    config = CONFIG.model_copy(
        update={
            "amqp_url": "amqp://guest:guest@127.0.0.1:1/%2F",
            "database_url": f"sqlite:///{tmp_path}/registry.db",
            "broker_connect_timeout_s": 0.3,
        }
    )
    with TestClient(create_app(config)) as c:
        health = c.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "degraded"
        assert health.json()["database"] is True
        p = problem(c.post("/v1/domains", json=body(), headers=auth(ALICE)), 503)
        assert p["code"] == "broker_unavailable"
        assert c.get("/v1/domains", headers=auth(ALICE)).json()["domains"][0]["task"] == "error"


def test_a_host_whose_disk_fills_mid_save_is_507_and_the_guest_runs_on(
    client: TestClient, cloud: FakeCloud
) -> None:
    d = create(client)
    driver = cloud.nodes["h1"].driver
    assert isinstance(driver, FakeDriver)
    driver.fail_next_save = "no_space"
    p = problem(client.post(f"/v1/domains/{d['id']}/save", json={}, headers=auth(ALICE)), 507)
    assert p["code"] == "no_space"
    got = client.get(f"/v1/domains/{d['id']}", headers=auth(ALICE)).json()
    assert got["state"] == "running"


@pytest.mark.parametrize("refused", [False, True])
def test_the_sweep_finishes_a_create_cut_off_between_define_and_start(
    client: TestClient, cloud: FakeCloud, registry: Registry, refused: bool
) -> None:
    """The create's replica is gone and its start never reached the host: the sweep settles
    it there and starts it, as its create asked (the host kept `start`); a host that refuses
    leaves it in `error` with the reason, never silently shut off."""
    ctx = client.app.state.ctx  # type: ignore[attr-defined]
    s = DomainSpec.model_validate(body(memory_mib=64))
    registry.domains.create(s, "alice", Quota())
    cloud._compute("h1", DefineDomain(spec=s, privileged=True, start=True))  # no start follows
    if refused:
        cloud.nodes["h1"].driver.fail_next_spawn = "no such kernel"  # type: ignore[attr-defined]
    sweeper = OrphanSweeper(
        registry, -GRACE_S, finish=functools.partial(finishing.finish_start, ctx)
    )
    sweeper.sweep()
    record = registry.domains.get(s.uuid)
    assert record is not None
    assert record.host == "h1"
    if refused:
        assert (record.task, record.power) == (TaskState.ERROR, PowerState.SHUTOFF)
        assert record.fault is not None
        assert record.fault.code == "start_failed"
        assert "no such kernel" in record.fault.message
    else:
        assert (record.task, record.power) == (TaskState.NONE, PowerState.RUNNING)


def test_a_create_answered_504_whose_start_never_came_is_finished_running(
    client: TestClient, cloud: FakeCloud, registry: Registry
) -> None:
    """The scheduler defined the domain, then stopped before its start: the create's replica
    waited its schedule timeout and answered 504 (task `error`, fault `schedule_timeout`,
    the outcome unknown). The create asked for a running guest: the sweep places it on the
    host that defined it and starts it there, and the fault is gone."""
    ctx = client.app.state.ctx  # type: ignore[attr-defined]

    def define_then_stop(command: ScheduleDomain) -> Placement:
        define = DefineDomain(spec=command.spec, privileged=command.privileged, start=True)
        cloud._compute("h1", define)
        raise RpcTimeout("no reply from the scheduler in 60 s")

    cloud._schedule = define_then_stop  # type: ignore[method-assign]
    p = problem(client.post("/v1/domains", json=body(), headers=auth(ALICE)), 504)
    assert p["fault"]["code"] == "schedule_timeout"
    domain_id = uuid.UUID(p["domain_id"])
    record = registry.domains.get(domain_id)
    assert record is not None
    assert (record.host, record.task) == (None, TaskState.ERROR)
    sweeper = OrphanSweeper(
        registry, -GRACE_S, finish=functools.partial(finishing.finish_start, ctx)
    )
    OrphanSweeper(registry, 60.0).sweep()  # a record younger than the wait is left alone
    assert registry.domains.get(domain_id) == record
    sweeper.sweep()
    cloud.pump()
    record = registry.domains.get(domain_id)
    assert record is not None
    assert (record.host, record.power, record.task, record.fault) == (
        "h1",
        PowerState.RUNNING,
        TaskState.NONE,
        None,
    )
    assert [c for _, c in cloud.calls if isinstance(c, StartDomain)][-1].if_pending
