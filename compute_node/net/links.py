"""Links, addresses and VXLAN forwarding entries over netlink (pyroute2), in one namespace.

`Links` holds one rtnetlink socket made inside the namespace, so every call acts there
without entering it again. Reads return small frozen records; writes are idempotent where
the kernel allows (`replace`, `append`)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from compute_node.net import netns
from compute_node.net.models import VXLAN_PORT

ENODEV = 19
EEXIST = 17
IFF_UP = 1
NUD_PERMANENT = 0x80
ZERO_MAC = "00:00:00:00:00:00"


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str | None
    master: int | None
    mtu: int
    up: bool
    vni: int | None = None
    vxlan_local: str | None = None
    vxlan_learning: bool | None = None
    vxlan_link: int | None = None


@dataclass(frozen=True)
class Fdb:
    """A VXLAN forwarding entry: frames for `mac` go to the host at `dst`."""

    mac: str
    dst: str


def _link(msg: Any) -> Link:
    kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    data = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA") if kind == "vxlan" else None
    master = msg.get("master")
    return Link(
        index=msg["index"],
        name=msg.get("ifname"),
        kind=kind,
        master=master or None,
        mtu=msg.get("mtu"),
        up=bool(msg["flags"] & IFF_UP),
        vni=None if data is None else data.get("IFLA_VXLAN_ID"),
        vxlan_local=None if data is None else data.get("IFLA_VXLAN_LOCAL"),
        vxlan_learning=None if data is None else bool(data.get("IFLA_VXLAN_LEARNING")),
        vxlan_link=None if data is None else data.get("IFLA_VXLAN_LINK"),
    )


class Links:
    def __init__(self, netns_name: str | None = None) -> None:
        with netns.inside(netns_name):
            self._ipr = IPRoute()

    def close(self) -> None:
        self._ipr.close()

    # reads
    def get(self, name: str) -> Link | None:
        try:
            return _link(self._ipr.link("get", ifname=name)[0])
        except NetlinkError as exc:
            if exc.code == ENODEV:
                return None
            raise

    def all(self) -> dict[str, Link]:
        links = (_link(m) for m in self._ipr.get_links())
        return {link.name: link for link in links}

    def addresses(self, index: int) -> set[IPv4Interface]:
        return {
            IPv4Interface(f"{m.get('address')}/{m['prefixlen']}")
            for m in self._ipr.get_addr(family=socket.AF_INET, index=index)
        }

    def fdb(self, index: int) -> set[Fdb]:
        """The entries with a remote destination on a VXLAN link (the static ones we push)."""
        found = set()
        for m in self._ipr.fdb("dump", ifindex=index):
            if m["ifindex"] == index and m.get("dst") is not None:
                found.add(Fdb(m.get("lladdr"), m.get("dst")))
        return found

    def neighbours(self, index: int) -> dict[IPv4Address, str]:
        return {
            IPv4Address(m.get("dst")): m.get("lladdr")
            for m in self._ipr.get_neighbours(family=socket.AF_INET, ifindex=index)
            if m["state"] & NUD_PERMANENT
        }

    # writes
    def add_bridge(self, name: str, mtu: int) -> None:
        self._ipr.link("add", ifname=name, kind="bridge", mtu=mtu)

    def add_vxlan(self, name: str, vni: int, local: IPv4Address, underlay: int) -> None:
        self._ipr.link(
            "add",
            ifname=name,
            kind="vxlan",
            vxlan_id=vni,
            vxlan_local=str(local),
            vxlan_link=underlay,
            vxlan_port=VXLAN_PORT,
            vxlan_learning=0,
            vxlan_proxy=1,  # answer ARP from the pushed neighbour entries
        )

    def set(self, index: int, **changes: Any) -> None:
        """`master=`, `mtu=`, `state="up"`: one request."""
        self._ipr.link("set", index=index, **changes)

    def delete(self, index: int) -> None:
        try:
            self._ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code != ENODEV:
                raise

    def add_address(self, index: int, address: IPv4Interface) -> None:
        try:
            self._ipr.addr(
                "add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen
            )
        except NetlinkError as exc:
            if exc.code != EEXIST:
                raise

    def del_address(self, index: int, address: IPv4Interface) -> None:
        self._ipr.addr(
            "del", index=index, address=str(address.ip), prefixlen=address.network.prefixlen
        )

    def fdb_append(self, index: int, entry: Fdb) -> None:
        try:
            self._ipr.fdb("append", ifindex=index, lladdr=entry.mac, dst=entry.dst)
        except NetlinkError as exc:
            if exc.code != EEXIST:
                raise

    def fdb_del(self, index: int, entry: Fdb) -> None:
        try:
            self._ipr.fdb("del", ifindex=index, lladdr=entry.mac, dst=entry.dst)
        except NetlinkError as exc:
            if exc.code not in {ENODEV, 2}:  # ENOENT: already gone
                raise

    def neigh_replace(self, index: int, ip: IPv4Address, mac: str) -> None:
        self._ipr.neigh("replace", dst=str(ip), lladdr=mac, ifindex=index, state=NUD_PERMANENT)

    def neigh_del(self, index: int, ip: IPv4Address) -> None:
        try:
            self._ipr.neigh("del", dst=str(ip), ifindex=index)
        except NetlinkError as exc:
            if exc.code not in {ENODEV, 2}:
                raise
