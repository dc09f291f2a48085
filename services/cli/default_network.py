"""The subnet of `flotilla up`'s shared `default` network: libvirt's 192.168.122.0/24 unless
the host already routes something overlapping it (a LAN, a VPN, libvirt's own virbr0), then
the first free /24 after it."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable
from ipaddress import IPv4Network
from pathlib import Path

PREFERRED = IPv4Network("192.168.122.0/24")
ROUTES = Path("/proc/net/route")


def host_routes(path: Path = ROUTES) -> list[tuple[str, IPv4Network]]:
    """(interface, destination) of every IPv4 route of the main table but the default one:
    each address's own subnet is among them (the kernel's prefix route)."""
    found = []
    try:
        lines = path.read_text().splitlines()[1:]
    except OSError:
        return []
    for line in lines:
        parts = line.split()
        if len(parts) < 8:
            continue
        # Little-endian hex, as the kernel writes them.
        dest = socket.inet_ntoa(struct.pack("<I", int(parts[1], 16)))
        mask = socket.inet_ntoa(struct.pack("<I", int(parts[7], 16)))
        network = IPv4Network(f"{dest}/{mask}", strict=False)
        if network.prefixlen:
            found.append((parts[0], network))
    return found


def pick(routes: Iterable[tuple[str, IPv4Network]]) -> tuple[IPv4Network, str | None]:
    """The default network's subnet, and why it is not the preferred one (None if it is).
    Our own bridges (`flb-…`, a previous run's) do not count."""
    taken = [(dev, net) for dev, net in routes if not dev.startswith("flb-")]

    def clash(candidate: IPv4Network) -> tuple[str, IPv4Network] | None:
        return next(((d, n) for d, n in taken if n.overlaps(candidate)), None)

    first = clash(PREFERRED)
    if first is None:
        return PREFERRED, None
    for third in [*range(123, 256), *range(122)]:
        candidate = IPv4Network(f"192.168.{third}.0/24")
        if clash(candidate) is None:
            dev, net = first
            return candidate, f"{PREFERRED} overlaps {net} (route on {dev})"
    raise RuntimeError("every 192.168.x.0/24 overlaps a route of this host")
