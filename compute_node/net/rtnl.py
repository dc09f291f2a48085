"""rtnetlink requests on a plain NETLINK_ROUTE socket, synchronously.

pyroute2 (0.9) runs each `IPRoute` request through an asyncio round trip: ~0.3 ms of Python
per request on an idle host here, ~1 ms and more in a busy compute node, more than the
kernel's own work for most of them (a network applied from nothing is ten of them). This
module keeps pyroute2's message classes, which encode and decode the attributes, and does
the rest itself: the request is sent on a socket opened in the namespace once, and the
reply is read until the kernel's acknowledgement (or a dump's end). Errors raise pyroute2's
NetlinkError with the kernel's errno, as `IPRoute` does.

The plug's request (master, MTU and up for a tap) is packed with `struct` directly
(`enslave_up`): it is on the hot path of every port.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any, NamedTuple

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg

from compute_node.net import netns

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
NLMSG_ERROR = 2
NLMSG_DONE = 3
IFLA_MTU = 4
IFLA_MASTER = 10
IFF_UP = 0x1
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_U32_ATTR = struct.Struct("=HHI")  # len, type, value
_NLMSGERR = struct.Struct("=i")
_DECODERS: dict[int, type[Any]] = {RTM_NEWADDR: ifaddrmsg, RTM_NEWNEIGH: ndmsg}
REPLY_TIMEOUT_S = 10.0
_NLA = struct.Struct("=HH")  # len, type
_NLA_F_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
IFLA_IFNAME = 3
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_VXLAN_ID, IFLA_VXLAN_LINK, IFLA_VXLAN_LOCAL, IFLA_VXLAN_LEARNING = 1, 3, 4, 7
_U32 = struct.Struct("=I")


class LinkMessage(NamedTuple):
    """What the plumbing reads of an RTM_NEWLINK: a lean decode of the few attributes it
    needs (pyroute2's decodes all ~50 of them, statistics included: ~0.4 ms a link)."""

    ifindex: int
    flags: int
    name: str | None
    mtu: int | None
    master: int | None
    kind: str | None
    vni: int | None = None
    vxlan_link: int | None = None
    vxlan_local: str | None = None
    vxlan_learning: bool | None = None


def _attrs(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """The attributes in data[start:end]: type -> (payload start, payload end)."""
    found = {}
    while start + _NLA.size <= end:
        length, kind = _NLA.unpack_from(data, start)
        if length < _NLA.size or start + length > end:
            raise NetlinkError(0, "malformed netlink attribute")
        found[kind & _NLA_F_MASK] = (start + _NLA.size, start + length)
        start += (length + 3) & ~3
    return found


def _string(data: bytes, span: tuple[int, int]) -> str:
    return data[span[0] : span[1]].split(b"\0", 1)[0].decode()


def parse_link(data: bytes, offset: int, length: int) -> LinkMessage:
    """An RTM_NEWLINK message at data[offset:offset+length]."""
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(data, offset + _NLMSGHDR.size)
    end = offset + length
    top = _attrs(data, offset + _NLMSGHDR.size + _IFINFOMSG.size, end)

    def u32(attrs: dict[int, tuple[int, int]], kind: int) -> int | None:
        span = attrs.get(kind)
        return None if span is None else _U32.unpack_from(data, span[0])[0]

    name = _string(data, top[IFLA_IFNAME]) if IFLA_IFNAME in top else None
    kind = None
    vxlan: dict[int, tuple[int, int]] | None = None
    if IFLA_LINKINFO in top:
        info = _attrs(data, *top[IFLA_LINKINFO])
        if IFLA_INFO_KIND in info:
            kind = _string(data, info[IFLA_INFO_KIND])
        if kind == "vxlan" and IFLA_INFO_DATA in info:
            vxlan = _attrs(data, *info[IFLA_INFO_DATA])
    link = LinkMessage(
        ifindex=index,
        flags=flags,
        name=name,
        mtu=u32(top, IFLA_MTU),
        master=u32(top, IFLA_MASTER),
        kind=kind,
    )
    if vxlan is None:
        return link
    local = vxlan.get(IFLA_VXLAN_LOCAL)
    learning = vxlan.get(IFLA_VXLAN_LEARNING)
    return link._replace(
        vni=u32(vxlan, IFLA_VXLAN_ID),
        vxlan_link=u32(vxlan, IFLA_VXLAN_LINK),
        vxlan_local=None if local is None else socket.inet_ntoa(data[local[0] : local[1]]),
        vxlan_learning=None if learning is None else bool(data[learning[0]]),
    )


class Rtnl:
    """A NETLINK_ROUTE socket in one namespace; not thread-safe (the plumber's thread)."""

    def __init__(self, netns_name: str | None = None) -> None:
        with netns.inside(netns_name):
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        # The kernel answers at once; a reply that never comes is an error (OSError), not a
        # plumbing thread stuck for good.
        self._sock.settimeout(REPLY_TIMEOUT_S)
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def request(self, msg: Any, kind: int, flags: int = 0) -> list[Any]:
        """Send `msg` (a pyroute2 message with its fields and attrs set) as `kind` with
        NLM_F_REQUEST | NLM_F_ACK | `flags`; the decoded messages the kernel answered with
        before its acknowledgement (a get's object, a dump's objects): links as
        `LinkMessage`, addresses and neighbours as pyroute2's messages."""
        self._seq += 1
        header = msg["header"]
        header["type"] = kind
        header["flags"] = NLM_F_REQUEST | NLM_F_ACK | flags
        header["sequence_number"] = self._seq
        header["pid"] = 0
        msg.encode()
        self._sock.send(msg.data)
        return self._replies(self._seq)

    def dump(self, msg: Any, kind: int) -> list[Any]:
        return self.request(msg, kind, NLM_F_DUMP)

    def enslave_up(self, index: int, master: int, mtu: int) -> None:
        """Link `index`: master `master`, MTU `mtu`, up; one request, acknowledged."""
        self._seq += 1
        attrs = _U32_ATTR.pack(8, IFLA_MTU, mtu) + _U32_ATTR.pack(8, IFLA_MASTER, master)
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP) + attrs
        header = _NLMSGHDR.pack(
            _NLMSGHDR.size + len(body), RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, self._seq, 0
        )
        self._sock.send(header + body)
        self._replies(self._seq)

    def _replies(self, seq: int) -> list[Any]:
        """Read until the acknowledgement (or error, or a dump's end) of request `seq`;
        the messages before it, decoded. Replies to other sequence numbers (none are
        outstanding: one request at a time) are skipped."""
        found: list[Any] = []
        while True:
            data = self._sock.recv(1 << 16)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, got, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size or offset + length > len(data):
                    raise NetlinkError(0, "malformed netlink reply")
                if got == seq:
                    if kind == NLMSG_ERROR:
                        (error,) = _NLMSGERR.unpack_from(data, offset + _NLMSGHDR.size)
                        if error:
                            raise NetlinkError(-error, os.strerror(-error))
                        return found
                    if kind == NLMSG_DONE:
                        if length >= _NLMSGHDR.size + _NLMSGERR.size:
                            (error,) = _NLMSGERR.unpack_from(data, offset + _NLMSGHDR.size)
                            if error < 0:
                                raise NetlinkError(-error, os.strerror(-error))
                        return found
                    if kind == RTM_NEWLINK:
                        found.append(parse_link(data, offset, length))
                    elif kind in _DECODERS:
                        msg = _DECODERS[kind](data[offset : offset + length])
                        msg.decode()
                        found.append(msg)
                offset += (length + 3) & ~3
