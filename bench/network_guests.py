"""Guest networking end to end: two compute "hosts" whose data planes live in namespaces the
bench makes, joined by a veth underlay (VXLAN between them), each a `flotilla-compute`
process on a private broker running test guests on KVM. The bench plays the network
service: it hand-makes the ports, publishes their `port.bound` / `port.deleted` events and
answers the nodes' ListBoundPorts (tests/integration/port_announcer.py).

- net.port_ready_p50: from the DefineDomain request for guest A on host a to the first ICMP
  echo reply guest B on host b gets from it (B pings A's address every millisecond from
  before A exists). Includes the define-and-start RPC (DefineDomain `and_start`, as the
  scheduler sends it: network applied, port plugged, VMM spawned) with the ports' binding
  beside it (as the scheduler's BindPorts: the `port.bound` l2population on host b), A's
  DHCP exchange and ARP. Anchor: Neutron with OVN's published 5.8 s port binds. Printed
  beside it, per stage (medians): the RPC's answer, A's DHCP lease on its console, B's
  first reply. The network is plumbed on both hosts
  already (as for every guest but the first of its network on a host: each round removes
  its guests, and the network lingers, `net_linger_s`).
- net.port_ready_new_network_p50: the same on a network new to both hosts each round (A's
  the first port of its network on host a: the network applied from nothing, its queue
  bound and the network service asked for its other ports), in rounds interleaved with
  port_ready's.
- net.guest_udp_pps: guest A sends 64-byte UDP datagrams (`netbench=`) across VXLAN to a bare
  namespace on host b's bridge; received packets are read from that namespace's interface
  counters. The floor is iperf3 (UDP, 64-byte payloads, unlimited rate) between two bare
  namespaces on the two bridges: the same bridge → VXLAN → veth → VXLAN → bridge path.
- net.guest_tcp_gbps: guest A on host a sends TCP_BYTES to guest B on host b across VXLAN
  (the test guest's TCP: `tcpsend=` / `tcpsink=`, a fixed 64 KiB window, MSS segments from
  the network's MTU, every byte checked by B), TCP_ROUNDS times, interleaved with as many
  iperf3 TCP runs of a second between the same two bare namespaces (the floor); medians.
- net.agent_restart_lost: B pings A every 10 ms while host a's compute node is killed
  (SIGKILL) and started again; packets B never got an answer for. Target 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from bench.compute import broker
from bench.figures import figure, say
from compute_node.net.dnsmasq import RUN_DIR, Dnsmasq, node_dir
from compute_node.vmm.frames import CONSOLE_LOG
from protos import routing
from protos.bindings import NetworkBinding, PortBinding
from protos.commands import (
    DefineDomain,
    DestroyDomain,
    GetDomainInfo,
    StartDomain,
    UndefineDomain,
)
from protos.domain import BootSpec, DomainSpec, NicSpec
from services.bus import Bus, RemoteError
from tests.integration.port_announcer import PortAnnouncer

UNDERLAY = {"a": "10.77.0.1", "b": "10.77.0.2"}
READY_ROUNDS = 7
TCP_ROUNDS = 3
TCP_BYTES = 32 << 20
LINGER_S = 60  # the nodes' net_linger_s: longer than port_ready's rounds take
NET = NetworkBinding(
    network_id=uuid.UUID("5e1f0000-0000-4000-8000-000000000bec"),
    name="benchnet",
    mode="isolated",
    mtu=1450,
    gateway=IPv4Interface("10.66.0.1/24"),
    vni=6600,
)


def ip(*args: str, ns: str | None = None) -> str:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def in_ns(ns: str, *argv: str, timeout: float = 60) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    ).stdout


@dataclass
class Host:
    role: str
    name: str
    ns: str
    state: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def queue(self) -> str:
        return routing.compute_queue(self.name)


class Lab:
    """The two hosts, the broker connection and what the bench made (all removed after)."""

    def __init__(self, url: str, root: Path, guest: Path) -> None:
        self.url = url
        self.guest = guest
        tag = uuid.uuid4().hex[:6]
        self.namespaces: list[str] = []
        self.hosts = {
            role: Host(role, f"bn{role}-{tag}", self.ns(f"bn{tag}-{role}"), root / role)
            for role in ("a", "b")
        }
        ip("link", "add", "under0", "netns", self.hosts["a"].ns, "type", "veth",
           "peer", "under0", "netns", self.hosts["b"].ns)  # fmt: skip
        for role, host in self.hosts.items():
            ip("addr", "add", f"{UNDERLAY[role]}/24", "dev", "under0", ns=host.ns)
            ip("link", "set", "under0", "up", ns=host.ns)
            host.state.mkdir()
        self.bus = Bus(url, source="bench-network").start(30)
        self.watcher = ThreadPoolExecutor(1, thread_name_prefix="console-watch")
        self.announcer = PortAnnouncer(
            Bus(url, source="bench-network-service").start(30), project="bench"
        ).start()

    def ns(self, name: str) -> str:
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("link", "set", "lo", "up", ns=name)
        return name

    def start(self, host: Host) -> None:
        log = (host.state / "compute.log").open("ab")
        env = {
            **os.environ,
            "FLOTILLA_NET_NETNS": host.ns,
            "FLOTILLA_NET_UNDERLAY": UNDERLAY[host.role],
            "FLOTILLA_HEARTBEAT_INTERVAL_S": "1",
            # port_ready's rounds on NET find it plumbed only while it lingers: pinned, so
            # an operator's setting cannot turn them into new-network rounds unseen.
            "FLOTILLA_NET_LINGER_S": str(LINGER_S),
        }
        # With FLOTILLA_BENCH_LOGS the nodes' logs are kept, at info: each start's
        # "ports plumbed" line says how long the network's apply, the plug and the
        # wait for the network service's answer took.
        level = "info" if os.environ.get("FLOTILLA_BENCH_LOGS") else "warning"
        host.proc = subprocess.Popen(
            [sys.executable, "-m", "compute_node.main", "--host", host.name, "--state-dir",
             str(host.state), "--amqp-url", self.url, "--log-level", level],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 60
        while True:
            try:
                self.bus.call(host.queue, GetDomainInfo(domain_id=uuid.UUID(int=0)), timeout=2)
            except RemoteError:
                return
            except Exception:
                if host.proc.poll() is not None or time.monotonic() > deadline:
                    tail = (host.state / "compute.log").read_text(errors="replace")[-2000:]
                    raise SystemExit(f"bench/network: compute node not serving:\n{tail}") from None
                time.sleep(0.05)

    def kill(self, host: Host) -> None:
        assert host.proc is not None
        host.proc.send_signal(signal.SIGKILL)
        host.proc.wait(10)

    def close(self) -> None:
        keep = os.environ.get("FLOTILLA_BENCH_LOGS")  # a directory for the nodes' logs
        if keep:
            for host in self.hosts.values():
                log = host.state / "compute.log"
                try:
                    shutil.copy(log, Path(keep) / f"compute-{host.role}.log")
                except OSError as exc:  # the nodes and namespaces are ended all the same
                    say(f"bench/network: {host.role}'s log not kept: {exc}")
        self.watcher.shutdown()
        self.announcer.stop()
        self.announcer.bus.close()
        self.bus.close()
        for host in self.hosts.values():
            if host.proc is not None and host.proc.poll() is None:
                host.proc.send_signal(signal.SIGTERM)
                try:
                    host.proc.wait(30)
                except subprocess.TimeoutExpired:
                    host.proc.kill()
            for pid_file in (host.state / "domains").glob("*/vmm.pid"):
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                except (ValueError, OSError):
                    pass
            Dnsmasq(host.state / "net", run_dir=node_dir(RUN_DIR, host.name, host.state)).stop_all()
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)

    # ---- the network service's part ---------------------------------------------------------

    def port(self, n: int, mac: str | None = None, net: NetworkBinding = NET) -> PortBinding:
        assert net.gateway is not None
        return PortBinding(
            port_id=uuid.uuid4(),
            network=net,
            mac=mac or f"52:54:00:{net.gateway.ip.packed[1]:02x}:00:{n:02x}",
            ipv4=IPv4Address(int(net.gateway.network.network_address) + n),
        )

    def bound(self, role: str, port: PortBinding) -> None:
        self.announcer.bound(port, self.hosts[role].name, UNDERLAY[role])

    def deleted(self, port: PortBinding) -> None:
        self.announcer.deleted(port)

    # ---- guests ------------------------------------------------------------------------------

    def _spec(self, port: PortBinding, cmdline: str) -> DomainSpec:
        return DomainSpec(
            name=f"g-{uuid.uuid4().hex[:8]}",
            memory_mib=64,
            boot=BootSpec(kernel=str(self.guest), cmdline=cmdline),
            nics=[NicSpec(network=port.network.name, mac=port.mac)],
        )

    def define(self, role: str, port: PortBinding, cmdline: str) -> uuid.UUID:
        """Define and start in one command, as the scheduler does (DefineDomain `and_start`)."""
        spec = self._spec(port, cmdline)
        define = DefineDomain(spec=spec, ports=[port], start=True, and_start=True)
        self.bus.call(self.hosts[role].queue, define, timeout=30)
        return spec.uuid

    def define_then_start(self, role: str, port: PortBinding, cmdline: str) -> uuid.UUID:
        """The two commands a scheduler older than DefineDomain 1.7 sent (BENCH_AB=1)."""
        spec = self._spec(port, cmdline)
        queue = self.hosts[role].queue
        self.bus.call(queue, DefineDomain(spec=spec, ports=[port]), timeout=30)
        self.bus.call(queue, StartDomain(domain_id=spec.uuid), timeout=30)
        return spec.uuid

    def remove(self, role: str, domain_id: uuid.UUID) -> None:
        queue = self.hosts[role].queue
        try:
            self.bus.call(queue, DestroyDomain(domain_id=domain_id), timeout=30)
        except RemoteError:
            pass  # it powered off by itself
        self.bus.call(queue, UndefineDomain(domain_id=domain_id), timeout=30)

    def console_nth(
        self, role: str, domain_id: uuid.UUID, pattern: str, n: int, timeout: float
    ) -> re.Match[str]:
        """The `n`th (from 0) match of `pattern` in the guest's console log."""
        path = self.hosts[role].state / "domains" / str(domain_id) / CONSOLE_LOG
        deadline = time.monotonic() + timeout
        while True:
            try:
                found = list(re.finditer(pattern, path.read_text(errors="replace")))
            except OSError:
                found = []
            if len(found) > n:
                return found[n]
            if time.monotonic() > deadline:
                return self.console(role, domain_id, f"{pattern}(?!)", 0)  # raises, with logs
            time.sleep(0.001)

    def console(
        self, role: str, domain_id: uuid.UUID, pattern: str, timeout: float
    ) -> re.Match[str]:
        """Wait for `pattern` in the guest's console log (polled every millisecond)."""
        path = self.hosts[role].state / "domains" / str(domain_id) / CONSOLE_LOG
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                text = ""
            found = rx.search(text)
            if found:
                return found
            time.sleep(0.001)
        logs = "".join(
            f"\n== {log}\n{log.read_text(errors='replace')[-8000:]}"
            for host in self.hosts.values()
            for log in [
                *(host.state / "net" / "dnsmasq").glob("*.log"),
                *(host.state / "domains").glob(f"*/{CONSOLE_LOG}"),
                host.state / "compute.log",
            ]
            if log.exists()
        )
        tables = "".join(
            f"\n== {host.ns}: {' '.join(argv)}\n" + in_ns(host.ns, *argv)
            for host in self.hosts.values()
            for argv in (["bridge", "fdb", "show"], ["ip", "neigh", "show"], ["ip", "-br", "link"])
        )
        raise SystemExit(
            f"bench/network: no {pattern!r} in {timeout} s:\n{text[-2000:]}{logs}{tables}"
        )

    def seen_at(
        self, role: str, domain_id: uuid.UUID, pattern: str, timeout: float
    ) -> Future[float]:
        """When `pattern` first shows in the guest's console log, polled every millisecond
        on a thread of its own."""
        path = self.hosts[role].state / "domains" / str(domain_id) / CONSOLE_LOG
        rx = re.compile(pattern)

        def watch() -> float:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    if rx.search(path.read_text(errors="replace")):
                        return time.perf_counter()
                except OSError:
                    pass
                time.sleep(0.001)
            return float("nan")

        return self.watcher.submit(watch)

    def bare(self, role: str, n: int) -> tuple[str, PortBinding]:
        """A bare namespace on host `role`'s bridge (a veth, no port chain) at 10.66.0.n,
        announced like a port so the other host can reach it."""
        host = self.hosts[role]
        ns = self.ns(f"{host.ns}-{n}")
        bridge = next(
            line.split(":")[1].strip()
            for line in ip("-o", "link", "show", "type", "bridge", ns=host.ns).splitlines()
        )
        ip("link", "add", f"bare{n}", "netns", host.ns, "type", "veth",
           "peer", "eth0", "netns", ns)  # fmt: skip
        ip("link", "set", f"bare{n}", "master", bridge, "mtu", "1450", "up", ns=host.ns)
        ip("link", "set", "eth0", "mtu", "1450", "up", ns=ns)
        ip("addr", "add", f"10.66.0.{n}/24", "dev", "eth0", ns=ns)
        mac = json.loads(ip("-j", "link", "show", "eth0", ns=ns))[0]["address"]
        port = self.port(n, mac=mac)
        self.bound(role, port)
        return ns, port


