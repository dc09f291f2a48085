"""The lean RTM_NEWLINK decoder (compute_node/net/rtnl.py) against pyroute2's encoder: the
fields the plumbing reads, for a bridge port, a VXLAN link and a link with no kind."""

from __future__ import annotations

import pytest
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from compute_node.net.rtnl import RTM_NEWLINK, LinkMessage, parse_link


def encoded(index: int, flags: int, attrs: list[tuple[str, object]]) -> bytes:
    msg = ifinfmsg()
    msg["index"] = index
    msg["flags"] = flags
    msg["attrs"] = attrs
    msg["header"]["type"] = RTM_NEWLINK
    msg.encode()
    return bytes(msg.data)


def test_a_vxlan_link_on_a_bridge() -> None:
    data = encoded(
        7,
        0x1,
        [
            ("IFLA_IFNAME", "flv-80bed2c0"),
            ("IFLA_MTU", 1450),
            ("IFLA_MASTER", 5),
            ("IFLA_STATS64", {}),  # what the decoder skips
            (
                "IFLA_LINKINFO",
                {
                    "attrs": [
                        ("IFLA_INFO_KIND", "vxlan"),
                        (
                            "IFLA_INFO_DATA",
                            {
                                "attrs": [
                                    ("IFLA_VXLAN_ID", 6600),
                                    ("IFLA_VXLAN_LINK", 3),
                                    ("IFLA_VXLAN_LOCAL", "10.77.0.1"),
                                    ("IFLA_VXLAN_TTL", 0),
                                    ("IFLA_VXLAN_LEARNING", 0),
                                    ("IFLA_VXLAN_PROXY", 1),
                                    ("IFLA_VXLAN_PORT", 4789),
                                ]
                            },
                        ),
                    ]
                },
            ),
        ],
    )
    assert parse_link(data, 0, len(data)) == LinkMessage(
        ifindex=7,
        flags=0x1,
        name="flv-80bed2c0",
        mtu=1450,
        master=5,
        kind="vxlan",
        vni=6600,
        vxlan_link=3,
        vxlan_local="10.77.0.1",
        vxlan_learning=False,
    )


def test_a_bridge_and_a_plain_link_in_one_buffer() -> None:
    bridge = encoded(
        5,
        0x1003,
        [
            ("IFLA_IFNAME", "flb-80bed2c0"),
            ("IFLA_MTU", 1450),
            ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "bridge")]}),
        ],
    )
    plain = encoded(1, 0, [("IFLA_IFNAME", "lo"), ("IFLA_MTU", 65536)])
    pad = b"\0" * (-len(bridge) % 4)
    data = bridge + pad + plain
    first = parse_link(data, 0, len(bridge))
    assert (first.ifindex, first.name, first.kind, first.master, first.vni) == (
        5,
        "flb-80bed2c0",
        "bridge",
        None,
        None,
    )
    second = parse_link(data, len(bridge) + len(pad), len(plain))
    assert (second.name, second.mtu, second.kind, second.flags) == ("lo", 65536, None, 0)


def test_an_attribute_running_past_its_message_is_refused() -> None:
    data = bytearray(encoded(2, 0, [("IFLA_IFNAME", "eth0"), ("IFLA_MTU", 1500)]))
    # The last attribute (IFLA_MTU, 8 bytes) claims 12.
    data[-8:-6] = (12).to_bytes(2, "little")
    with pytest.raises(Exception, match="malformed"):
        parse_link(bytes(data), 0, len(data))
