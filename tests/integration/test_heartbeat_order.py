"""A compute node beats at once when room frees or its switch turns, ahead of the event that
says so: two fake-driver nodes (processes of their own, heartbeats every 60 s, so only those
beats can show the change in time) and one subscription to their heartbeats and domain events,
which the broker delivers in the order each node published them. The schedulers count a
host's usage from its heartbeats, so a request that follows a destroy, a migration or an
enable is judged on the room as it is, not on the room an interval ago."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from protos import routing
from protos.base import Message
from protos.codec import Envelope
from protos.commands import DefineDomain, DestroyDomain, StartDomain
from protos.domain import BootSpec, DomainSpec
from protos.events import DomainMigrationProgress, DomainStopped
from protos.host import HostHeartbeat
from protos.migration import MigrationJob, MigrationParams, StartMigration
from protos.scheduler import SetHostEnabled
from services.bus import Bus
from tests.bootfiles import BOOT_DIR, KERNEL
from tests.integration.compute_harness import ComputeProcess, call

pytestmark = pytest.mark.integration


class Arrivals:
    """Heartbeats and domain events of the nodes, in the order they arrived."""

    def __init__(self, bus: Bus, hosts: list[str]) -> None:
        self.seen: list[Message] = []
        self._cond = threading.Condition()
        keys = [routing.event_key("host", "heartbeat", h) for h in hosts] + ["domain.#"]
        self.subscription = bus.subscribe(keys, self._on)

    def _on(self, _envelope: Envelope, message: Message) -> None:
        with self._cond:
            self.seen.append(message)
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.seen)

    def wait_for(self, since: int, match: Callable[[Message], bool], timeout: float = 10) -> int:
        """The index of the first arrival from `since` on that `match`es."""
        with self._cond:
            found: list[int] = []

            def look() -> bool:
                found[:] = [i for i in range(since, len(self.seen)) if match(self.seen[i])]
                return bool(found)

            assert self._cond.wait_for(look, timeout), self.seen[since:]
            return found[0]


Nodes = tuple[ComputeProcess, ComputeProcess, Bus, Arrivals]


@pytest.fixture(scope="module")
def nodes(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    tmp_path = tmp_path_factory.mktemp("beats")
    tag = uuid.uuid4().hex[:6]
    env = {
        "FLOTILLA_DRIVER": "fake",
        "FLOTILLA_ALLOWED_BOOT_DIRS": str(BOOT_DIR),
        "FLOTILLA_RESERVED_HOST_MEMORY_MIB": "0",
        "FLOTILLA_HEARTBEAT_INTERVAL_S": "60",
    }
    bus = Bus(amqp_url, source=f"test-beats-{tag}").start(timeout=30)
    watcher = Bus(amqp_url, source=f"test-beats-watch-{tag}").start(timeout=30)
    pair = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        pair.append(ComputeProcess(amqp_url, tmp_path / name, f"beat-{name}-{tag}", env))
    arrivals = Arrivals(watcher, [n.host for n in pair])
    for node in pair:
        node.start(bus)
    yield pair[0], pair[1], bus, arrivals
    for node in pair:
        node.stop()
    arrivals.subscription.close()
    bus.close()
    watcher.close()


def beat_of(host: str, check: Callable[[HostHeartbeat], bool]) -> Callable[[Message], bool]:
    return lambda m: isinstance(m, HostHeartbeat) and m.host == host and check(m)


def running(bus: Bus, node: ComputeProcess, vcpus: int) -> DomainSpec:
    spec = DomainSpec(name=f"hb-{uuid.uuid4().hex[:6]}", vcpus=vcpus, boot=BootSpec(kernel=KERNEL))
    call(bus, node.queue, DefineDomain(spec=spec))
    call(bus, node.queue, StartDomain(domain_id=spec.uuid))
    return spec


def test_a_destroy_frees_the_room_in_a_heartbeat_ahead_of_its_event(nodes: Nodes) -> None:
    a, _, bus, arrivals = nodes
    spec = running(bus, a, vcpus=3)
    since = arrivals.mark()
    call(bus, a.queue, DestroyDomain(domain_id=spec.uuid))
    stopped = arrivals.wait_for(
        since, lambda m: isinstance(m, DomainStopped) and m.domain_id == spec.uuid
    )
    freed = arrivals.wait_for(since, beat_of(a.host, lambda b: b.usage.vcpus == 0))
    assert freed < stopped, arrivals.seen[since:]


def test_a_host_switch_is_in_a_heartbeat_at_once(nodes: Nodes) -> None:
    a, _, bus, arrivals = nodes
    for enabled in (False, True):
        since = arrivals.mark()
        started = time.monotonic()
        bus.call(a.queue, SetHostEnabled(enabled=enabled, reason="test"), timeout=20)
        arrivals.wait_for(since, beat_of(a.host, lambda b, e=enabled: b.enabled is e))  # type: ignore[misc]
        assert time.monotonic() - started < 10  # not the 60 s interval's beat


def test_a_migration_says_the_targets_claim_count_and_frees_the_source_first(
    nodes: Nodes,
) -> None:
    a, b, bus, arrivals = nodes
    spec = running(bus, a, vcpus=2)
    since = arrivals.mark()
    command = StartMigration(domain_id=spec.uuid, target=b.host, params=MigrationParams())
    job = bus.call(a.queue, command, timeout=30)
    assert isinstance(job, MigrationJob), job
    assert job.target_claim_seq is not None  # the target took the domain at this count
    done = arrivals.wait_for(
        since,
        lambda m: (
            isinstance(m, DomainMigrationProgress)
            and m.domain_id == spec.uuid
            and m.phase == "done"
        ),
        timeout=30,
    )
    freed = arrivals.wait_for(since, beat_of(a.host, lambda hb: hb.usage.vcpus == 0))
    assert freed < done, arrivals.seen[since:]
    final = arrivals.seen[done]
    assert isinstance(final, DomainMigrationProgress)
    assert final.target_claim_seq == job.target_claim_seq