def rx_packets(ns: str) -> int:
    return int(
        json.loads(ip("-j", "-s", "link", "show", "eth0", ns=ns))[0]["stats64"]["rx"]["packets"]
    )


@contextmanager
def lab(guest: Path) -> Iterator[Lab]:
    with broker() as url, tempfile.TemporaryDirectory(prefix="flotilla-bench-nics-") as tmp:
        made = Lab(url, Path(tmp), guest)
        try:
            for host in made.hosts.values():
                made.start(host)
            yield made
        finally:
            made.close()


STAGES = ("define-and-start RPC", "A's DHCP lease", "B's first reply")


def fresh_network(n: int) -> NetworkBinding:
    """A network no host has plumbed yet (the `n`-th of a run): its own id, VNI and subnet."""
    return NetworkBinding(
        network_id=uuid.uuid4(),
        name=f"benchnet{n}",
        mode="isolated",
        mtu=1450,
        gateway=IPv4Interface(f"10.{67 + n}.0.1/24"),
        vni=6601 + n,
    )


Rounds = tuple[list[float], dict[str, list[float]]]


def _rounds() -> Rounds:
    return [], {name: [] for name in STAGES}


def port_ready(lab: Lab) -> tuple[Rounds, Rounds]:
    """READY_ROUNDS rounds on NET, which both hosts keep plumbed between rounds (each round
    removes its guests; the network lingers, `net_linger_s`), interleaved with as many on a
    network new to both hosts each round (its first port on host a: the network applied
    from nothing, its remote ports asked for). After one round on NET to plumb it."""
    ready, new = _rounds(), _rounds()
    ready_round(lab, NET, _rounds())  # NET plumbed on both hosts
    for n in range(READY_ROUNDS):
        ready_round(lab, NET, ready)
        ready_round(lab, fresh_network(n), new)
    return ready, new


