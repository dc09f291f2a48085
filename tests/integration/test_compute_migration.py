"""Migration between two fake-driver compute nodes, each a process of its own, on a real
broker: the machine streams over loopback TCP between the processes, the events arrive on the
bus with seq unbroken, and a target killed mid-way leaves exactly one copy (the source's)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from protos.codec import Envelope
from protos.commands import (
    DefineDomain,
    DestroyDomain,
    GetDomainInfo,
    ListDomains,
    StartDomain,
    UndefineDomain,
)
from protos.domain import BootSpec, DomainSpec, PowerState
from protos.events import DomainEvent, DomainMigrationProgress
from protos.host import HostHeartbeat
from protos.migration import (
    AbortMigration,
    GetMigrationJob,
    MigrationJob,
    MigrationParams,
    MigrationPhase,
    StartMigration,
)
from protos.replies import DomainInfo, DomainList
from services.bus import Bus, RemoteError
from tests.bootfiles import BOOT_DIR, KERNEL
from tests.integration.compute_harness import ComputeProcess, EventLog, call

pytestmark = pytest.mark.integration


class Usage:
    """The last heartbeat's vCPU usage of each host."""

    def __init__(self, bus: Bus) -> None:
        self.vcpus: dict[str, int] = {}
        self._cond = threading.Condition()
        self.subscription = bus.subscribe(["host.heartbeat.*"], self._on)

    def _on(self, _envelope: Envelope, beat: object) -> None:
        if isinstance(beat, HostHeartbeat):
            with self._cond:
                self.vcpus[beat.host] = beat.usage.vcpus
                self._cond.notify_all()

    def wait(self, want: dict[str, int], timeout: float = 15.0) -> None:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: all(self.vcpus.get(h) == n for h, n in want.items()), timeout
            )
            assert ok, (self.vcpus, want)


Cluster = tuple[ComputeProcess, ComputeProcess, Bus, EventLog, Usage]


