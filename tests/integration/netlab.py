"""A small network lab for the plumbing tests: namespaces as hosts and guests.

Each `Lab` makes namespaces with a unique prefix and always deletes them. A `Guest` is a
namespace with an `eth0` tap of its own, joined to a host's port tap by a relay thread that
copies frames between the two file descriptors -- what a VMM does with a guest NIC -- so the
host tap is used exactly as the VMM would use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import struct
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from compute_node.net import netns
from compute_node.net.tap import IFF_NO_PI, IFF_TAP, TUNSETIFF

ROOT_LINKS = Path("/sys/class/net")


def ip(*args: str, ns: str | None = None) -> str:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def run_in(ns: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def open_tap(name: str, ns: str | None) -> int:
    """Attach to tap `name` (creating a non-persistent one if absent) in namespace `ns`."""
    with netns.inside(ns):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


class Relay:
    """Copies frames both ways between two tap fds until stopped."""

    def __init__(self, a: int, b: int) -> None:
        self._a, self._b = a, b
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._a, selectors.EVENT_READ, self._b)
        sel.register(self._b, selectors.EVENT_READ, self._a)
        sel.register(self._stop_r, selectors.EVENT_READ, None)
        while True:
            for key, _ in sel.select():
                if key.data is None:
                    sel.close()
                    return
                try:
                    os.write(key.data, os.read(key.fd, 65536))
                except OSError:
                    pass  # a tap that is down refuses frames, as a cable would

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        for fd in (self._stop_r, self._stop_w, self._a, self._b):
            os.close(fd)


class Lab:
    def __init__(self) -> None:
        self.prefix = "fnt" + uuid.uuid4().hex[:6]
        self.namespaces: list[str] = []
        self.relays: list[Relay] = []

    def ns(self, role: str) -> str:
        name = f"{self.prefix}-{role}"
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("link", "set", "lo", "up", ns=name)
        return name

    def veth(self, a: tuple[str, str, str], b: tuple[str, str, str]) -> None:
        """A veth pair between two (namespace, link name, address) ends, addressed and up."""
        ip("link", "add", a[1], "netns", a[0], "type", "veth", "peer", b[1], "netns", b[0])
        for ns, name, addr in (a, b):
            ip("addr", "add", addr, "dev", name, ns=ns)
            ip("link", "set", name, "up", ns=ns)

    def guest(
        self,
        role: str,
        host_ns: str,
        host_tap: str,
        mac: str,
        *,
        mtu: int,
        addr: str | None = None,
        gateway: str | None = None,
    ) -> str:
        """A guest namespace whose eth0 is relayed to `host_tap`; static address if given."""
        ns = self.ns(role)
        guest_fd = open_tap("eth0", ns)
        ip("link", "set", "eth0", "address", mac, "mtu", str(mtu), "up", ns=ns)
        if addr is not None:
            ip("addr", "add", addr, "dev", "eth0", ns=ns)
        if gateway is not None:
            ip("route", "add", "default", "via", gateway, ns=ns)
        self.relays.append(Relay(open_tap(host_tap, host_ns), guest_fd))
        return ns

    def close(self) -> None:
        for relay in self.relays:
            relay.stop()
        for name in reversed(self.namespaces):
            # dnsmasq and other daemons the test started in a namespace keep it alive but
            # lose their links with it; the plumber's teardown ends them by pid first.
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    made = Lab()
    try:
        yield made
    finally:
        made.close()