# BENCH_AB=1: every other round of each kind with the flow older than DefineDomain 1.7
# (define, then start, then the ports bound), the medians of both printed (not a figure).
AB = os.environ.get("BENCH_AB") == "1"
AB_TIMES: dict[tuple[bool, bool], list[float]] = {}
_AB_COUNT: dict[str, int] = {}


def _flip(net: NetworkBinding) -> bool:
    kind = "plumbed" if net.name == NET.name else "new"
    _AB_COUNT[kind] = _AB_COUNT.get(kind, 0) + 1
    return _AB_COUNT[kind] % 2 == 1


def ready_round(lab: Lab, net: NetworkBinding, into: Rounds) -> None:
    """B (host b) pings A's address every ms; A is created on host a; the time from the
    define request to B's first reply, and when each stage ended (from the start, A's lease
    as its console shows it, polled every millisecond)."""
    times, stages = into
    pa, pb = lab.port(10, net=net), lab.port(20, net=net)
    lab.bound("b", pb)
    b = lab.define("b", pb, f"net=dhcp ping={pa.ipv4},60000,1")
    lab.console("b", b, r"NET up ", 30)
    old = AB and _flip(net)
    start = time.perf_counter()
    if old:
        a = lab.define_then_start("a", pa, "net=dhcp")
        started = time.perf_counter()
        lab.bound("a", pa)  # the older scheduler bound once the host took the domain
    else:
        # The scheduler binds the ports to the host beside its define and start (the
        # network service announces `port.bound`), and waits for both.
        binding = threading.Thread(target=lab.bound, args=("a", pa))
        binding.start()
        a = lab.define("a", pa, "net=dhcp")
        started = time.perf_counter()
        binding.join()
    leased = lab.seen_at("a", a, r"NET up ", 30)
    lab.console("b", b, r"PING first reply .*\n", 30)
    end = time.perf_counter()
    if AB:
        AB_TIMES.setdefault((net.name == NET.name, old), []).append(end - start)
    times.append(end - start)
    lease = leased.result()
    for name, at in zip(STAGES, [started, lease, end], strict=True):
        stages[name].append(at - start)
    lab.remove("b", b)
    lab.remove("a", a)
    lab.deleted(pa)
    lab.deleted(pb)


