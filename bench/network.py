"""Network benchmarks: plugging one port, in-process against subprocesses; then guests on
two hosts (bench/network_guests.py: port ready, guest UDP against the bare-namespace floor,
packets lost across a compute node restart).

    python bench/network.py            (root; needs ip, nft, libnftables1, and for the guest
                                        figures KVM, rabbitmq-server (or FLOTILLA_AMQP_URL),
                                        dnsmasq and iperf3)
    python bench/network.py --plug     (only net.port_plug_p50)
    python bench/network.py --ready    (net.port_plug_p50 and net.port_ready_p50 only)

net.port_plug_p50: the steps that give one guest NIC its host side -- a persistent tap owned
by the VMM user, attached to the network's bridge with the MTU set and up, and its
anti-spoofing rules -- done by `Plumber.plug` in-process (the tap ioctls, one libnftables
JSON batch adding the port's chain, rules and map entry, one rtnetlink request packed by
compute_node/net/rtnl.py) against the same steps as the `ip`/`nft` subprocesses libvirt and
Neutron's linuxbridge agent run (`ip tuntap add`, `ip link set ... master ... mtu ... up`,
`nft -f -` with the same rules and map entry). Both run in one network namespace the bench creates
(the main thread enters it, so subprocesses start there too) and deletes; rounds are
interleaved, and each path's port is removed again, untimed.

Human-readable results go to stderr; stdout ends with one JSON object per figure.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.figures import emit, figure, say  # noqa: E402
from compute_node.net import (  # noqa: E402
    NetworkMode,
    NetworkPlumbing,
    Plumber,
    PortPlumbing,
    netns,
)

ROUNDS = 40
WARMUP = 3
MTU = 1450
RA_AND_REDIRECT = " nd-router-advert, nd-redirect "


def nft_text(port: PortPlumbing, chain: str) -> str:
    """The port's rules in nft syntax: what a subprocess-driven agent feeds `nft -f -`."""
    ip = str(port.ipv4)
    return "\n".join(
        [
            f"add chain bridge flotilla {chain}",
            f"add rule bridge flotilla {chain} ether saddr != {port.mac} drop",
            f"add rule bridge flotilla {chain} ether type vlan drop",
            f"add rule bridge flotilla {chain} arp saddr ether != {port.mac} drop",
            f"add rule bridge flotilla {chain} arp saddr ip != {{ 0.0.0.0, {ip} }} drop",
            f"add rule bridge flotilla {chain} udp sport 67 drop",
            f"add rule bridge flotilla {chain} udp sport 547 drop",
            f"add rule bridge flotilla {chain} ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept",
            f"add rule bridge flotilla {chain} ip saddr != {ip} drop",
            f"add rule bridge flotilla {chain} icmpv6 type {{{RA_AND_REDIRECT}}} drop",
            f"add rule bridge flotilla {chain} ether type != {{ ip, arp, ip6 }} drop",
            f'add element bridge flotilla ports {{ "{port.tap}" : jump {chain} }}',
            "",
        ]
    )


def run(argv: list[str], stdin: str | None = None) -> None:
    subprocess.run(argv, input=stdin, text=True, check=True, capture_output=True)


def subprocess_plug(port: PortPlumbing, bridge: str, uid: int, gid: int) -> float:
    chain = "sub-" + port.tap[4:]
    start = time.perf_counter()
    run(["ip", "tuntap", "add", "dev", port.tap, "mode", "tap", "user", str(uid),
         "group", str(gid)])  # fmt: skip
    run(["ip", "link", "set", "dev", port.tap, "master", bridge, "mtu", str(MTU), "up"])
    run(["nft", "-f", "-"], nft_text(port, chain))
    elapsed = time.perf_counter() - start
    run(["ip", "link", "del", port.tap])
    run(
        ["nft", "-f", "-"],
        f'delete element bridge flotilla ports {{ "{port.tap}" }}\n'
        f"flush chain bridge flotilla {chain}\ndelete chain bridge flotilla {chain}\n",
    )
    return elapsed


def main() -> int:
    if os.geteuid() != 0:
        say("bench/network: needs root (network namespaces, taps, nftables)")
        return 2
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            say(f"bench/network: `{tool}` is not installed; it is this benchmark's anchor")
            return 2
    name = "flbench-" + uuid.uuid4().hex[:8]
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        with TemporaryDirectory(prefix="flotilla-bench-net-") as tmp, netns.inside(name):
            figures = [measure(Path(tmp))]
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    if "--plug" not in sys.argv[1:]:
        figures += guest_figures()
    emit(figures)
    return 0


def guest_figures() -> list[dict[str, object]]:
    from bench import network_guests
    from native import kvm_unavailable_reason, testguest

    reason = kvm_unavailable_reason()
    if reason is not None or shutil.which("iperf3") is None:
        say(f"bench/network: guest figures skipped: {reason or 'iperf3 is not installed'}")
        return []
    return network_guests.measure(testguest.build(), ready_only="--ready" in sys.argv[1:])


def measure(state: Path) -> dict[str, object]:
    uid, gid = os.getuid(), os.getgid()
    network = NetworkPlumbing(
        network_id="bench-net",
        mode=NetworkMode.ISOLATED,
        gateway=IPv4Interface("10.99.0.1/16"),
        mtu=MTU,
        dhcp=False,  # the plug path only: taps, bridge, rules
    )
    ours: list[float] = []
    theirs: list[float] = []
    with Plumber(state, tap_uid=uid, tap_gid=gid) as plumber:
        plumber.apply(network)
        for i in range(WARMUP + ROUNDS):
            port = PortPlumbing(
                port_id=f"ours-{i}",
                network_id=network.network_id,
                mac=f"52:54:00:00:{i // 256:02x}:{i % 256:02x}",
                ipv4=IPv4Address("10.99.1.0") + i,
            )
            start = time.perf_counter()
            plumber.plug(port)
            elapsed = time.perf_counter() - start
            plumber.unplug(port.port_id)
            other = port.model_copy(update={"port_id": f"subprocess-{i}"})
            sub = subprocess_plug(other, network.bridge, uid, gid)
            if i >= WARMUP:
                ours.append(elapsed)
                theirs.append(sub)
    ours_ms = statistics.median(ours) * 1e3
    theirs_ms = statistics.median(theirs) * 1e3
    say(f"net.port_plug ({ROUNDS} interleaved rounds, medians)")
    say(f"  ours (tap ioctls + rtnetlink + libnftables JSON) {ours_ms:7.3f} ms"
        f"  (min {min(ours) * 1e3:.3f}, max {max(ours) * 1e3:.3f})")  # fmt: skip
    say(f"  ip/nft subprocesses                             {theirs_ms:7.3f} ms"
        f"  (min {min(theirs) * 1e3:.3f}, max {max(theirs) * 1e3:.3f})")  # fmt: skip
    return figure(
        "net.port_plug_p50",
        ours_ms,
        "ms",
        anchor="ip+nft subprocesses",
        anchor_value=theirs_ms,
        target="<= 2 ms and ratio <= 0.2",
    )


if __name__ == "__main__":
    sys.exit(main())
