"""Per-host network plumbing against the real kernel, in namespaces the tests make.

Hosts and guests are network namespaces (tests/integration/netlab.py): hosts joined by a
veth underlay, guests relayed to their port's tap the way a VMM uses it. Traffic stays in
those namespaces: a few pings, UDP frames, DHCP exchanges and TCP connects."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pytest

from compute_node.net import (
    HostPlumbing,
    NetworkMode,
    NetworkPlumbing,
    Plumber,
    PlumbingError,
    PortPlumbing,
    RemoteVtep,
    Underlay,
    names,
    overlay_mtu,
)
from compute_node.net import netns as nsmod
from compute_node.net.dnsmasq import Dnsmasq, default_node_dir
from compute_node.net.libnft import Nftables
from compute_node.networks import HostNetworks, NetSettings
from protos.bindings import NetworkBinding, PortBinding
from tests.integration.netlab import Lab, ip, lab, run_in

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

MAC_A = "52:54:00:0a:00:0a"
MAC_B = "52:54:00:0b:00:0b"
NetLab = tuple[Lab, list[Plumber], Path]


def _root_owned() -> tuple[set[str], set[str]]:
    """Flotilla's links and tables in the root namespace (tests must leave them alone)."""
    links = {
        p.name for p in Path("/sys/class/net").iterdir() if p.name[:4] in {"flb-", "flt-", "flv-"}
    }
    with Nftables() as nft:
        tables = {t for t in nft.run("list tables").splitlines() if "flotilla" in t}
    return links, tables


@pytest.fixture
def net_lab() -> Iterator[NetLab]:
    """A lab, the plumbers a test makes (closed and their dnsmasqs ended after), a state dir
    (0700, as a state dir may well be: dnsmasq's files are kept outside it)."""
    before = _root_owned()
    plumbers: list[Plumber] = []
    with tempfile.TemporaryDirectory(prefix="flotilla-net-") as tmp, lab() as made:
        tmp_path = Path(tmp)
        try:
            yield made, plumbers, tmp_path
        finally:
            for p in plumbers:
                p.close()
            for host_dir in [tmp_path, *tmp_path.iterdir()]:
                if host_dir.is_dir():
                    Dnsmasq(host_dir).stop_all()
    assert _root_owned() == before, "the plumbing touched the root namespace"


def ping(ns: str, target: str, count: int = 3) -> bool:
    out = run_in(ns, "busybox", "ping", "-c", str(count), "-i", "0.2", "-W", "1", target)
    return out.returncode == 0