def start_without_nic(lab: Lab) -> tuple[list[float], list[float]]:
    """The same define and start RPCs for a guest without a NIC, to its `ready` line: what
    the host costs before any networking (this machine's load moves it a lot)."""
    times, started = [], []
    for _ in range(3):
        spec = DomainSpec(
            name=f"g-{uuid.uuid4().hex[:8]}",
            memory_mib=64,
            boot=BootSpec(kernel=str(lab.guest), cmdline="ready"),
        )
        queue = lab.hosts["a"].queue
        start = time.perf_counter()
        lab.bus.call(queue, DefineDomain(spec=spec, start=True, and_start=True), timeout=30)
        started.append(time.perf_counter() - start)
        lab.console("a", spec.uuid, r"READY .*\n", 30)
        times.append(time.perf_counter() - start)
        lab.remove("a", spec.uuid)
    return times, started


def restart_lost(lab: Lab) -> tuple[int, int]:
    """(lost, sent) of 1000 pings 10 ms apart across a kill -9 and restart of host a's node."""
    pa, pb = lab.port(11), lab.port(21)
    lab.bound("a", pa)
    lab.bound("b", pb)
    a = lab.define("a", pa, "net=dhcp")
    lab.console("a", a, r"NET up ", 30)
    b = lab.define("b", pb, "net=dhcp ping=10.66.0.11,5,100 ping=10.66.0.11,1000,10")
    lab.console("b", b, r"PING to=10\.66\.0\.11 sent=5 ", 30)
    time.sleep(1.0)
    lab.kill(lab.hosts["a"])
    time.sleep(1.0)
    lab.start(lab.hosts["a"])
    done = lab.console("b", b, r"PING to=10\.66\.0\.11 sent=1000 received=(\d+) lost=(\d+)\n", 60)
    lab.remove("b", b)
    lab.remove("a", a)
    return int(done.group(2)), 1000