@pytest.fixture(scope="module")
def cluster(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two nodes for the module (starting them is most of its time); each test migrates a
    domain of its own. The test that kills the target starts it again."""
    tmp_path = tmp_path_factory.mktemp("migration")
    tag = uuid.uuid4().hex[:6]
    env = {
        "FLOTILLA_DRIVER": "fake",
        "FLOTILLA_ALLOWED_BOOT_DIRS": str(BOOT_DIR),
        "FLOTILLA_RESERVED_HOST_MEMORY_MIB": "0",
    }
    buses = [Bus(amqp_url, source=f"test-{name}-{tag}").start(timeout=30) for name in "abc"]
    bus = buses[0]
    events = EventLog(buses[1])
    usage = Usage(buses[2])
    nodes = []
    for name in ("src", "dst"):
        (tmp_path / name).mkdir()
        nodes.append(ComputeProcess(amqp_url, tmp_path / name, f"mig-{name}-{tag}", env))
    for node in nodes:
        node.start(bus)
    yield nodes[0], nodes[1], bus, events, usage
    for node in nodes:
        node.stop()
    events.subscription.close()
    usage.subscription.close()
    for b in buses:
        b.close()


def running(bus: Bus, node: ComputeProcess, vcpus: int = 2) -> DomainSpec:
    spec = DomainSpec(name=f"mig-{uuid.uuid4().hex[:6]}", vcpus=vcpus, boot=BootSpec(kernel=KERNEL))
    call(bus, node.queue, DefineDomain(spec=spec))
    call(bus, node.queue, StartDomain(domain_id=spec.uuid))
    return spec


def migrate(
    bus: Bus,
    source: ComputeProcess,
    target: ComputeProcess,
    spec: DomainSpec,
    params: MigrationParams,
) -> MigrationJob:
    command = StartMigration(domain_id=spec.uuid, target=target.host, params=params)
    job = bus.call(source.queue, command, timeout=30)
    assert isinstance(job, MigrationJob), job
    return job


def ended(
    bus: Bus, node: ComputeProcess, domain_id: uuid.UUID, timeout: float = 30
) -> MigrationJob:
    deadline = time.monotonic() + timeout
    while True:
        job = bus.call(node.queue, GetMigrationJob(domain_id=domain_id), timeout=10)
        assert isinstance(job, MigrationJob)
        if job.phase in (MigrationPhase.DONE, MigrationPhase.FAILED, MigrationPhase.CANCELLED):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def remove(bus: Bus, node: ComputeProcess, spec: DomainSpec) -> None:
    """The test's domain goes, so the next test starts from empty hosts."""
    call(bus, node.queue, DestroyDomain(domain_id=spec.uuid))
    assert (
        bus.call(node.queue, UndefineDomain(domain_id=spec.uuid), timeout=20).TYPE == "reply.done"
    )


def listed(bus: Bus, node: ComputeProcess) -> set[uuid.UUID]:
    reply = bus.call(node.queue, ListDomains(), timeout=10)
    assert isinstance(reply, DomainList)
    return {d.domain_id for d in reply.domains}


def lifecycle(events: list[DomainEvent]) -> list[tuple[str, str, str, int]]:
    return [
        (e.TYPE, str(getattr(e, "detail", "")), e.host, e.seq)
        for e in sorted(events, key=lambda e: e.seq)
        if not isinstance(e, DomainMigrationProgress)
    ]


def test_live_migration_between_two_processes(cluster: Cluster) -> None:
    src, dst, bus, events, usage = cluster
    spec = running(bus, src)
    usage.wait({src.host: 2, dst.host: 0})
    migrate(bus, src, dst, spec, MigrationParams())
    job = ended(bus, src, spec.uuid)
    assert job.phase is MigrationPhase.DONE, job
    assert job.downtime_ms is not None
    seen = events.wait(
        spec.uuid, lambda evs: any(e.TYPE == "domain.started" and e.host == dst.host for e in evs)
    )
    assert lifecycle(seen) == [
        ("domain.defined", "added", src.host, 1),
        ("domain.started", "booted", src.host, 2),
        ("domain.suspended", "migrated", src.host, 3),
        ("domain.stopped", "migrated", src.host, 4),
        ("domain.started", "migrated", dst.host, 5),
    ]
    final = events.wait(spec.uuid, lambda evs: any(getattr(e, "phase", "") == "done" for e in evs))
    done = [e for e in final if isinstance(e, DomainMigrationProgress) and e.phase == "done"]
    assert (done[0].host, done[0].seq, done[0].target) == (src.host, 4, dst.host)
    assert spec.uuid in listed(bus, dst)
    assert spec.uuid not in listed(bus, src)
    info = call(bus, dst.queue, GetDomainInfo(domain_id=spec.uuid))
    assert (info.state, info.seq) == (PowerState.RUNNING, 5)
    usage.wait({src.host: 0, dst.host: 2})  # the claim moved
    remove(bus, dst, spec)


def test_abort_keeps_the_guest_on_the_source(cluster: Cluster) -> None:
    src, dst, bus, events, usage = cluster
    spec = running(bus, src)
    migrate(bus, src, dst, spec, MigrationParams(bandwidth_mibps=8))
    time.sleep(0.5)
    job = bus.call(src.queue, AbortMigration(domain_id=spec.uuid), timeout=30)
    assert isinstance(job, MigrationJob)
    assert job.phase is MigrationPhase.CANCELLED, job
    assert spec.uuid in listed(bus, src)
    assert spec.uuid not in listed(bus, dst)
    info = call(bus, src.queue, GetDomainInfo(domain_id=spec.uuid))
    assert (info.state, info.seq) == (PowerState.RUNNING, 2)
    events.wait(spec.uuid, lambda evs: any(getattr(e, "phase", "") == "cancelled" for e in evs))
    assert lifecycle(events.of(spec.uuid))[-1][:2] == ("domain.started", "booted")
    usage.wait({src.host: 2, dst.host: 0})
    remove(bus, src, spec)


def test_a_target_killed_mid_way_leaves_the_source_running(cluster: Cluster) -> None:
    src, dst, bus, events, usage = cluster
    spec = running(bus, src)
    migrate(bus, src, dst, spec, MigrationParams(bandwidth_mibps=8))
    time.sleep(0.5)
    dst.kill()
    job = ended(bus, src, spec.uuid, timeout=90)
    assert job.phase is MigrationPhase.FAILED, job
    info = call(bus, src.queue, GetDomainInfo(domain_id=spec.uuid))
    assert info.state is PowerState.RUNNING
    # The target comes back: the domain is not there (exactly one copy).
    dst.start(bus)
    assert spec.uuid not in listed(bus, dst)
    with pytest.raises(RemoteError, match="not_found"):
        bus.call(dst.queue, GetDomainInfo(domain_id=spec.uuid), timeout=10)
    assert [e[:2] for e in lifecycle(events.of(spec.uuid))] == [
        ("domain.defined", "added"),
        ("domain.started", "booted"),
    ]
    usage.wait({src.host: 2, dst.host: 0})
    remove(bus, src, spec)


def test_cold_migration_moves_the_definition(cluster: Cluster) -> None:
    src, dst, bus, events, _usage = cluster
    spec = DomainSpec(name=f"cold-{uuid.uuid4().hex[:6]}", boot=BootSpec(kernel=KERNEL))
    call(bus, src.queue, DefineDomain(spec=spec))
    migrate(bus, src, dst, spec, MigrationParams(live=False))
    assert ended(bus, src, spec.uuid).phase is MigrationPhase.DONE
    seen = events.wait(spec.uuid, lambda evs: any(e.host == dst.host for e in evs))
    assert lifecycle(seen) == [
        ("domain.defined", "added", src.host, 1),
        ("domain.defined", "migrated", dst.host, 2),
    ]
    assert spec.uuid not in listed(bus, src)
    info = call(bus, dst.queue, StartDomain(domain_id=spec.uuid))
    assert isinstance(info, DomainInfo)
    assert (info.state, info.seq) == (PowerState.RUNNING, 3)
    remove(bus, dst, spec)