def test_vxlan_joins_two_hosts_after_fdb_entries_are_pushed(net_lab: NetLab) -> None:
    made, plumbers, state = net_lab
    host_a, host_b = made.ns("a"), made.ns("b")
    made.veth((host_a, "under0", "10.77.0.1/24"), (host_b, "under0", "10.77.0.2/24"))
    mtu = overlay_mtu(1500, vxlan=True)
    net = NetworkPlumbing(
        network_id="net-vx",
        mode=NetworkMode.ISOLATED,
        gateway=IPv4Interface("10.50.0.1/24"),
        vni=4242,
        mtu=mtu,
        dhcp=False,
    )
    port_a = PortPlumbing(
        port_id="pa", network_id="net-vx", mac=MAC_A, ipv4=IPv4Address("10.50.0.10")
    )
    port_b = PortPlumbing(
        port_id="pb", network_id="net-vx", mac=MAC_B, ipv4=IPv4Address("10.50.0.11")
    )
    pa = Plumber(state / "a", netns=host_a, underlay=Underlay(IPv4Address("10.77.0.1"), "under0"))
    pb = Plumber(state / "b", netns=host_b, underlay=Underlay(IPv4Address("10.77.0.2"), "under0"))
    plumbers += [pa, pb]
    with pytest.raises(PlumbingError, match="does not fit VXLAN"):
        pa.apply(net.model_copy(update={"mtu": 1500}))
    pa.apply(net)
    pb.apply(net)
    guest_a = made.guest("ga", host_a, pa.plug(port_a), MAC_A, mtu=mtu, addr="10.50.0.10/24")
    made.guest("gb", host_b, pb.plug(port_b), MAC_B, mtu=mtu, addr="10.50.0.11/24")

    # Learning is off and nothing is pushed yet: nothing crosses.
    assert not ping(guest_a, "10.50.0.11", count=1)
    vxlan = ip("-d", "link", "show", net.vxlan or "", ns=host_a)
    assert "nolearning" in vxlan
    assert "id 4242" in vxlan

    pa.fdb_add(
        RemoteVtep(
            network_id="net-vx", mac=MAC_B, ipv4=port_b.ipv4, remote=IPv4Address("10.77.0.2")
        )
    )
    pb.fdb_add(
        RemoteVtep(
            network_id="net-vx", mac=MAC_A, ipv4=port_a.ipv4, remote=IPv4Address("10.77.0.1")
        )
    )
    assert ping(guest_a, "10.50.0.11")
    fdb = ip("neigh", "show", "dev", net.vxlan or "", ns=host_a)
    assert f"10.50.0.11 lladdr {MAC_B} PERMANENT" in fdb

    pa.fdb_del(
        RemoteVtep(
            network_id="net-vx", mac=MAC_B, ipv4=port_b.ipv4, remote=IPv4Address("10.77.0.2")
        )
    )
    assert (
        "10.77.0.2"
        not in subprocess.run(
            ["ip", "netns", "exec", host_a, "bridge", "fdb", "show", "dev", net.vxlan or ""],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )


def _one_host(
    made: Lab, plumbers: list[Plumber], state: Path, net: NetworkPlumbing
) -> tuple[str, Plumber]:
    host = made.ns("h")
    plumber = Plumber(state / "h", netns=host)
    plumbers.append(plumber)
    plumber.apply(net)
    return host, plumber


ISOLATED = NetworkPlumbing(
    network_id="net-iso",
    mode=NetworkMode.ISOLATED,
    gateway=IPv4Interface("10.61.0.1/24"),
    mtu=1400,
)
GUEST = PortPlumbing(port_id="p1", network_id="net-iso", mac=MAC_A, ipv4=IPv4Address("10.61.0.10"))


def test_spoofed_frames_are_dropped_and_legitimate_ones_pass(net_lab: NetLab) -> None:
    from scapy.layers.dhcp import BOOTP, DHCP
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import ICMPv6ND_RA, IPv6
    from scapy.layers.l2 import ARP, Dot1Q, Ether

    made, plumbers, state = net_lab
    host, plumber = _one_host(made, plumbers, state, ISOLATED.model_copy(update={"dhcp": False}))
    guest = made.guest("g", host, plumber.plug(GUEST), MAC_A, mtu=1400)
    bcast = "ff:ff:ff:ff:ff:ff"
    other_mac, other_ip = "52:54:00:99:99:99", "10.61.0.99"

    def udp(mac: str, src: str, marker: str, sport: int = 4000) -> bytes:
        frame = Ether(src=mac, dst=bcast) / IP(src=src, dst="10.61.255.255")
        return bytes(frame / UDP(sport=sport, dport=9) / marker.encode())

    frames = {
        "legit": udp(MAC_A, "10.61.0.10", "legit"),
        "legit-dhcp-discover": udp(MAC_A, "0.0.0.0", "legit-dhcp-discover", sport=68).replace(
            b"\x00\x09", b"\x00\x43", 1
        ),  # dport 67
        "spoof-mac": udp(other_mac, "10.61.0.10", "spoof-mac"),
        "spoof-ip": udp(MAC_A, other_ip, "spoof-ip"),
        "spoof-zero-ip": udp(MAC_A, "0.0.0.0", "spoof-zero-ip"),
        "dhcp-server": bytes(
            Ether(src=MAC_A, dst=bcast)
            / IP(src="10.61.0.10", dst="255.255.255.255")
            / UDP(sport=67, dport=68)
            / BOOTP(op=2, yiaddr="10.61.0.50")
            / DHCP(options=[("message-type", "offer"), "end"])
            / b"dhcp-server"
        ),
        "vlan": bytes(Ether(src=MAC_A, dst=bcast) / Dot1Q(vlan=5) / IP(src="10.61.0.10") / b"vlan"),
        "arp-spoof": bytes(
            Ether(src=MAC_A, dst=bcast) / ARP(op=2, hwsrc=MAC_A, psrc=other_ip, pdst="10.61.0.1")
        ),
        "arp-legit": bytes(
            Ether(src=MAC_A, dst=bcast)
            / ARP(op=1, hwsrc=MAC_A, psrc="10.61.0.10", pdst="10.61.0.1")
        ),
        "ra": bytes(
            Ether(src=MAC_A, dst="33:33:00:00:00:01")
            / IPv6(src="fe80::5054:ff:fe0a:a", dst="ff02::1")
            / ICMPv6ND_RA()
        ),
    }
    bridge = ISOLATED.bridge
    with nsmod.inside(host):
        sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    with nsmod.inside(guest):
        send = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    try:
        sniff.bind((bridge, 0))
        sniff.settimeout(0.2)
        send.bind(("eth0", 0))
        for frame in frames.values():
            send.send(frame)
        seen: list[bytes] = []
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                seen.append(sniff.recv(65536))
            except TimeoutError:
                continue
    finally:
        sniff.close()
        send.close()
    arrived = {name for name, frame in frames.items() if frame in seen}
    assert arrived == {"legit", "legit-dhcp-discover", "arp-legit"}


def test_dhcp_gives_the_port_its_address_and_mtu(net_lab: NetLab, tmp_path: Path) -> None:
    made, plumbers, state = net_lab
    host, plumber = _one_host(made, plumbers, state, ISOLATED)
    guest = made.guest("g", host, plumber.plug(GUEST), MAC_A, mtu=1400)
    script = tmp_path / "udhcpc.sh"
    script.write_text('#!/bin/sh\necho "$1 ip=$ip mask=$mask mtu=$mtu router=$router"\n')
    script.chmod(0o755)
    out = run_in(
        guest, "busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "5", "-T", "1",
        "-O", "mtu", "-s", str(script),
    )  # fmt: skip
    assert "bound ip=10.61.0.10 mask=24 mtu=1400" in out.stdout, out.stdout + out.stderr
    assert "router=10" not in out.stdout  # isolated: no default route offered

    # A port the hosts file does not name gets nothing: static entries only.
    other = made.guest(
        "o",
        host,
        plumber.plug(GUEST.model_copy(update={"port_id": "p2", "ipv4": IPv4Address("10.61.0.11")})),
        "52:54:00:0c:00:0c",
        mtu=1400,
    )
    plumber.unplug("p2")
    out = run_in(other, "busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "2", "-T", "1")
    assert "obtained" not in out.stdout

    # DHCP turned off: its dnsmasq ends.
    assert Dnsmasq(state / "h").pid(ISOLATED.short_id) is not None
    changes = plumber.apply(ISOLATED.model_copy(update={"dhcp": False}))
    assert f"dnsmasq stopped for {ISOLATED.bridge}" in changes
    assert Dnsmasq(state / "h").running() == set()


def _running(pid: int) -> bool:
    """Whether `pid` runs (an ended daemon may linger as a zombie, with no command line)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() != b""
    except FileNotFoundError:
        return False


def _lease(guest: str, script: Path) -> str:
    out = run_in(
        guest, "busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "5", "-T", "1",
        "-O", "mtu", "-s", str(script),
    )  # fmt: skip
    return out.stdout + out.stderr


def _isolated(name: str, subnet: int) -> NetworkBinding:
    """A new isolated network (MTU 1400) on 10.<subnet>.0.0/24."""
    return NetworkBinding(
        network_id=uuid.uuid4(),
        name=name,
        mode="isolated",
        mtu=1400,
        gateway=IPv4Interface(f"10.{subnet}.0.1/24"),
    )


def _binding(net: NetworkBinding, n: int) -> PortBinding:
    assert net.gateway is not None
    return PortBinding(
        port_id=uuid.uuid4(),
        network=net,
        mac=f"52:54:00:3e:00:{n:02x}",
        ipv4=IPv4Address(int(net.gateway.network.network_address) + n),
    )


def test_a_node_whose_state_dir_is_private_serves_dhcp_and_reloads_it(tmp_path: Path) -> None:
    """A compute node's state dir under a 0700 directory (pytest's tmp_path is one): dnsmasq,
    once it has dropped to nobody, re-reads its hosts file on SIGHUP, so the node keeps that
    file in its run dir, which nobody can reach; removing the network removes the run dir."""
    private = tmp_path / "private"
    private.mkdir()
    private.chmod(0o700)
    script = tmp_path / "udhcpc.sh"
    script.write_text('#!/bin/sh\necho "$1 ip=$ip mtu=$mtu"\n')
    script.chmod(0o755)
    net = _isolated("private", 62)
    first, second = _binding(net, 10), _binding(net, 11)
    with lab() as made:
        host = made.ns("h")
        networks = HostNetworks(
            f"h-{uuid.uuid4().hex[:6]}", private / "compute", NetSettings(netns=host)
        )
        run_dir = networks.dnsmasq_dir
        assert run_dir.parent == Path("/run/flotilla/dnsmasq")
        try:
            (tap,) = networks.attach([first])
            guest = made.guest("g1", host, tap.tap, first.mac, mtu=1400)
            assert "bound ip=10.62.0.10 mtu=1400" in _lease(guest, script)

            # A second port: its line is added to the hosts file and dnsmasq told by SIGHUP.
            short = names.short_id(str(net.network_id))
            pid = Dnsmasq(private / "compute" / "net", run_dir=run_dir).pid(short)
            (tap,) = networks.attach([second])
            other = made.guest("g2", host, tap.tap, second.mac, mtu=1400)
            assert "bound ip=10.62.0.11 mtu=1400" in _lease(other, script)

            (hosts,) = run_dir.glob("*.hosts")
            assert hosts.read_text().count("\n") == 2
            assert [pid] == [int(p.read_text()) for p in run_dir.glob("*.pid")]  # reloaded
            # (the pid file is dnsmasq's own: it gives it to the user it drops to)
            for path in (run_dir, hosts, *run_dir.glob("*.argv")):
                mode = 0o755 if path.is_dir() else 0o644
                assert (path.stat().st_uid, path.stat().st_mode & 0o7777) == (0, mode), path

            networks.detach([first, second])
            assert not run_dir.exists()
        finally:
            networks.close()
            Dnsmasq(private / "compute" / "net", run_dir=run_dir).stop_all()


def test_a_dnsmasq_an_earlier_version_started_in_the_state_dir_is_found_once(
    net_lab: NetLab,
) -> None:
    """Earlier versions kept dnsmasq's pid file in the state dir: a restarted node's
    reconcile finds that dnsmasq, replaces it by one reading the run dir, and removes the old
    files; a network no longer wanted has its old dnsmasq stopped."""
    made, plumbers, state = net_lab
    host = made.ns("h")
    state.chmod(0o755)  # which the earlier version needed
    old_dir = state / "h" / "dnsmasq"
    old = Dnsmasq(state / "h", host, run_dir=old_dir)  # the earlier layout: all in one dir
    gone = ISOLATED.model_copy(
        update={"network_id": "net-gone", "gateway": IPv4Interface("10.63.0.1/24")}
    )
    with Plumber(state / "h", netns=host) as setup:
        setup.apply(ISOLATED)
        setup.apply(gone)
    for network in (ISOLATED, gone):  # what the earlier version left running
        Dnsmasq(state / "h", host).stop(network.short_id)
        old.ensure(network, [GUEST])
    old_pids = {n.short_id: old.pid(n.short_id) for n in (ISOLATED, gone)}
    assert None not in old_pids.values()
    assert {p.name for p in old_dir.glob("*.pid")} == {f"{s}.pid" for s in old_pids}

    plumber = Plumber(state / "h", netns=host)
    plumbers.append(plumber)
    report = plumber.reconcile(HostPlumbing(networks=(ISOLATED,), ports=(GUEST,)))

    assert f"dnsmasq {gone.short_id} stopped" in report.changes
    assert f"dnsmasq restarted for {ISOLATED.bridge}" in report.changes
    assert not any(old_dir.glob("*.pid"))
    assert not any(old_dir.glob("*.hosts"))
    for pid in old_pids.values():
        assert pid is not None
        assert not _running(pid)
    now = Dnsmasq(state / "h")
    assert now.running() == {ISOLATED.short_id}
    assert (default_node_dir(state / "h") / f"{ISOLATED.short_id}.hosts").read_text() == (
        f"{MAC_A},{GUEST.ipv4}\n"
    )
    guest = made.guest("g", host, plumber.plug(GUEST), MAC_A, mtu=1400)
    out = run_in(guest, "busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "5", "-T", "1")
    assert "10.61.0.10" in out.stdout + out.stderr


def _tcp_server(ns: str, port: int) -> tuple[socket.socket, list[str]]:
    with nsmod.inside(ns):
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))
    server.listen()
    peers: list[str] = []

    def serve() -> None:
        while True:
            try:
                conn, addr = server.accept()
            except OSError:
                return
            peers.append(addr[0])
            conn.sendall(b"hello")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return server, peers


def _connect(ns: str, address: str, port: int, timeout: float = 1.5) -> bytes | None:
    """The server's greeting, or None when the connection fails or times out (a dropped SYN:
    callers expecting a drop pass a short timeout)."""
    with nsmod.inside(ns):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.settimeout(timeout)
    try:
        client.connect((address, port))
        return client.recv(16)
    except OSError:
        return None
    finally:
        client.close()


def test_nat_guest_reaches_upstream_and_isolated_guest_cannot(net_lab: NetLab) -> None:
    made, plumbers, state = net_lab
    host = made.ns("h")
    upstream = made.ns("up")
    made.veth((host, "uplink0", "10.88.0.1/24"), (upstream, "wan0", "10.88.0.2/24"))
    nat = NetworkPlumbing(
        network_id="net-nat",
        mode=NetworkMode.NAT,
        gateway=IPv4Interface("10.60.0.1/24"),
        uplink="uplink0",
        dhcp=False,
    )
    iso = ISOLATED.model_copy(update={"dhcp": False})
    plumber = Plumber(state / "h", netns=host)
    plumbers.append(plumber)
    # A new namespace starts with the host's ip_forward on some kernels: the plumber turns it on
    # when it is off, and says so, and leaves it alone when it is on already.
    was_on = run_in(host, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    changes = plumber.apply(nat)
    assert ("net.ipv4.ip_forward=1" in changes) is not was_on, changes
    assert run_in(host, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    plumber.apply(iso)
    nat_port = PortPlumbing(
        port_id="pn", network_id="net-nat", mac=MAC_B, ipv4=IPv4Address("10.60.0.10")
    )
    g_nat = made.guest(
        "gn",
        host,
        plumber.plug(nat_port),
        MAC_B,
        mtu=1500,
        addr="10.60.0.10/24",
        gateway="10.60.0.1",
    )
    g_iso = made.guest(
        "gi", host, plumber.plug(GUEST), MAC_A, mtu=1400, addr="10.61.0.10/24", gateway="10.61.0.1"
    )
    server, peers = _tcp_server(upstream, 8080)
    host_server, host_peers = _tcp_server(host, 8081)  # a service of the host itself
    try:
        assert _connect(g_nat, "10.88.0.2", 8080) == b"hello"
        assert peers == ["10.88.0.1"]  # masqueraded to the uplink's address
        assert _connect(g_iso, "10.88.0.2", 8080, timeout=0.5) is None
        # Neither network routes into the other.
        assert _connect(g_iso, "10.60.0.10", 8080, timeout=0.5) is None
        assert peers == ["10.88.0.1"]
        # Guests reach the host for DHCP, DNS and ping only, not its other services.
        for guest, gateway in ((g_nat, "10.60.0.1"), (g_iso, "10.61.0.1")):
            assert _connect(guest, gateway, 8081, timeout=0.5) is None
            assert _connect(guest, "10.88.0.1", 8081, timeout=0.5) is None
        assert host_peers == []
        assert ping(g_nat, "10.60.0.1", count=1)
    finally:
        server.close()
        host_server.close()
    assert plumber.forward_conflicts() == []


def test_foreign_forward_drop_policy_is_reported(net_lab: NetLab) -> None:
    made, plumbers, state = net_lab
    host = made.ns("h")
    made.veth((host, "uplink0", "10.88.0.1/24"), (made.ns("up"), "wan0", "10.88.0.2/24"))
    # What Docker leaves behind through iptables-nft.
    run_in(host, "nft", "add table ip filter")
    run_in(
        host,
        "nft",
        "add chain ip filter FORWARD { type filter hook forward priority 0; policy drop; }",
    )
    plumber = Plumber(state / "h", netns=host)
    plumbers.append(plumber)
    nat = NetworkPlumbing(
        network_id="net-nat", mode=NetworkMode.NAT, gateway=IPv4Interface("10.60.0.1/24"),
        uplink="uplink0", dhcp=False,
    )  # fmt: skip
    plumber.apply(nat)
    assert [str(c) for c in plumber.forward_conflicts()] == [
        "ip filter FORWARD: forward hook with policy drop"
    ]
    report = Plumber(state / "h", netns=host)
    plumbers.append(report)
    assert [c.table for c in report.reconcile(HostPlumbing(networks=(nat,))).conflicts] == [
        "filter"
    ]


def test_reconcile_keeps_matching_links_and_traffic_and_fixes_what_differs(
    net_lab: NetLab,
) -> None:
    made, plumbers, state = net_lab
    host = made.ns("h")
    peer = made.ns("peer")
    made.veth((host, "under0", "10.77.0.1/24"), (peer, "under0", "10.77.0.2/24"))
    net = ISOLATED.model_copy(update={"vni": 77, "mtu": 1450})
    remote = RemoteVtep(
        network_id="net-iso",
        mac=MAC_B,
        ipv4=IPv4Address("10.61.0.20"),
        remote=IPv4Address("10.77.0.2"),
    )
    underlay = Underlay(IPv4Address("10.77.0.1"), "under0")
    first = Plumber(state / "h", netns=host, underlay=underlay)
    plumbers.append(first)
    first.apply(net)
    guest = made.guest("g", host, first.plug(GUEST), MAC_A, mtu=1450, addr="10.61.0.10/24")
    first.fdb_add(remote)
    desired = first.desired
    before = {name: link.index for name, link in first._links.all().items()}
    dnsmasq_pid = Dnsmasq(state / "h").pid(net.short_id)
    assert dnsmasq_pid is not None

    # A restarted node: a new plumber, the same desired state, a guest pinging throughout.
    pinger = subprocess.Popen(
        ["ip", "netns", "exec", guest, "busybox", "ping", "-c", "30", "-i", "0.05", "-W", "1",
         "10.61.0.1"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(0.3)
        second = Plumber(state / "h", netns=host, underlay=underlay)
        plumbers.append(second)
        report = second.reconcile(desired)
        out, _ = pinger.communicate(timeout=30)
    finally:
        if pinger.poll() is None:
            pinger.kill()
            pinger.wait()
    assert report.changes == []
    assert "30 packets received, 0% packet loss" in out, out
    after = {name: link.index for name, link in second._links.all().items()}
    assert after == before
    assert Dnsmasq(state / "h").pid(net.short_id) == dnsmasq_pid

    # Drift: a wrong MTU, a lost forwarding entry, a flushed anti-spoofing chain, a stray link.
    tap = GUEST.tap
    ip("link", "set", tap, "mtu", "1300", ns=host)
    run_in(host, "bridge", "fdb", "del", MAC_B, "dev", net.vxlan or "", "dst", "10.77.0.2")
    run_in(host, "nft", "flush", "chain", "bridge", "flotilla", "port-" + tap[4:])
    ip("link", "add", "flb-deadbeef", "type", "bridge", ns=host)
    report = Plumber(state / "h", netns=host, underlay=underlay).reconcile(desired)
    assert sorted(report.changes) == sorted(
        [
            f"set {tap} mtu",
            f"set {net.bridge} mtu",  # the kernel lowered the bridge's to its smallest port's
            f"fdb add {MAC_B} 10.77.0.2",
            "nft bridge flotilla",
            "deleted flb-deadbeef",
        ]
    )
    assert {name: link.index for name, link in second._links.all().items()} == before


def test_ports_added_and_removed_one_by_one_leave_the_table_a_rewrite_would_make(
    net_lab: NetLab,
) -> None:
    made, plumbers, state = net_lab
    net = ISOLATED.model_copy(update={"dhcp": False})
    host, plumber = _one_host(made, plumbers, state, net)
    ports = [
        GUEST.model_copy(update={"port_id": f"p{i}", "ipv4": IPv4Address(f"10.61.0.{10 + i}")})
        for i in range(4)
    ]
    for port in ports:  # the first rewrites the table, the others are small batches
        plumber.plug(port)
    plumber.unplug("p1")
    plumber.unplug("p3")
    desired = plumber.desired
    assert [p.port_id for p in desired.ports] == ["p0", "p2"]
    fresh = Plumber(state / "h", netns=host)
    plumbers.append(fresh)
    assert fresh.reconcile(desired).changes == []
    listing = run_in(host, "nft", "list", "map", "bridge", "flotilla", "ports").stdout
    assert ports[0].tap in listing
    assert ports[1].tap not in listing


def test_bridge_mode_uses_the_host_bridge_and_remove_leaves_nothing_of_ours(
    net_lab: NetLab,
) -> None:
    made, plumbers, state = net_lab
    host = made.ns("h")
    ip("link", "add", "br-lan", "type", "bridge", ns=host)
    lan = NetworkPlumbing(
        network_id="net-lan", mode=NetworkMode.BRIDGE, host_bridge="br-lan", dhcp=False
    )
    plumber = Plumber(state / "h", netns=host, tap_uid=65534, tap_gid=65534)
    plumbers.append(plumber)
    plumber.apply(lan)
    plumber.apply(ISOLATED)
    lan_port = GUEST.model_copy(update={"port_id": "lan", "network_id": "net-lan"})
    tap = plumber.plug(lan_port)
    plumber.plug(GUEST)
    details = ip("-d", "link", "show", tap, ns=host)
    assert "master br-lan" in details
    assert "persist on user nobody group nogroup" in details  # uid/gid 65534: the VMM user
    assert Dnsmasq(state / "h").pid(ISOLATED.short_id) is not None

    plumber.remove("net-lan")
    plumber.remove("net-iso")
    links = ip("-o", "link", "show", ns=host)
    assert "br-lan" in links  # the host's bridge stays
    assert "fl" not in "".join(line.split(":")[1] for line in links.splitlines())
    assert Dnsmasq(state / "h").running() == set()
    ruleset = run_in(host, "nft", "list", "ruleset").stdout
    assert "port-" not in ruleset
    assert "flb-" not in ruleset


def test_a_network_lingers_after_its_last_port_and_a_new_port_finds_it_ready(
    tmp_path: Path,
) -> None:
    """`linger_s`: the last port's detach leaves the network's bridge and dnsmasq; a port
    attached meanwhile finds them as they were (same bridge, same dnsmasq, nothing applied
    again); once the linger is over with no port, the network goes. With `linger_s` 0 it goes
    with its last port (the test above)."""
    net = _isolated("lingering", 64)
    first, second = _binding(net, 10), _binding(net, 11)
    bridge = names.bridge_name(str(net.network_id))
    short = names.short_id(str(net.network_id))
    with lab() as made:
        host = made.ns("h")
        networks = HostNetworks(
            f"h-{uuid.uuid4().hex[:6]}",
            tmp_path / "compute",
            NetSettings(netns=host, linger_s=1.0),
        )
        dnsmasq = Dnsmasq(tmp_path / "compute" / "net", run_dir=networks.dnsmasq_dir)
        try:
            networks.attach([first])
            index = _links(host)[bridge]
            deadline = time.monotonic() + 10
            while (pid := dnsmasq.pid(short)) is None:  # started in the background
                assert time.monotonic() < deadline, "dnsmasq did not start"
                time.sleep(0.05)
            networks.detach([first])
            links = _links(host)
            assert names.tap_name(str(first.port_id)) not in links
            assert links[bridge] == index  # lingering
            assert networks.carried() == {str(net.network_id)}

            time.sleep(0.5)
            networks.attach([second])  # within the linger: found ready
            assert _links(host)[bridge] == index
            assert dnsmasq.pid(short) == pid
            time.sleep(1.0)  # the first linger's time is up, but the network has a port
            assert bridge in _links(host)

            networks.detach([second])
            deadline = time.monotonic() + 10
            while bridge in _links(host):
                assert time.monotonic() < deadline, "the network outlived its linger"
                time.sleep(0.1)
            assert networks.carried() == frozenset()
            assert dnsmasq.pid(short) is None
        finally:
            networks.close()
            dnsmasq.stop_all()


def test_a_node_that_stops_removes_the_networks_lingering_without_ports(tmp_path: Path) -> None:
    """The linger is a cache for guests made while the node runs: a node that stops leaves
    no port-less network behind (no bridge, no dnsmasq), while a network with a port stays
    for the guest that runs on (a restart reconciles it)."""
    nets = [_isolated("idle", 65), _isolated("used", 66)]
    idle, used = (_binding(net, 10) for net in nets)
    with lab() as made:
        host = made.ns("h")
        networks = HostNetworks(
            f"h-{uuid.uuid4().hex[:6]}", tmp_path / "compute", NetSettings(netns=host, linger_s=600)
        )
        dnsmasq = Dnsmasq(tmp_path / "compute" / "net", run_dir=networks.dnsmasq_dir)
        try:
            networks.attach([idle])
            networks.attach([used])
            networks.detach([idle])
            bridges = {names.bridge_name(str(n.network_id)) for n in nets}
            assert bridges <= _links(host).keys()
            networks.close()
            left = _links(host)
            assert names.bridge_name(str(nets[0].network_id)) not in left
            assert names.bridge_name(str(nets[1].network_id)) in left
            assert dnsmasq.pid(names.short_id(str(nets[0].network_id))) is None
        finally:
            networks.close()
            dnsmasq.stop_all()


def _links(ns: str) -> dict[str, int]:
    """Link name -> ifindex in namespace `ns`."""
    found = {}
    for line in ip("-o", "link", "show", ns=ns).splitlines():
        index, name = line.split(":")[0:2]
        found[name.strip().split("@")[0]] = int(index)
    return found
