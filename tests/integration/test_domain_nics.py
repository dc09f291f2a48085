"""NICs on domains through real compute nodes: two "hosts" whose data planes live in
namespaces the test makes, joined by a veth underlay (AMQP stays on loopback), each a
`flotilla-compute` process running test guests on KVM. The ports are hand-made PortBindings;
the port events and the answers to the nodes' ListBoundPorts come from the test, as the
network service would send them (tests/integration/port_announcer.py).

- two guests on one network on the two hosts take their addresses by DHCP and ping each other
  over VXLAN (forwarding entries from `port.bound` events);
- a host started after a port was bound elsewhere learns it (it asks the network service for
  the bound ports of a network when it first carries it): its guest reaches the other;
- a host hears port events only of the networks it carries;
- a compute node killed with SIGKILL and restarted loses no packet of a 10 ms ping between
  them (the restart reconciles; nothing that matches is torn down);
- a NAT guest reaches a server upstream of its host and an isolated one cannot;
- MAC and address are in the domain's info; undefine removes the tap at once and, its last
  port gone, the network once its linger (`net_linger_s`) is over.
"""

from __future__ import annotations

import json
import os
import queue as queues
import re
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pytest

from compute_node.net import names
from compute_node.net.dnsmasq import RUN_DIR, Dnsmasq, node_dir
from protos import routing
from protos.bindings import NetworkBinding, PortBinding
from protos.commands import (
    DefineDomain,
    DestroyDomain,
    GetConsole,
    GetDomainInfo,
    StartDomain,
    UndefineDomain,
)
from protos.domain import BootSpec, DomainSpec, NicSpec
from protos.host import HostHeartbeat
from protos.replies import ConsoleOutput
from services.bus import Bus
from tests.integration.compute_harness import ComputeProcess, call
from tests.integration.conftest import MakeBus
from tests.integration.netlab import Lab, ip, lab, run_in
from tests.integration.port_announcer import PortAnnouncer

pytestmark = [pytest.mark.integration, pytest.mark.kvm, pytest.mark.slow]

UNDERLAY = {"a": "10.77.0.1", "b": "10.77.0.2"}
LINGER_S = 2.0  # a network's plumbing outlives its last port on a host by this long
PREFIX = "flotilla-guest: "


@pytest.fixture(scope="module")
def guest() -> Path:
    import native
    import native.testguest

    reason = native.kvm_unavailable_reason()
    if reason is not None:
        pytest.skip(f"KVM unavailable: {reason}")
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    return native.testguest.build()


@dataclass
class Host:
    name: str
    ns: str
    compute: ComputeProcess
    state: Path


@dataclass
class Cloud:
    lab: Lab
    hosts: dict[str, Host]
    bus: Bus
    upstream: str
    ports: PortAnnouncer


@pytest.fixture
def cloud(amqp_url: str, make_bus: MakeBus, guest: Path) -> Iterator[Cloud]:
    """Hosts `a` and `b` (namespaces joined by `under0`); `a` also has `uplink0` to an
    `upstream` namespace at 10.88.0.2."""
    with _cloud(amqp_url, make_bus, start=("a", "b")) as made:
        yield made


@pytest.fixture
def late_cloud(amqp_url: str, make_bus: MakeBus, guest: Path) -> Iterator[Cloud]:
    """As `cloud`, with only `a`'s compute node started: the test starts `b` when it wants."""
    with _cloud(amqp_url, make_bus, start=("a",)) as made:
        yield made


