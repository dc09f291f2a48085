"""A start that times out at the scheduler on a host that keeps heartbeating (its spawn is
slow, not its worker gone): the scheduler must not run a second copy elsewhere while the slow
host may still start it. It waits for that host's clean-up (destroy, undefine), which the
host's domain lock orders after the start, before it asks another host: at no moment do two
hosts run the domain.

Before: the clean-up was sent with 5 s timeouts and not waited for beyond them; the next host
started the domain while the slow one was still in its spawn, which then finished (two
copies) until the queued clean-up caught up with it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from compute_node.boot_sources import BootFiles
from compute_node.config import ComputeConfig
from compute_node.driver import NicTap, RuntimeInfo
from compute_node.fake import FakeDriver
from compute_node.node import ComputeNode
from protos import routing
from protos.domain import DomainSpec
from protos.scheduler import Placement, ScheduleDomain
from services.bus import Bus
from services.scheduler import Scheduler, SchedulerConfig
from tests.bootfiles import BOOT_DIR, KERNEL

# The slow spawn outlasts the old clean-up's two 5 s waits: ~20 s on a loaded machine.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

COMPUTE_TIMEOUT_S = 2.0
HOLD_S = 14.0  # longer than the compute timeout and the old clean-up's two 5 s waits


class Ledger:
    """Which hosts run the domain, and the most that ever did at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: set[str] = set()
        self.most = 0
        self.spawned: list[str] = []

    def started(self, host: str) -> None:
        with self.lock:
            self.running.add(host)
            self.spawned.append(host)
            self.most = max(self.most, len(self.running))

    def stopped(self, host: str) -> None:
        with self.lock:
            self.running.discard(host)


class LedgerDriver(FakeDriver):
    """The fake hypervisor, telling the ledger when its guest runs; with `hold`, a spawn
    takes until `go` is set or HOLD_S has passed."""

    def __init__(self, host: str, ledger: Ledger, memory_mib: int, *, hold: bool) -> None:
        super().__init__(8, memory_mib)
        self.host = host
        self.ledger = ledger
        self.hold = hold
        self.spawning = threading.Event()
        self.go = threading.Event()

    def spawn(
        self,
        spec: DomainSpec,
        files: BootFiles,
        *,
        paused: bool = False,
        nics: Sequence[NicTap] = (),
    ) -> RuntimeInfo:
        self.spawning.set()
        if self.hold:
            self.go.wait(HOLD_S)
        info = super().spawn(spec, files, paused=paused, nics=nics)
        self.ledger.started(self.host)
        return info

    def destroy(self, domain_id: uuid.UUID) -> None:
        super().destroy(domain_id)
        self.ledger.stopped(self.host)


def _node(amqp_url: str, tmp_path: Path, host: str, driver: FakeDriver) -> ComputeNode:
    config = ComputeConfig(
        host=host,
        state_dir=tmp_path / host,
        amqp_url=amqp_url,
        driver="fake",
        allowed_boot_dirs=[BOOT_DIR],
        heartbeat_interval_s=0.5,
    )
    return ComputeNode(config, driver).start()


def test_a_start_timed_out_on_a_live_host_never_runs_beside_its_retry(
    amqp_url: str, make_bus: Callable[..., Bus], tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    slow_host, other_host = f"slow-{tag}", f"other-{tag}"
    ledger = Ledger()
    # The slow host has the most free RAM: the spread weigher (top_n 1) picks it first.
    slow = LedgerDriver(slow_host, ledger, 65536, hold=True)
    other = LedgerDriver(other_host, ledger, 16384, hold=False)
    nodes = [_node(amqp_url, tmp_path, slow_host, slow)]
    nodes.append(_node(amqp_url, tmp_path, other_host, other))
    config = SchedulerConfig(
        amqp_url=amqp_url,
        replica=f"slow-{tag}",
        compute_timeout_s=COMPUTE_TIMEOUT_S,
        top_n=1,
        cleanup_timeout_s=30.0,
    )
    scheduler = Scheduler(config).start()
    bus = make_bus()
    try:
        scheduler.wait_for_hosts(2)
        for host in (slow_host, other_host):  # the other tests' hosts are long gone
            deadline = time.monotonic() + 30
            while host not in scheduler.state.hosts:
                assert time.monotonic() < deadline, host
                time.sleep(0.05)
        spec = DomainSpec.model_validate(
            {"name": f"slow-{tag}", "memory_mib": 32, "boot": {"kernel": KERNEL}}
        )
        command = ScheduleDomain(spec=spec, project="p", privileged=True)
        placement = bus.call(routing.SCHEDULER_QUEUE, command, timeout=90)
        assert isinstance(placement, Placement)
        assert placement.host == other_host
        assert [a.host for a in placement.attempts] == [slow_host]
        # Whatever the slow host still had to do with it, it has done (or never will).
        deadline = time.monotonic() + 30
        while slow_host not in ledger.spawned or nodes[0].store.get(spec.uuid) is not None:
            assert time.monotonic() < deadline, "the slow host kept the domain"
            time.sleep(0.1)
        assert ledger.most == 1, f"two hosts ran the domain at once: {ledger.spawned}"
        assert ledger.spawned == [slow_host, other_host]
        assert ledger.running == {other_host}
    finally:
        slow.go.set()
        scheduler.stop()
        for node in nodes:
            node.stop()
