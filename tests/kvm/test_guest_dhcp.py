"""The test guest's DHCP client and ping on a port the plumber made, in a namespace the test
creates: the lease (address, prefix, router, MTU) is the port's, and the guest uses it to
ping its gateway."""

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
    """Under /tmp, which dnsmasq running as nobody can search (unlike pytest's tmp_path)."""
    with tempfile.TemporaryDirectory(prefix="flotilla-dhcp-") as tmp:
        Path(tmp).chmod(0o755)
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
            finally:
                machine.close()
        finally:
            os.close(fd)
            console.close()
            plumber.remove("dhcp-net")