@contextmanager
def _cloud(amqp_url: str, make_bus: MakeBus, start: tuple[str, ...]) -> Iterator[Cloud]:
    bus = make_bus("test-client")
    tag = uuid.uuid4().hex[:6]
    announcer = PortAnnouncer(make_bus("network-standin"), project="p").start()
    with tempfile.TemporaryDirectory(prefix="flotilla-nics-") as tmp, lab() as made:
        root = Path(tmp)
        ns = {role: made.ns(role) for role in ("a", "b", "up")}
        made.veth((ns["a"], "under0", "10.77.0.1/24"), (ns["b"], "under0", "10.77.0.2/24"))
        made.veth((ns["a"], "uplink0", "10.88.0.1/24"), (ns["up"], "wan0", "10.88.0.2/24"))
        hosts: dict[str, Host] = {}
        try:
            for role in ("a", "b"):
                state = root / role
                state.mkdir()
                env = {
                    "FLOTILLA_NET_NETNS": ns[role],
                    "FLOTILLA_NET_UNDERLAY": UNDERLAY[role],
                    "FLOTILLA_NET_LINGER_S": str(LINGER_S),
                }
                if role == "a":
                    env["FLOTILLA_NET_UPLINK"] = "uplink0"
                compute = ComputeProcess(amqp_url, state, f"nic{role}-{tag}", env)
                hosts[role] = Host(compute.host, ns[role], compute, state)
                if role in start:
                    compute.start(bus)
            yield Cloud(made, hosts, bus, ns["up"], announcer)
        finally:
            announcer.stop()
            for host in hosts.values():
                host.compute.stop()
                _end_guests(host.state)
                Dnsmasq(
                    host.state / "net", run_dir=node_dir(RUN_DIR, host.compute.host, host.state)
                ).stop_all()


