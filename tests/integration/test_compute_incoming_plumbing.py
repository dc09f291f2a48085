"""A live migration's target starts its VMM only once the incoming guest's ports are plumbed,
as a start does: the target's lifecycle plumbs for real (HostNetworks in a namespace of its
own, netlink and nftables), on a FakeDriver that looks at the taps when it is asked to wait
for the stream. No broker: PrepareIncoming is called as the consumer runtime would."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

import pytest

from compute_node.boot_sources import BootFiles, BootSources
from compute_node.driver import IncomingMachine, NicTap
from compute_node.fake import FakeDriver
from compute_node.lifecycle import Lifecycle
from compute_node.net import PlumbingError
from compute_node.net.dnsmasq import Dnsmasq
from compute_node.networks import Answer, HostNetworks, NetSettings
from compute_node.resources import Claims
from compute_node.store import Store
from protos.bindings import NetworkBinding, PortBinding
from protos.codec import Envelope
from protos.domain import BootSpec, DomainSpec, NicSpec
from protos.host import HostInventory, KvmKind
from protos.migration import FinishIncoming, PrepareIncoming
from services.bus import Context, ServiceError
from tests.bootfiles import BOOT_DIR, KERNEL
from tests.integration.netlab import lab

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

CTX = Context(Envelope(type="t", body={}, source="test"))
NET = NetworkBinding(
    network_id=uuid.uuid4(),
    name="blue",
    mode="isolated",
    mtu=1400,
    gateway=IPv4Interface("10.66.0.1/24"),
)
PORT = PortBinding(
    port_id=uuid.uuid4(),
    network=NET,
    mac="52:54:00:3e:01:10",
    ipv4=IPv4Address("10.66.0.10"),
)
SLOW_S = 0.5


def tap_link(ns: str, tap: str) -> dict[str, Any] | None:
    """The tap as netlink shows it in `ns` (None: there is no such link)."""
    shown = subprocess.run(
        ["ip", "-n", ns, "-j", "link", "show", "dev", tap],
        check=False,
        capture_output=True,
        text=True,
    )
    if shown.returncode != 0:
        return None
    (link,) = json.loads(shown.stdout)
    assert isinstance(link, dict)
    return link


class Watching(FakeDriver):
    """Records, when asked to wait for a stream, how each tap was at that moment."""

    def __init__(self, ns: str, answered: threading.Event) -> None:
        super().__init__(8, 8192)
        self.ns = ns
        self.answered = answered
        self.asked: list[tuple[bool, list[dict[str, Any] | None]]] = []

    def prepare_incoming(
        self,
        spec: DomainSpec,
        files: BootFiles,
        *,
        nics: Sequence[NicTap] = (),
        listen: str = "127.0.0.1",
        paused: bool = False,
        copy_disks: Sequence[int] = (),
    ) -> IncomingMachine:
        links = [tap_link(self.ns, nic.tap) for nic in nics]
        self.asked.append((self.answered.is_set(), links))
        return super().prepare_incoming(
            spec, files, nics=nics, listen=listen, paused=paused, copy_disks=copy_disks
        )


@dataclass
class Target:
    service: Lifecycle
    driver: Watching
    claims: Claims
    networks: HostNetworks
    ns: str
    answered: threading.Event


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    with lab() as made:
        ns = made.ns("h")
        answered = threading.Event()
        driver = Watching(ns, answered)
        name = f"t-{uuid.uuid4().hex[:6]}"
        store = Store(tmp_path / "compute.db", host=name, source=f"compute:{name}")
        inventory = HostInventory(
            capacity=driver.host_resources(),
            cpu_allocation_ratio=1.0,
            ram_allocation_ratio=1.0,
            kvm=KvmKind.NONE,
        )
        claims = Claims(inventory, reserved_memory_mib=0)
        service = Lifecycle(name, store, driver, claims, BootSources([BOOT_DIR]))
        networks = HostNetworks(name, tmp_path, NetSettings(netns=ns))
        service.networks = networks
        try:
            yield Target(service, driver, claims, networks, ns, answered)
        finally:
            service.stop_migrations()
            networks.close()
            Dnsmasq(tmp_path / "net", run_dir=networks.dnsmasq_dir).stop_all()
            store.close()


def prepare() -> PrepareIncoming:
    spec = DomainSpec(
        name="web",
        boot=BootSpec(kernel=KERNEL),
        memory_mib=64,
        nics=[NicSpec(network="blue", mac=PORT.mac)],
    )
    return PrepareIncoming(spec=spec, source="elsewhere", live=True, ports=[PORT], seq=3)


def test_the_vmm_waits_until_the_ports_are_plumbed(target: Target) -> None:
    """The network service is slow to send the new network's forwarding entries: the driver
    is asked to wait for the stream only after they came, with the tap on its bridge, up."""

    def slow_answer(_timeout: float) -> Answer | None:
        time.sleep(SLOW_S)
        target.answered.set()
        return None  # no other host's ports: none to push

    target.networks.carried_changed = lambda _ids: slow_answer
    cmd = prepare()
    started = time.monotonic()
    endpoint = target.service.prepare_incoming(cmd, CTX)
    assert time.monotonic() - started >= SLOW_S
    assert endpoint.port is not None
    assert endpoint.token is not None
    ((answered, (link,)),) = target.driver.asked
    assert answered, "the VMM started before the forwarding entries were in"
    assert link is not None
    assert link.get("master"), f"tap not on its bridge: {link}"
    assert "UP" in link["flags"]
    # Not committed: everything goes again, the tap too.
    target.service.finish_incoming(
        FinishIncoming(domain_id=cmd.spec.uuid, committed=False, seq=0), CTX
    )
    assert tap_link(target.ns, HostNetworks.tap_name(PORT)) is None
    assert target.service.store.get(cmd.spec.uuid) is None


def test_a_plumbing_failure_refuses_and_leaves_nothing(target: Target) -> None:
    """The plumbing fails: PrepareIncoming is refused (`spawn_failed`, which sends the
    scheduler to another host) with no VMM ever started, no tap, no claim, no definition."""

    def failing(_timeout: float) -> Answer | None:
        raise PlumbingError("forwarding entries could not be written")

    target.networks.carried_changed = lambda _ids: failing
    cmd = prepare()
    with pytest.raises(ServiceError) as refused:
        target.service.prepare_incoming(cmd, CTX)
    assert refused.value.code == "spawn_failed"
    assert "forwarding entries" in refused.value.message
    assert target.driver.asked == [], "a VMM was started for a guest that could not be plumbed"
    assert tap_link(target.ns, HostNetworks.tap_name(PORT)) is None
    assert target.claims.usage().memory_mib == 0
    assert target.service.store.get(cmd.spec.uuid) is None
    # The same domain can be prepared again once the plumbing works.
    target.networks.carried_changed = lambda _ids: lambda _timeout: None
    endpoint = target.service.prepare_incoming(cmd, CTX)
    assert endpoint.port is not None
    target.service.finish_incoming(
        FinishIncoming(domain_id=cmd.spec.uuid, committed=False, seq=0), CTX
    )


def test_a_failure_before_the_tap_is_plugged_leaves_no_tap(target: Target) -> None:
    """The network cannot be applied here (a bridge-mode network whose host bridge this host
    lacks): the tap made for the VMM before the rest of the plumbing goes too."""
    net = NetworkBinding(network_id=uuid.uuid4(), name="blue", mode="bridge", mtu=1500, dhcp=False)
    net = net.model_copy(update={"host_bridge": "nobr0"})
    port = PortBinding(port_id=uuid.uuid4(), network=net, mac=PORT.mac, ipv4=PORT.ipv4)
    cmd = prepare().model_copy(update={"ports": [port]})
    with pytest.raises(ServiceError) as refused:
        target.service.prepare_incoming(cmd, CTX)
    assert refused.value.code == "spawn_failed"
    assert "nobr0" in refused.value.message
    assert target.driver.asked == []
    assert tap_link(target.ns, HostNetworks.tap_name(port)) is None
    assert target.claims.usage().memory_mib == 0
    assert target.service.store.get(cmd.spec.uuid) is None
