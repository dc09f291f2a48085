"""The test guest's DHCP client and ping on a port the plumber made, in a namespace the test
creates: the lease (address, prefix, router, MTU) is the port's, and the guest uses it to
ping its gateway."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pytest

import native
from compute_node.net import NetworkMode, NetworkPlumbing, Plumber, PortPlumbing, netns, tap
from tests.kvm.harness import Console

PREFIX = "flotilla-guest: "


@pytest.fixture
def host_ns(kvm: None) -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("dnsmasq") is None:
        pytest.skip("needs root, iproute2 and dnsmasq for a private network namespace")
    name = f"fldh-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A private (0700) state dir: dnsmasq's files are kept outside it."""
    with tempfile.TemporaryDirectory(prefix="flotilla-dhcp-") as tmp:
        yield Path(tmp)


def test_the_guest_takes_its_lease_by_dhcp_and_pings_its_gateway(
    host_ns: str, test_guest: Path, state_dir: Path
) -> None:
    network = NetworkPlumbing(
        network_id="dhcp-net",
        mode=NetworkMode.ISOLATED,
        mtu=1400,
        gateway=IPv4Interface("10.61.0.1/24"),
    )
    port = PortPlumbing(
        port_id="dhcp-port",
        network_id="dhcp-net",
        mac="52:54:00:61:00:07",
        ipv4=IPv4Address("10.61.0.7"),
    )
    console = Console()
    with Plumber(state_dir, netns=host_ns) as plumber:
        plumber.apply(network)
        plumber.plug(port)
        fd = tap.open_queue(port.tap, netns_name=host_ns)
        try:
            machine = native.Machine(
                test_guest,
                cmdline="net=dhcp ping=10.61.0.1,5,20",
                memory_mib=64,
                console_out=console.write_fd,
                console_in=console.input_fd,
                nics=[native.Nic(fd, port.mac)],
            )
            try:
                machine.start()
                lease = console.wait_for(rf"{PREFIX}DHCP (lease .*|FAILED.*)\n", 20)
                assert lease.group(1) == (
                    # An isolated network announces no router.
                    "lease ip=10.61.0.7/24 router=0.0.0.0 mtu=1400 server=10.61.0.1"
                ), console.text
                done = console.wait_for(rf"{PREFIX}PING to=10.61.0.1 .*\n", 20)
                assert "sent=5 received=5 lost=0" in done.group(0), console.text
                # One exchange: the ACK answered the DISCOVER (Rapid Commit), no REQUEST.
                log = "".join(f.read_text() for f in (state_dir / "dnsmasq").glob("*.log"))
                assert "DHCPDISCOVER" in log, log
                assert "DHCPREQUEST" not in log, log
            finally:
                machine.close()
        finally:
            os.close(fd)
            console.close()
            plumber.remove("dhcp-net")


def _bootp(xid: int, mac: bytes, kind: int, yiaddr: str, options: bytes) -> bytes:
    header = struct.pack("!BBBBIHH", 2, 1, 6, 0, xid, 0, 0x8000)
    header += bytes(4) + socket.inet_aton(yiaddr) + bytes(8) + mac + bytes(10) + bytes(192)
    return header + struct.pack("!I", 0x63825363) + bytes([53, 1, kind]) + options


def _frame(
    payload: bytes, dst: bytes, *, udp_len: int | None = None, ip_len: int | None = None
) -> bytes:
    udp = struct.pack("!HHHH", 67, 68, udp_len or 8 + len(payload), 0) + payload
    total = ip_len or 20 + len(udp)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 17, 0,
                     socket.inet_aton("10.9.9.1"), socket.inet_aton("255.255.255.255"))  # fmt: skip
    return dst + bytes.fromhex("525400090901") + b"\x08\x00" + ip + udp


def _dhcp_from_guest(sock: socket.socket, kind: int, deadline: float) -> int:
    """The xid of the next DHCP message of `kind` (1 DISCOVER, 3 REQUEST) the guest sends."""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            frame = sock.recv(2048)
        except TimeoutError:
            break
        if len(frame) >= 14 + 20 + 8 + 243 and frame[12:14] == b"\x08\x00" and frame[23] == 17:
            bootp = frame[42:]
            if struct.unpack("!H", frame[36:38])[0] == 67 and bootp[240:243] == bytes(
                [53, 1, kind]
            ):
                return int(struct.unpack("!I", bootp[4:8])[0])
    pytest.fail(f"the guest sent no DHCP message of type {kind}")


def test_hostile_dhcp_replies_are_refused_whole_and_a_good_one_is_taken(
    host_ns: str, test_guest: Path
) -> None:
    """Replies with the guest's xid but an option running past the datagram, a UDP length
    beyond the IP payload, an IP length beyond the frame, or a BOOTP message cut short give
    no lease (the guest reads only what it was given), nor does an ACK to its DISCOVER without
    Rapid Commit; the well-formed offer after them does, through REQUEST and ACK."""
    mac = bytes.fromhex("525400090907")
    tap.create("fldh0", uid=os.getuid(), gid=os.getgid(), netns_name=host_ns)
    subprocess.run(["ip", "-n", host_ns, "link", "set", "fldh0", "up"], check=True)
    fd = tap.open_queue("fldh0", netns_name=host_ns)
    with netns.inside(host_ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sock.bind(("fldh0", 0))
    console = Console()
    good = bytes(
        [1, 4, 255, 255, 255, 0, 3, 4, 10, 9, 9, 1, 26, 2, 5, 120, 54, 4, 10, 9, 9, 1, 255]
    )
    try:
        machine = native.Machine(
            test_guest,
            cmdline="net=dhcp",
            memory_mib=64,
            console_out=console.write_fd,
            console_in=console.input_fd,
            nics=[native.Nic(fd, "52:54:00:09:09:07")],
        )
        try:
            machine.start()
            xid = _dhcp_from_guest(sock, 1, time.monotonic() + 20)
            bcast = b"\xff" * 6
            hostile = [
                # an option whose length runs past the end of the datagram
                _frame(_bootp(xid, mac, 2, "10.6.6.6", bytes([1, 200, 255, 255])), bcast),
                # a UDP length beyond the IP payload
                _frame(_bootp(xid, mac, 2, "10.6.6.7", good), bcast, udp_len=4000),
                # an IP total length beyond the frame
                _frame(_bootp(xid, mac, 2, "10.6.6.8", good), bcast, ip_len=3000),
                # a BOOTP message cut short (no cookie, no options)
                _frame(_bootp(xid, mac, 2, "10.6.6.9", good)[:200], bcast),
                # an ACK to the DISCOVER without Rapid Commit (RFC 4039: ignored)
                _frame(_bootp(xid, mac, 5, "10.6.6.10", good), bcast),
            ]
            for frame in hostile:
                sock.send(frame)
            time.sleep(0.3)
            assert "DHCP lease" not in console.text
            sock.send(_frame(_bootp(xid, mac, 2, "10.9.9.9", good), bcast))
            xid = _dhcp_from_guest(sock, 3, time.monotonic() + 20)
            sock.send(_frame(_bootp(xid, mac, 5, "10.9.9.9", good), bcast))
            lease = console.wait_for(rf"{PREFIX}DHCP (lease .*|FAILED.*)\n", 20)
            assert lease.group(1) == "lease ip=10.9.9.9/24 router=10.9.9.1 mtu=1400 server=10.9.9.1"
            assert machine.virtio_devices()[0].broken is False
        finally:
            machine.close()
    finally:
        sock.close()
        os.close(fd)
        console.close()