def _end_guests(state: Path) -> None:
    for pid_file in (state / "domains").glob("*/vmm.pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ValueError, ProcessLookupError):
            pass


def network(mode: str, subnet: int, vni: int | None) -> NetworkBinding:
    return NetworkBinding(
        network_id=uuid.uuid4(),
        name=f"net{subnet}",
        mode=mode,  # type: ignore[arg-type]
        mtu=1450,
        gateway=IPv4Interface(f"10.{subnet}.0.1/24"),
        vni=vni,
    )


def port(net: NetworkBinding, n: int) -> PortBinding:
    assert net.gateway is not None
    base = int(net.gateway.network.network_address)
    return PortBinding(
        port_id=uuid.uuid4(),
        network=net,
        mac=f"52:54:00:{(base >> 16) & 255:02x}:00:{n:02x}",
        ipv4=IPv4Address(base + n),
    )


def define(
    cloud: Cloud, role: str, ports: list[PortBinding], cmdline: str, guest: Path
) -> uuid.UUID:
    spec = DomainSpec(
        name=f"g-{uuid.uuid4().hex[:8]}",
        memory_mib=64,
        boot=BootSpec(kernel=str(guest), cmdline=cmdline),
        nics=[NicSpec(network=p.network.name, mac=p.mac) for p in ports],
    )
    queue = routing.compute_queue(cloud.hosts[role].name)
    call(cloud.bus, queue, DefineDomain(spec=spec, ports=ports))
    call(cloud.bus, queue, StartDomain(domain_id=spec.uuid), timeout=30)
    return spec.uuid


def console(
    cloud: Cloud, role: str, domain_id: uuid.UUID, pattern: str, timeout: float
) -> re.Match[str]:
    queue = routing.compute_queue(cloud.hosts[role].name)
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        reply = cloud.bus.call(queue, GetConsole(domain_id=domain_id), timeout=10)
        assert isinstance(reply, ConsoleOutput)
        text = reply.data
        found = re.search(pattern, text)
        if found:
            return found
        time.sleep(0.1)
    pytest.fail(f"no {pattern!r} within {timeout} s; console:\n{text}")


def bound(cloud: Cloud, role: str, p: PortBinding) -> None:
    """What the network service announces once a port's domain runs on `role`."""
    cloud.ports.bound(p, cloud.hosts[role].name, UNDERLAY[role])


def test_guests_on_two_hosts_ping_over_vxlan_and_a_compute_restart_loses_nothing(
    cloud: Cloud, guest: Path
) -> None:
    # Each host's heartbeat names its VXLAN address (the scheduler binds ports with it).
    beats: queues.Queue[HostHeartbeat] = queues.Queue()
    host_b = cloud.hosts["b"].name
    sub = cloud.bus.subscribe(
        [f"host.heartbeat.{host_b}"],
        lambda _e, m: beats.put(m) if isinstance(m, HostHeartbeat) else None,
    )
    try:
        heard = beats.get(timeout=10)
    finally:
        sub.close()
    assert heard.inventory.vtep == IPv4Address(UNDERLAY["b"])
    assert heard.inventory.network_warnings == []
    net = network("isolated", 66, vni=6600)
    pa, pb = port(net, 10), port(net, 20)
    bound(cloud, "a", pa)
    bound(cloud, "b", pb)
    a = define(cloud, "a", [pa], "net=dhcp", guest)
    console(cloud, "a", a, rf"{PREFIX}NET up .*ip=10\.66\.0\.10\n", 30)
    # MAC and address in the domain's info.
    info = call(cloud.bus, routing.compute_queue(cloud.hosts["a"].name), GetDomainInfo(domain_id=a))
    assert [(i.mac, str(i.ipv4), i.network, i.tap) for i in info.interfaces] == [
        (pa.mac, "10.66.0.10", "net66", names.tap_name(str(pa.port_id)))
    ]
    # A warm-up ping learns the peer's MAC; then 1500 pings 10 ms apart across a kill -9
    # and restart of host a's compute node.
    b = define(cloud, "b", [pb], "net=dhcp ping=10.66.0.10,5,100 ping=10.66.0.10,1500,10", guest)
    lease = console(cloud, "b", b, rf"{PREFIX}DHCP lease (.*)\n", 30)
    assert lease.group(1) == "ip=10.66.0.20/24 router=0.0.0.0 mtu=1450 server=10.66.0.1"
    warm = console(cloud, "b", b, rf"{PREFIX}(PING to=10\.66\.0\.10 sent=5 .*)\n", 30)
    assert "received=5" in warm.group(1), warm.group(1)
    host_a = cloud.hosts["a"]
    links_before = ip("-o", "link", "show", ns=host_a.ns)
    host_a.compute.kill()
    time.sleep(1.0)
    host_a.compute.start(cloud.bus)
    done = console(cloud, "b", b, rf"{PREFIX}(PING to=10\.66\.0\.10 sent=1500 .*)\n", 60)
    assert done.group(1).endswith("received=1500 lost=0"), done.group(1)
    # The restart kept every link (same ifindex, nothing re-created) and changed nothing.
    assert _indexes(ip("-o", "link", "show", ns=host_a.ns)) == _indexes(links_before)
    reconciled = [
        json.loads(line)
        for line in (host_a.state / "compute.log").read_text().splitlines()
        if '"networks reconciled"' in line
    ]
    assert reconciled[-1]["ports"] == 1
    assert reconciled[-1]["changes"] == 0, host_a.compute.log()
    # Undefine: the tap goes at once; the network, its last port gone, lingers, then goes.
    queue = routing.compute_queue(host_a.name)
    cloud.bus.call(queue, DestroyDomain(domain_id=a), timeout=20)
    cloud.bus.call(queue, UndefineDomain(domain_id=a), timeout=20)
    left = ip("-o", "link", "show", ns=host_a.ns)
    assert names.tap_name(str(pa.port_id)) not in left
    assert names.bridge_name(str(net.network_id)) in left
    deadline = time.monotonic() + LINGER_S + 10
    while names.bridge_name(str(net.network_id)) in ip("-o", "link", "show", ns=host_a.ns):
        assert time.monotonic() < deadline, "the network outlived its linger"
        time.sleep(0.2)


def _indexes(links: str) -> dict[str, str]:
    found = {}
    for line in links.splitlines():
        index, name = line.split(":")[0:2]
        found[name.strip().split("@")[0]] = index
    return found


def test_a_nat_guest_reaches_upstream_and_an_isolated_guest_cannot(
    cloud: Cloud, guest: Path
) -> None:
    nat, isolated = network("nat", 67, vni=None), network("isolated", 68, vni=None)
    n = define(cloud, "a", [port(nat, 5)], "net=dhcp ping=10.88.0.2,5,50", guest)
    lease = console(cloud, "a", n, rf"{PREFIX}DHCP lease (.*)\n", 30)
    assert lease.group(1) == "ip=10.67.0.5/24 router=10.67.0.1 mtu=1450 server=10.67.0.1"
    reached = console(cloud, "a", n, rf"{PREFIX}(PING to=10\.88\.0\.2 .*)\n", 30)
    assert reached.group(1).endswith("sent=5 received=5 lost=0"), reached.group(1)
    # The isolated guest reaches its gateway, but nothing is forwarded beyond it (even
    # when the guest routes through it).
    i = define(
        cloud,
        "a",
        [port(isolated, 5)],
        "net=dhcp ping=10.68.0.1,3,50 gw=10.68.0.1 ping=10.88.0.2,5,50",
        guest,
    )
    own = console(cloud, "a", i, rf"{PREFIX}(PING to=10\.68\.0\.1 .*)\n", 30)
    assert own.group(1).endswith("received=3 lost=0"), own.group(1)
    cut = console(cloud, "a", i, rf"{PREFIX}(PING to=10\.88\.0\.2 .*)\n", 30)
    assert cut.group(1).endswith("sent=5 received=0 lost=5"), cut.group(1)


def test_a_foreign_forward_drop_policy_is_in_the_hosts_heartbeat(
    amqp_url: str, make_bus: MakeBus, guest: Path
) -> None:
    """What Docker leaves behind through iptables-nft, in the data plane's namespace: the
    compute node's heartbeat names it (`flotilla hosts` shows it)."""
    bus = make_bus("test-client")
    with tempfile.TemporaryDirectory(prefix="flotilla-nics-") as tmp, lab() as made:
        ns = made.ns("fw")
        run_in(ns, "nft", "add table ip filter")
        run_in(
            ns,
            "nft",
            "add chain ip filter FORWARD { type filter hook forward priority 0; policy drop; }",
        )
        state = Path(tmp)
        compute = ComputeProcess(
            amqp_url, state, f"nicfw-{uuid.uuid4().hex[:6]}", {"FLOTILLA_NET_NETNS": ns}
        )
        beats: queues.Queue[HostHeartbeat] = queues.Queue()
        sub = bus.subscribe(
            [f"host.heartbeat.{compute.host}"],
            lambda _e, m: beats.put(m) if isinstance(m, HostHeartbeat) else None,
        )
        try:
            compute.start(bus)
            heard = beats.get(timeout=15)
        finally:
            sub.close()
            compute.stop()
        (warning,) = heard.inventory.network_warnings
        assert warning.startswith("ip filter FORWARD: forward hook with policy drop"), warning
        assert heard.inventory.vtep is None  # no underlay configured


def _remotes(host: Host) -> dict[str, dict[str, object]]:
    path = host.state / "net" / "remotes.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_a_late_host_learns_earlier_ports_and_hears_only_its_networks(
    late_cloud: Cloud, guest: Path
) -> None:
    cloud = late_cloud
    net, other = network("isolated", 69, vni=6900), network("isolated", 70, vni=7000)
    pa, pb, pc, po = port(net, 10), port(net, 20), port(net, 30), port(other, 40)
    a = define(cloud, "a", [pa], "net=dhcp", guest)
    bound(cloud, "a", pa)
    console(cloud, "a", a, rf"{PREFIX}NET up .*ip=10\.69\.0\.10\n", 30)
    # Host b starts only now: A's `port.bound` was published before its queue existed.
    host_b = cloud.hosts["b"]
    host_b.compute.start(cloud.bus)
    b = define(cloud, "b", [pb], "net=dhcp ping=10.69.0.10,5,100 ping=10.69.0.10,20,20", guest)
    bound(cloud, "b", pb)
    warm = console(cloud, "b", b, rf"{PREFIX}(PING to=10\.69\.0\.10 sent=5 .*)\n", 30)
    assert "received=0 " not in warm.group(1), warm.group(1)
    reached = console(cloud, "b", b, rf"{PREFIX}(PING to=10\.69\.0\.10 sent=20 .*)\n", 30)
    assert reached.group(1).endswith("received=20 lost=0"), reached.group(1)
    assert any(str(net.network_id) in map(str, q.network_ids) for q in cloud.ports.asked)
    # Events are routed by network: b carries `net`, not `other`. Port po's event goes
    # out first, pc's after it on the same exchange; once b has pc, po would have come.
    cloud.ports.bound(po, "elsewhere", "10.77.0.9")
    cloud.ports.bound(pc, "elsewhere", "10.77.0.9")
    deadline = time.monotonic() + 15
    while str(pc.port_id) not in _remotes(host_b):
        assert time.monotonic() < deadline, _remotes(host_b)
        time.sleep(0.05)
    remotes = _remotes(host_b)
    assert str(pa.port_id) in remotes
    assert str(po.port_id) not in remotes
    vxlan = names.vxlan_name(str(net.network_id))
    fdb = run_in(host_b.ns, "bridge", "fdb", "show", "dev", vxlan).stdout
    assert f"{pa.mac} dst 10.77.0.1" in fdb, fdb
    assert f"{pc.mac} dst 10.77.0.9" in fdb, fdb
