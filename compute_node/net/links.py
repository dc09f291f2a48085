"""Links, addresses and VXLAN forwarding entries over netlink, in one namespace.

`Links` holds one rtnetlink socket made inside the namespace (compute_node/net/rtnl.py:
pyroute2's message classes on a synchronous socket), so every call acts there without
entering it again. Reads return small frozen records; writes are idempotent where the
kernel allows (`replace`, `append`)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg

from compute_node.net.models import VXLAN_PORT
from compute_node.net.rtnl import (
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELNEIGH,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETNEIGH,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    LinkMessage,
    Rtnl,
)

ENODEV = 19
ENOENT = 2
EEXIST = 17
IFF_UP = 1
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
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


def _link(msg: LinkMessage) -> Link:
    return Link(
        index=msg.ifindex,
        name=msg.name or "",
        kind=msg.kind,
        master=msg.master or None,
        mtu=msg.mtu or 0,
        up=bool(msg.flags & IFF_UP),
        vni=msg.vni,
        vxlan_local=msg.vxlan_local,
        vxlan_learning=msg.vxlan_learning,
        vxlan_link=msg.vxlan_link,
    )


class Links:
    def __init__(self, netns_name: str | None = None) -> None:
        self._rtnl = Rtnl(netns_name)

    def close(self) -> None:
        self._rtnl.close()

    # reads
    def get(self, name: str) -> Link | None:
        msg = ifinfmsg()
        msg["attrs"] = [("IFLA_IFNAME", name)]
        try:
            found = self._rtnl.request(msg, RTM_GETLINK)
        except NetlinkError as exc:
            if exc.code == ENODEV:
                return None
            raise
        return _link(found[0]) if found else None

    def all(self) -> dict[str, Link]:
        links = (_link(m) for m in self._rtnl.dump(ifinfmsg(), RTM_GETLINK))
        return {link.name: link for link in links}

    def addresses(self, index: int) -> set[IPv4Interface]:
        msg = ifaddrmsg()
        msg["family"] = socket.AF_INET
        return {
            IPv4Interface(f"{m.get('IFA_ADDRESS')}/{m['prefixlen']}")
            for m in self._rtnl.dump(msg, RTM_GETADDR)
            if m["index"] == index
        }

    def fdb(self, index: int) -> set[Fdb]:
        """The entries with a remote destination on a VXLAN link (the static ones we push)."""
        found = set()
        for m in self._rtnl.dump(_ndmsg(socket.AF_BRIDGE, index), RTM_GETNEIGH):
            if m["ifindex"] == index and m.get("NDA_DST") is not None:
                found.add(Fdb(m.get("NDA_LLADDR"), m.get("NDA_DST")))
        return found

    def neighbours(self, index: int) -> dict[IPv4Address, str]:
        return {
            IPv4Address(m.get("NDA_DST")): m.get("NDA_LLADDR")
            for m in self._rtnl.dump(_ndmsg(socket.AF_INET, index), RTM_GETNEIGH)
            if m["ifindex"] == index and m["state"] & NUD_PERMANENT
        }

    # writes
    def add_bridge(self, name: str, mtu: int) -> None:
        """A new bridge, MTU `mtu`, up (one request; EEXIST if the name is taken)."""
        self._create(name, mtu, None, {"attrs": [("IFLA_INFO_KIND", "bridge")]})

    def add_vxlan(
        self, name: str, vni: int, local: IPv4Address, underlay: int, *, master: int, mtu: int
    ) -> None:
        """A new VXLAN link on `master`, MTU `mtu`, up (one request): learning off, ARP
        answered from the pushed neighbour entries."""
        data = [
            ("IFLA_VXLAN_ID", vni),
            ("IFLA_VXLAN_LOCAL", str(local)),
            ("IFLA_VXLAN_LINK", underlay),
            ("IFLA_VXLAN_PORT", VXLAN_PORT),
            ("IFLA_VXLAN_LEARNING", 0),
            ("IFLA_VXLAN_PROXY", 1),
        ]
        info = {"attrs": [("IFLA_INFO_KIND", "vxlan"), ("IFLA_INFO_DATA", {"attrs": data})]}
        self._create(name, mtu, master, info)

    def _create(self, name: str, mtu: int, master: int | None, info: dict[str, Any]) -> None:
        msg = ifinfmsg()
        msg["flags"] = msg["change"] = IFF_UP
        attrs: list[tuple[str, Any]] = [("IFLA_IFNAME", name), ("IFLA_MTU", mtu)]
        if master is not None:
            attrs.append(("IFLA_MASTER", master))
        msg["attrs"] = [*attrs, ("IFLA_LINKINFO", info)]
        self._rtnl.request(msg, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL)

    def set(
        self, index: int, *, master: int | None = None, mtu: int | None = None, up: bool = False
    ) -> None:
        """Whichever of master, MTU and up is given: one request."""
        msg = ifinfmsg()
        msg["index"] = index
        if up:
            msg["flags"] = msg["change"] = IFF_UP
        attrs: list[tuple[str, Any]] = []
        if mtu is not None:
            attrs.append(("IFLA_MTU", mtu))
        if master is not None:
            attrs.append(("IFLA_MASTER", master))
        msg["attrs"] = attrs
        self._rtnl.request(msg, RTM_NEWLINK)

    def delete(self, index: int) -> None:
        msg = ifinfmsg()
        msg["index"] = index
        try:
            self._rtnl.request(msg, RTM_DELLINK)
        except NetlinkError as exc:
            if exc.code != ENODEV:
                raise

    def add_address(self, index: int, address: IPv4Interface) -> None:
        try:
            self._rtnl.request(_ifaddr(index, address), RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL)
        except NetlinkError as exc:
            if exc.code != EEXIST:
                raise

    def del_address(self, index: int, address: IPv4Interface) -> None:
        self._rtnl.request(_ifaddr(index, address), RTM_DELADDR)

    def fdb_append(self, index: int, entry: Fdb) -> None:
        try:
            self._rtnl.request(_fdb(index, entry), RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_APPEND)
        except NetlinkError as exc:
            if exc.code != EEXIST:
                raise

    def fdb_del(self, index: int, entry: Fdb) -> None:
        try:
            self._rtnl.request(_fdb(index, entry), RTM_DELNEIGH)
        except NetlinkError as exc:
            if exc.code not in {ENODEV, ENOENT}:  # already gone
                raise

    def neigh_replace(self, index: int, ip: IPv4Address, mac: str) -> None:
        msg = _ndmsg(socket.AF_INET, index)
        msg["state"] = NUD_PERMANENT
        msg["attrs"] = [("NDA_DST", str(ip)), ("NDA_LLADDR", mac)]
        self._rtnl.request(msg, RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE)

    def neigh_del(self, index: int, ip: IPv4Address) -> None:
        msg = _ndmsg(socket.AF_INET, index)
        msg["attrs"] = [("NDA_DST", str(ip))]
        try:
            self._rtnl.request(msg, RTM_DELNEIGH)
        except NetlinkError as exc:
            if exc.code not in {ENODEV, ENOENT}:
                raise


def _ndmsg(family: int, index: int) -> Any:
    msg = ndmsg()
    msg["family"] = family
    msg["ifindex"] = index
    return msg


def _fdb(index: int, entry: Fdb) -> Any:
    """A static forwarding entry on a VXLAN link (`bridge fdb append ... self permanent`)."""
    msg = _ndmsg(socket.AF_BRIDGE, index)
    msg["state"] = NUD_NOARP | NUD_PERMANENT
    msg["flags"] = NTF_SELF
    msg["attrs"] = [("NDA_LLADDR", entry.mac), ("NDA_DST", entry.dst)]
    return msg


def _ifaddr(index: int, address: IPv4Interface) -> Any:
    msg = ifaddrmsg()
    msg["family"] = socket.AF_INET
    msg["prefixlen"] = address.network.prefixlen
    msg["index"] = index
    ip = str(address.ip)
    msg["attrs"] = [("IFA_LOCAL", ip), ("IFA_ADDRESS", ip)]
    return msg
