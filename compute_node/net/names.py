"""Interface names derived from ids, deterministically, within Linux's 15 characters.

`flb-<8 hex>` bridge, `flv-<8 hex>` VXLAN, `flt-<8 hex>` tap. The 8 hex digits are the
first 32 bits of the id's SHA-256, so any id (uuid or not) maps to the same name on every
host and after every restart, and names of different kinds never collide.
"""

from __future__ import annotations

import hashlib
import re

IFNAMSIZ = 15  # usable characters of a Linux interface name
BRIDGE_PREFIX = "flb-"
VXLAN_PREFIX = "flv-"
TAP_PREFIX = "flt-"
PREFIXES = (BRIDGE_PREFIX, VXLAN_PREFIX, TAP_PREFIX)
OWNED = re.compile(r"^fl[bvt]-[0-9a-f]{8}$")


def short_id(entity_id: str) -> str:
    """8 hex digits naming `entity_id` in interface, chain and file names."""
    if not entity_id:
        raise ValueError("an empty id has no short id")
    return hashlib.sha256(entity_id.encode()).hexdigest()[:8]


def bridge_name(network_id: str) -> str:
    return BRIDGE_PREFIX + short_id(network_id)


def vxlan_name(network_id: str) -> str:
    return VXLAN_PREFIX + short_id(network_id)


def tap_name(port_id: str) -> str:
    return TAP_PREFIX + short_id(port_id)


def is_owned(ifname: str) -> bool:
    """Whether a link of this name is one Flotilla creates (and so may remove)."""
    return OWNED.fullmatch(ifname) is not None


def valid_ifname(name: str) -> bool:
    """Linux's rules for an interface name: 1-15 characters, no '/', ':' or whitespace."""
    return (
        0 < len(name) <= IFNAMSIZ
        and name not in {".", ".."}
        and not any(c in name for c in "/: \t\n")
    )