def throughput(lab: Lab) -> dict[str, float]:
    """Guest UDP pps to a bare namespace on host b, and iperf3's floor between two bare
    namespaces on the two bridges (UDP pps, TCP Gbit/s)."""
    pa, pb = lab.port(12), lab.port(22)
    lab.bound("a", pa)
    lab.bound("b", pb)
    a = lab.define("a", pa, "net=dhcp")
    lab.console("a", a, r"NET up ", 30)
    b = lab.define("b", pb, "net=dhcp")  # keeps host b's end of the network up
    lab.console("b", b, r"NET up ", 30)
    sink, _ = lab.bare("b", 99)
    floor_a, _ = lab.bare("a", 98)
    # The guest's sender: netbench from a fresh guest whose only job it is.
    count = 200_000
    before = rx_packets(sink)
    g = lab.define("a", lab.port(13), f"net=dhcp netbench=10.66.0.99:9,{count}")
    sent = lab.console("a", g, r"NETBENCH packets=(\d+) bytes=\d+ ns=(\d+)\n", 120)
    time.sleep(0.5)
    received = rx_packets(sink) - before
    seconds = int(sent.group(2)) / 1e9
    guest_pps = received / seconds
    say(f"  guest: {received} of {count} datagrams in {seconds:.3f} s")
    server = subprocess.Popen(
        ["ip", "netns", "exec", sink, "iperf3", "-s", "-1", "-B", "10.66.0.99"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.5)
    udp = json.loads(in_ns(floor_a, "iperf3", "-c", "10.66.0.99", "-u", "-l", "64", "-b", "0",
                           "-t", "3", "-J"))  # fmt: skip
    server.wait(10)
    end = udp["end"]["sum"]
    floor_pps = (end["packets"] - end["lost_packets"]) / end["seconds"]
    for domain_id in (g, a):
        lab.remove("a", domain_id)
    lab.remove("b", b)
    guest_gbps, floor_gbps = tcp_rounds(lab, sink, floor_a)
    return {
        "guest_pps": guest_pps,
        "floor_pps": floor_pps,
        "guest_gbps": statistics.median(guest_gbps),
        "floor_gbps": statistics.median(floor_gbps),
    }


def tcp_rounds(lab: Lab, sink: str, floor_a: str) -> tuple[list[float], list[float]]:
    """TCP_ROUNDS transfers of TCP_BYTES from a guest on host a to a guest on host b (a
    sink that checks every byte), each followed by a second of iperf3 TCP between the two
    bare namespaces; Gbit/s of each."""
    pb = lab.port(24)
    lab.bound("b", pb)
    rx = lab.define("b", pb, " ".join(["net=dhcp", *["tcpsink=5001"] * TCP_ROUNDS]))
    lab.console("b", rx, r"TCP listening port=5001\n", 30)
    guest, floor = [], []
    for n in range(TCP_ROUNDS):
        pa = lab.port(14 + n)
        lab.bound("a", pa)
        sender = lab.define("a", pa, f"net=dhcp tcpsend={pb.ipv4}:5001,{TCP_BYTES}")
        sent = lab.console("a", sender, r"TCP (sent|FAILED) bytes=(\d+) ns=(\d+) .*\n", 120)
        lab.remove("a", sender)
        lab.deleted(pa)
        got = lab.console_nth("b", rx, r"TCP received bytes=(\d+) bad=(\d+) .*\n", n, 30)
        if sent.group(1) != "sent" or int(got.group(1)) != TCP_BYTES or got.group(2) != "0":
            raise RuntimeError(f"TCP transfer failed: {sent.group(0)!r}, {got.group(0)!r}")
        guest.append(TCP_BYTES * 8 / int(sent.group(3)))
        server = subprocess.Popen(
            ["ip", "netns", "exec", sink, "iperf3", "-s", "-1", "-B", "10.66.0.99"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.5)
        run = json.loads(in_ns(floor_a, "iperf3", "-c", "10.66.0.99", "-t", "1", "-J"))
        server.wait(10)
        floor.append(run["end"]["sum_received"]["bits_per_second"] / 1e9)
        say(f"  TCP round {n + 1}: guest {guest[-1]:.3f} Gbit/s ({sent.group(0).strip()}), "
            f"bare namespaces {floor[-1]:.2f} Gbit/s")  # fmt: skip
    lab.remove("b", rx)
    lab.deleted(pb)
    return guest, floor


def measure(guest: Path, ready_only: bool = False) -> list[dict[str, object]]:
    with lab(guest) as made:
        bare_start, bare_started = start_without_nic(made)
        (ready, stages), (new, new_stages) = port_ready(made)
        if ready_only:
            lost, sent, rates = 0, 0, {}
        else:
            lost, sent = restart_lost(made)
            rates = throughput(made)
    for (plumbed, old), values in sorted(AB_TIMES.items()):
        say(f"BENCH_AB {'plumbed' if plumbed else 'new network'}, "
            f"{'define then start, bound after' if old else 'one command, bound beside'}: "
            f"p50 {statistics.median(values) * 1e3:.1f} ms over {len(values)}")  # fmt: skip
    no_nic_ms = statistics.median(bare_start) * 1e3
    say(f"a guest without a NIC from define to ready: p50 {no_nic_ms:.1f} ms; the start RPC "
        f"returned at {statistics.median(bare_started) * 1e3:.1f} ms")  # fmt: skip
    figures = []
    for metric, what, times, stage_times in (
        ("net.port_ready_p50", "its network plumbed on both hosts", ready, stages),
        ("net.port_ready_new_network_p50", "a network new to both hosts", new, new_stages),
    ):
        ms = statistics.median(times) * 1e3
        say(f"{metric} ({READY_ROUNDS} rounds, {what}): p50 {ms:.1f} ms "
            f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})")  # fmt: skip
        ends = {name: statistics.median(v) * 1e3 for name, v in stage_times.items()}
        say("  stage ends (medians, ms from the define request): "
            + ", ".join(f"{name} {at:.1f}" for name, at in ends.items()))  # fmt: skip
        figures.append(
            figure(
                metric,
                ms,
                "ms",
                anchor="Neutron+OVN published port bind",
                anchor_value=5800.0,
                target="<= 50 ms",
                no_nic_define_to_ready_ms=round(no_nic_ms, 1),
                stage_ends_ms={name: round(at, 1) for name, at in ends.items()},
            )
        )
    if ready_only:
        return figures
    say(f"net.agent_restart_lost: {lost} of {sent} pings 10 ms apart across kill -9 + restart")
    say(f"net.guest_udp_pps: guest {rates['guest_pps']:.0f} pps, "
        f"bare namespaces (iperf3) {rates['floor_pps']:.0f} pps")  # fmt: skip
    say(f"net.guest_tcp_gbps: guest to guest {rates['guest_gbps']:.3f} Gbit/s, "
        f"bare namespaces (iperf3) {rates['floor_gbps']:.2f} Gbit/s")  # fmt: skip
    return [
        *figures,
        figure(
            "net.guest_udp_pps",
            rates["guest_pps"],
            "pps",
            anchor="iperf3 UDP between bare namespaces, same path",
            anchor_value=rates["floor_pps"],
            target="report the ratio",
        ),
        figure(
            "net.guest_tcp_gbps",
            rates["guest_gbps"],
            "Gbit/s",
            anchor="iperf3 TCP between bare namespaces, same path",
            anchor_value=rates["floor_gbps"],
            target="report the ratio",
        ),
        figure(
            "net.agent_restart_lost",
            float(lost),
            "packets",
            anchor="packets sent",
            anchor_value=float(sent),
            target="0",
        ),
    ]
