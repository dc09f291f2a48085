"""Per-host network plumbing: bridges, taps, VXLAN, nftables and dnsmasq (docs/network.md)."""

from compute_node.net.models import (
    HostPlumbing,
    NetworkMode,
    NetworkPlumbing,
    PortPlumbing,
    RemoteVtep,
    overlay_mtu,
)
from compute_node.net.plumber import Plumber, PlumbingError, Report, Underlay

__all__ = [
    "HostPlumbing",
    "NetworkMode",
    "NetworkPlumbing",
    "Plumber",
    "PlumbingError",
    "PortPlumbing",
    "RemoteVtep",
    "Report",
    "Underlay",
    "overlay_mtu",
]
