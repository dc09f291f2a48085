"""A Linux guest on a port the plumber made takes its address by DHCP from that network's
dnsmasq and pings its gateway, where KVM has hardware virtualization (the hwvirt tier:
docs/testing.md). The Linux counterpart of tests/kvm/test_guest_dhcp.py: Debian's cloud
kernel and busybox's `udhcpc` instead of the test guest's own client.

The host is a network namespace the test creates (and deletes); the guest's NIC is the port's
tap there, so the lease, the anti-spoofing rules and the gateway are Flotilla's own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pytest

import native
from compute_node.net import NetworkMode, NetworkPlumbing, Plumber, PortPlumbing, tap
from native.images import LinuxImages
from native.machine import EventKind, Nic
from tests.hwvirt.test_linux_guest import (
    BASE_CMDLINE,
    COMMAND_TIMEOUT,
    MEMORY_MIB,
    LinuxShell,
    images,
)
from tests.kvm.harness import Console

# One Linux boot: minutes in the nested L1.
pytestmark = [pytest.mark.hwvirt, pytest.mark.slow, pytest.mark.timeout(1800)]

__all__ = ["images"]  # the module-scoped fixture, shared with test_linux_guest

GATEWAY = IPv4Interface("10.62.0.1/24")
GUEST_IP = IPv4Address("10.62.0.9")
MTU = 1400
# udhcpc runs this with `bound` once it has a lease, its fields in the environment.
UDHCPC_SCRIPT = (
    "#!/bin/sh\\n"
    '[ "$1" = bound ] || exit 0\\n'
    "ip addr add $ip/$mask dev $interface\\n"
    "ip link set $interface mtu ${mtu:-1500} up\\n"
    'echo "leased $ip/$mask mtu=${mtu:-none} router=${router:-none} server=$serverid"\\n'
)


@pytest.fixture
def host_ns() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("dnsmasq") is None:
        pytest.skip("needs root, iproute2 and dnsmasq for a private network namespace")
    name = f"fllx-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A private (0700) state dir: dnsmasq's files are kept outside it."""
    with tempfile.TemporaryDirectory(prefix="flotilla-lxdhcp-") as tmp:
        yield Path(tmp)


def test_a_linux_guest_takes_its_lease_by_dhcp_and_pings_its_gateway(
    images: LinuxImages, host_ns: str, state_dir: Path
) -> None:
    assert images.initramfs is not None
    network = NetworkPlumbing(
        network_id="lx-dhcp-net", mode=NetworkMode.ISOLATED, mtu=MTU, gateway=GATEWAY
    )
    port = PortPlumbing(
        port_id="lx-dhcp-port", network_id=network.network_id, mac="52:54:00:62:00:09",
        ipv4=GUEST_IP,
    )  # fmt: skip
    console = Console()
    with Plumber(state_dir, netns=host_ns) as plumber:
        plumber.apply(network)
        plumber.plug(port)
        fd = tap.open_queue(port.tap, netns_name=host_ns)
        machine: native.Machine | None = None
        try:
            machine = native.Machine(
                images.vmlinuz,
                initrd=images.initramfs,
                cmdline=BASE_CMDLINE,
                memory_mib=MEMORY_MIB,
                console_out=console.write_fd,
                console_in=console.input_fd,
                nics=(Nic(tap_fd=fd, mac=port.mac),),
            )
            machine.start()
            shell = LinuxShell(console, machine)
            shell.wait_shell()
            shell.check(f"printf '{UDHCPC_SCRIPT}' > /tmp/dhcp.sh && chmod +x /tmp/dhcp.sh")
            leased = shell.check(
                "ip link set eth0 up && udhcpc -i eth0 -n -q -t 10 -T 3 -s /tmp/dhcp.sh"
            )
            # The port's address and the network's MTU; an isolated network names no router.
            assert f"leased {GUEST_IP}/24 mtu={MTU} router=none server={GATEWAY.ip}" in leased
            assert f"inet {GUEST_IP}/24" in shell.check("ip -4 addr show dev eth0")
            assert f"mtu {MTU}" in shell.check("ip link show dev eth0")
            pinged = shell.check(f"ping -c 3 -W 10 {GATEWAY.ip}")
            assert "3 packets received" in pinged, pinged
            shell.console.send(b"exit\n")
            shell.end(EventKind.POWEROFF, COMMAND_TIMEOUT)
        finally:
            if machine is not None:
                machine.close()
            os.close(fd)
            console.close()
            plumber.remove(network.network_id)
