"""`flotilla up`'s default network: libvirt's 192.168.122.0/24 unless a route of the host
overlaps it, then the first free /24 after it, saying why."""

from __future__ import annotations

from ipaddress import IPv4Network
from pathlib import Path

from services.cli.default_network import PREFERRED, host_routes, pick

# /proc/net/route as the kernel writes it: a default route, a LAN, and our own bridge.
ROUTES = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
flb-0f407b04\t0000420A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
virbr0\t007AA8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
"""


def test_routes_are_read_without_the_default_route(tmp_path: Path) -> None:
    path = tmp_path / "route"
    path.write_text(ROUTES)
    assert host_routes(path) == [
        ("eth0", IPv4Network("192.0.2.0/24")),
        ("flb-0f407b04", IPv4Network("10.66.0.0/24")),
        ("virbr0", IPv4Network("192.168.122.0/24")),
    ]
    assert host_routes(tmp_path / "absent") == []


def test_the_preferred_subnet_when_free() -> None:
    assert pick([("eth0", IPv4Network("192.0.2.0/24"))]) == (PREFERRED, None)
    # A previous run's own bridge is no conflict.
    assert pick([("flb-00000000", PREFERRED)]) == (PREFERRED, None)


def test_an_overlap_picks_the_next_free_subnet_and_says_why() -> None:
    subnet, why = pick(
        [("virbr0", IPv4Network("192.168.122.0/24")), ("vpn0", IPv4Network("192.168.123.0/25"))]
    )
    assert subnet == IPv4Network("192.168.124.0/24")
    assert why == "192.168.122.0/24 overlaps 192.168.122.0/24 (route on virbr0)"
