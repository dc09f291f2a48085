"""virtio-net on taps in a network namespace the test creates: ping from the namespace to
the test guest, and two guests on one bridge exchanging UDP (docs/machine.md).

Traffic stays inside the namespace; the namespace (with its bridge and taps) is deleted
even when a test fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import native
from tests.kvm.harness import Booted, Console

PREFIX = "flotilla-guest: "

# ICMP echo over a raw socket, run inside the namespace (iputils' ping is not installed
# everywhere): prints "<n> received".
PING = """
import os, socket, struct, sys, time
dest, count = sys.argv[1], int(sys.argv[2])
def csum(b):
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s & 0xFFFF) + (s >> 16)
    return ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
sock.settimeout(2)
ident, got = os.getpid() & 0xFFFF, 0
for seq in range(count):
    body = struct.pack("!HHHH", 0x0800, 0, ident, seq) + b"flotilla-ping" * 4
    body = body[:2] + struct.pack("!H", csum(body + bytes(len(body) % 2))) + body[4:]
    sock.sendto(body, (dest, 0))
    end = time.monotonic() + 2
    while time.monotonic() < end:
        try:
            pkt = sock.recv(2048)
        except TimeoutError:
            break
        icmp = pkt[(pkt[0] & 15) * 4 :]
        if icmp[0] == 0 and struct.unpack("!HH", icmp[4:8]) == (ident, seq):
            got += 1
            break
    time.sleep(0.1)
