"""Persistent tap devices, created with the tun driver's ioctls (netlink cannot make them).

A tap is made persistent and owned by the VMM's user and group, so the unprivileged VMM can
open it by name later while the node keeps it across guest restarts. /dev/net/tun is opened
inside the target namespace: the device is created in the namespace of that open file.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

from compute_node.net import netns

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
TUNSETGROUP = 0x400454CE
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000


def create(name: str, *, uid: int, gid: int, netns_name: str | None = None) -> int:
    """Make `name` a persistent tap owned by uid:gid and return its ifindex.

    An existing tap of that name is kept (and given that owner): the call is idempotent.
    OSError when the name belongs to a link that is not a tap (EINVAL/EBUSY)."""
    with netns.inside(netns_name):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
            fcntl.ioctl(fd, TUNSETOWNER, uid)
            fcntl.ioctl(fd, TUNSETGROUP, gid)
            fcntl.ioctl(fd, TUNSETPERSIST, 1)
            return socket.if_nametoindex(name)
        finally:
            os.close(fd)


def open_queue(name: str, *, netns_name: str | None = None) -> int:
    """Open a queue of tap `name` (in namespace `netns_name`) for a VMM and return its fd,
    close-on-exec (the caller passes it on explicitly). The tap must exist: a missing one
    raises OSError rather than being made here, so a port is never served by a tap the
    plumber does not know."""
    if not _exists(name, netns_name):
        raise FileNotFoundError(f"tap {name} does not exist")
    with netns.inside(netns_name):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        # With a virtio-net header on every frame: the guest's checksum offload and TSO
        # pass through it (native/virtio/net.c).
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _exists(name: str, netns_name: str | None) -> bool:
    with netns.inside(netns_name):
        try:
            socket.if_nametoindex(name)
        except OSError:
            return False
    return True
