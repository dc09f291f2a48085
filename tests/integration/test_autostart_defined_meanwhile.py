"""Autostart starts what was defined before the node started, as libvirtd's does at its
start: a domain marked autostart but defined while the node's autostart pass was still
going (commands are already served by then) stays shut off until started or until the
next node start. Before, the pass listed the domains only when it ran, so a define that
came first was started by it; the node's KVM test saw one started right after its define."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

import pytest

from compute_node.config import ComputeConfig
from compute_node.fake import FakeDriver
from compute_node.node import ComputeNode
from protos import routing
from protos.commands import DefineDomain, GetDomainInfo
from protos.domain import DomainSpec, PowerState
from protos.replies import DomainInfo
from services.bus import Bus
from tests.bootfiles import BOOT_DIR, KERNEL

pytestmark = pytest.mark.integration


class HeldAutostart(ComputeNode):
    """A node whose autostart pass waits for `go` once it has begun."""

    def __init__(self, config: ComputeConfig) -> None:
        super().__init__(config, FakeDriver())
        self.began = threading.Event()
        self.go = threading.Event()

    def autostart(self, domain_ids: list[UUID]) -> None:
        self.began.set()
        assert self.go.wait(20)
        super().autostart(domain_ids)


def _config(amqp_url: str, tmp_path: Path, host: str) -> ComputeConfig:
    return ComputeConfig(
        host=host,
        state_dir=tmp_path / host,
        amqp_url=amqp_url,
        driver="fake",
        allowed_boot_dirs=[BOOT_DIR],
        heartbeat_interval_s=0.5,
    )


def _spec() -> DomainSpec:
    return DomainSpec.model_validate(
        {
            "name": f"auto-{uuid.uuid4().hex[:6]}",
            "memory_mib": 32,
            "autostart": True,
            "boot": {"kernel": KERNEL},
        }
    )


def test_a_domain_defined_while_autostart_runs_is_not_started_by_it(
    amqp_url: str, make_bus: Callable[..., Bus], tmp_path: Path
) -> None:
    host = f"auto-{uuid.uuid4().hex[:6]}"
    queue = routing.compute_queue(host)
    bus = make_bus()
    config = _config(amqp_url, tmp_path, host)
    before, meanwhile = _spec(), _spec()

    def state(domain_id: UUID) -> PowerState:
        info = bus.call(queue, GetDomainInfo(domain_id=domain_id), timeout=20)
        assert isinstance(info, DomainInfo)
        return info.state

    node = ComputeNode(config, FakeDriver()).start()
    try:
        bus.call(queue, DefineDomain(spec=before, privileged=True), timeout=20)
        assert state(before.uuid) is PowerState.SHUTOFF  # a define does not start it
    finally:
        node.stop()

    held = HeldAutostart(config)
    starting = threading.Thread(target=held.start, daemon=True)
    starting.start()
    try:
        assert held.began.wait(30)
        # Commands are served while the pass waits: this define lands before it lists.
        bus.call(queue, DefineDomain(spec=meanwhile, privileged=True), timeout=20)
        held.go.set()
        starting.join(30)
        assert not starting.is_alive()
        assert state(before.uuid) is PowerState.RUNNING
        assert state(meanwhile.uuid) is PowerState.SHUTOFF
    finally:
        held.go.set()
        starting.join(30)
        held.stop()