print(f"{got} received")
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Netns:
    """A namespace with a bridge at 10.<n>.0.1/24; taps are created in the root namespace,
    opened there, then moved in (the open fd follows the device)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.name = f"fltv-{tag}"
        self.tag = tag
        self.subnet = f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}"
        self.fds: list[int] = []
        ip("netns", "add", self.name)
        self.exec("ip", "link", "add", "br0", "type", "bridge")
        self.exec("ip", "addr", "add", f"{self.subnet}.1/24", "dev", "br0")
        self.exec("ip", "link", "set", "br0", "up")
        self.exec("ip", "link", "set", "lo", "up")

    def exec(self, *cmd: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *cmd],
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def tap(self, *, vnet_hdr: bool = False) -> int:
        name = f"fltt{self.tag[:4]}{len(self.fds)}"
        ip("tuntap", "add", "name", name, "mode", "tap")
        try:
            fd = native.open_tap(name, vnet_hdr=vnet_hdr)
            self.fds.append(fd)
            ip("link", "set", name, "netns", self.name)
        except BaseException:
            subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)
            raise
        self.exec("ip", "link", "set", name, "master", "br0")
        self.exec("ip", "link", "set", name, "up")
        return fd

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)
        for fd in self.fds:
            os.close(fd)


@pytest.fixture
def netns(kvm: None) -> Iterator[Netns]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for a private network namespace")
    ns = Netns()
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture
def nic_boot(test_guest: Path) -> Iterator[Callable[..., Booted]]:
    started: list[Booted] = []

    def _boot(cmdline: str, tap_fd: int, mac: str) -> Booted:
        console = Console()
        try:
            machine = native.Machine(
                test_guest,
                cmdline=cmdline,
                memory_mib=64,
                console_out=console.write_fd,
                console_in=console.input_fd,
                nics=[native.Nic(tap_fd, mac)],
            )
        except BaseException:
            console.close()
            raise
        booted = Booted(machine, console)
        started.append(booted)
        machine.start()
        return booted

    yield _boot
    for b in started:
        b.machine.close()
        b.console.close()


@pytest.mark.parametrize("vnet_hdr", [False, True], ids=["plain", "vnet-hdr"])
def test_ping_from_the_namespace_gets_replies(
    netns: Netns, nic_boot: Callable[..., Booted], vnet_hdr: bool
) -> None:
    """Both kinds of tap: plain frames, and a virtio-net header on each (the offloads
    offered; this guest's driver takes none of them, so the device writes it plain headers
    and sends the tap zeroed ones)."""
    guest_ip = f"{netns.subnet}.2"
    guest = nic_boot(f"net={guest_ip}", netns.tap(vnet_hdr=vnet_hdr), "52:54:00:aa:00:02")
    guest.console.wait_for(rf"{PREFIX}NET up mac=52:54:00:aa:00:02 ip={guest_ip}\n")
    out = netns.exec(sys.executable, "-c", PING, guest_ip, "3", timeout=20).stdout
    assert "3 received" in out, out
    dev = guest.machine.virtio_devices()[0]
    assert dev.kind == "net"
    assert not dev.broken
    assert dev.ops[0] >= 3  # received: ARP and echo requests
    assert dev.ops[1] >= 3  # sent: ARP and echo replies


def test_the_guest_answers_while_it_prints(netns: Netns, nic_boot: Callable[..., Booted]) -> None:
    """Between the FIFO-sized bursts of a printed line the guest serves its network (as a
    kernel's interrupts would): pings are answered while it prints 600 lines, not after."""
    guest_ip = f"{netns.subnet}.2"
    guest = nic_boot(f"net={guest_ip} lines=600", netns.tap(), "52:54:00:aa:00:05")
    guest.console.wait_for(rf"{PREFIX}LINE 1 of 600")
    out = netns.exec(sys.executable, "-c", PING, guest_ip, "3", timeout=30).stdout
    assert "3 received" in out, out
    assert "LINES done" not in guest.console.text  # still printing
    guest.console.wait_for(rf"{PREFIX}LINES done n=600", timeout=120)


def test_two_guests_on_one_bridge_exchange_udp(
    netns: Netns, nic_boot: Callable[..., Booted]
) -> None:
    server_ip, client_ip = f"{netns.subnet}.2", f"{netns.subnet}.3"
    server = nic_boot(f"net={server_ip}", netns.tap(), "52:54:00:aa:00:02")
    server.console.wait_for(rf"{PREFIX}NET up .* ip={server_ip}\n")
    client = nic_boot(
        f"net={client_ip} udp={server_ip}:7 poweroff", netns.tap(), "52:54:00:aa:00:03"
    )
    m = client.console.wait_for(rf"{PREFIX}UDP (reply from=\S+ sent=(.*) data=(.*)|FAILED.*)\n", 20)
    assert m.group(1).startswith(f"reply from={server_ip}:7"), client.console.text
    assert m.group(2) == m.group(3)
    event = client.machine.wait_event(10)
    assert event is not None
    assert event.kind is native.EventKind.POWEROFF


def tcp_sink(netns: Netns, nic_boot: Callable[..., Booted], ip: str) -> Booted:
    """A test guest at `ip` taking one TCP connection on port 5001 (`tcpsink`)."""
    sink = nic_boot(f"net={ip} tcpsink=5001", netns.tap(), "52:54:00:aa:00:02")
    sink.console.wait_for(rf"{PREFIX}TCP listening port=5001\n")
    return sink


def assert_read_whole(sink: Booted, size: int) -> None:
    """The sink read `size` bytes to the FIN, none of them off the pattern."""
    got = sink.console.wait_for(rf"{PREFIX}TCP received bytes=(\d+) bad=(\d+) .*\n", 30)
    assert int(got.group(1)) == size, sink.console.text
    assert got.group(2) == "0"


def test_two_guests_on_one_bridge_move_a_tcp_stream_every_byte_checked(
    netns: Netns, nic_boot: Callable[..., Booted]
) -> None:
    """The test guest's TCP (`tcpsink`, `tcpsend`): 8 MiB in MSS-sized, checksummed
    segments, every byte checked against its stream offset by the receiver."""
    sink_ip, sender_ip = f"{netns.subnet}.2", f"{netns.subnet}.3"
    size = 8 << 20
    sink = tcp_sink(netns, nic_boot, sink_ip)
    sender = nic_boot(
        f"net={sender_ip} tcpsend={sink_ip}:5001,{size}", netns.tap(), "52:54:00:aa:00:03"
    )
    sent = sender.console.wait_for(rf"{PREFIX}TCP (sent|FAILED) bytes=(\d+) .*\n", 60)
    assert sent.group(1) == "sent", sender.console.text
    assert int(sent.group(2)) == size
    assert_read_whole(sink, size)


def test_a_linux_tcp_client_in_the_namespace_is_read_whole(
    netns: Netns, nic_boot: Callable[..., Booted]
) -> None:
    """Linux's TCP (window scaling, SACK, timestamps offered: the guest takes none) sends
    to the guest's sink: the handshake, the MSS, the checksums and the pattern hold against
    another stack."""
    sink_ip = f"{netns.subnet}.2"
    size = 1 << 20
    sink = tcp_sink(netns, nic_boot, sink_ip)
    client = (
        "import socket, sys\n"
        "n = int(sys.argv[2])\n"
        "data = bytes((k ^ (k >> 8) ^ (k >> 16) ^ 0x5A) & 0xFF for k in range(n))\n"
        "s = socket.create_connection((sys.argv[1], 5001), timeout=20)\n"
        "s.sendall(data)\n"
        "s.shutdown(socket.SHUT_WR)\n"
        "s.settimeout(20)\n"
        "print('closed' if s.recv(1) == b'' else 'data?')\n"
    )
    out = netns.exec(sys.executable, "-c", client, sink_ip, str(size), timeout=60).stdout
    assert out.strip() == "closed"
    assert_read_whole(sink, size)


def test_a_malformed_mac_is_refused_before_the_machine_starts(
    netns: Netns, nic_boot: Callable[..., Booted]
) -> None:
    # A bad MAC string is refused before anything starts.
    with pytest.raises(native.ConfigError, match="MAC"):
        nic_boot("net=10.0.0.2", netns.tap(), "52:54:00:zz:00:02")
