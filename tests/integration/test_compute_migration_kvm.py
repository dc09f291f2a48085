"""Live migration of the test guest between two KVM compute node processes on a real broker:
its counter goes on without a restart, the events arrive with seq unbroken, the target lists
the domain and the source does not."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from compute_node.driver import Driver
from compute_node.kvm import KvmDriver
from protos.bindings import DiskBinding
from protos.commands import (
    DefineDomain,
    DestroyDomain,
    GetConsole,
    GetDomainInfo,
    ListDomains,
    StartDomain,
    UndefineDomain,
)
from protos.domain import BootSpec, DiskSpec, DomainSpec, PowerState
from protos.events import DomainMigrationProgress
from protos.migration import GetMigrationJob, MigrationJob, MigrationPhase, StartMigration
from protos.replies import ConsoleOutput, DomainInfo, DomainList
from services.bus import Bus
from tests.integration.compute_harness import ComputeProcess, EventLog, call
from tests.integration.conftest import MakeBus

pytestmark = [pytest.mark.integration, pytest.mark.kvm]

if KvmDriver.prepare_incoming is Driver.prepare_incoming:
    pytest.skip("the KVM driver cannot migrate on this branch", allow_module_level=True)


@pytest.fixture
def guest() -> Path:
    import native
    import native.testguest

    reason = native.kvm_unavailable_reason()
    if reason is not None:
        pytest.skip(f"KVM unavailable: {reason}")
    return native.testguest.build()


@pytest.fixture
def pair(
    amqp_url: str, tmp_path: Path, make_bus: MakeBus, guest: Path
) -> Iterator[tuple[ComputeProcess, ComputeProcess, Bus, EventLog]]:
    tag = uuid.uuid4().hex[:6]
    env = {"FLOTILLA_ALLOWED_BOOT_DIRS": str(guest.parent)}
    bus = make_bus("test-client")
    events = EventLog(make_bus("test-watcher"))
    nodes = []
    for name in ("src", "dst"):
        (tmp_path / name).mkdir()
        nodes.append(ComputeProcess(amqp_url, tmp_path / name, f"kmig-{name}-{tag}", env))
    for node in nodes:
        node.start(bus)
    yield nodes[0], nodes[1], bus, events
    for node in nodes:
        node.stop()
    events.subscription.close()
    for node in nodes:  # guests a failed test left behind, by the pids their VMMs recorded
        for pid_file in (node.state_dir / "domains").glob("*/vmm.pid"):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ValueError, ProcessLookupError):
                pass


def console(bus: Bus, node: ComputeProcess, domain_id: uuid.UUID) -> str:
    reply = bus.call(node.queue, GetConsole(domain_id=domain_id), timeout=10)
    assert isinstance(reply, ConsoleOutput)
    return reply.data


def counters(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"COUNTER (\d+)\n", text)]


def wait_counter(bus: Bus, node: ComputeProcess, domain_id: uuid.UUID, above: int) -> str:
    deadline = time.monotonic() + 20
    while True:
        text = console(bus, node, domain_id)
        if counters(text) and counters(text)[-1] > above:
            return text
        assert time.monotonic() < deadline, text[-400:]
        time.sleep(0.1)


@pytest.mark.slow
def test_the_test_guest_migrates_live_between_two_nodes(
    pair: tuple[ComputeProcess, ComputeProcess, Bus, EventLog], guest: Path
) -> None:
    src, dst, bus, events = pair
    spec = DomainSpec(
        name=f"kmig-{uuid.uuid4().hex[:6]}",
        boot=BootSpec(kernel=str(guest), cmdline="ready counter"),
        memory_mib=64,
    )
    call(bus, src.queue, DefineDomain(spec=spec))
    call(bus, src.queue, StartDomain(domain_id=spec.uuid))
    before = counters(wait_counter(bus, src, spec.uuid, 2))[-1]
    reply = bus.call(src.queue, StartMigration(domain_id=spec.uuid, target=dst.host), timeout=30)
    assert isinstance(reply, MigrationJob), reply
    deadline = time.monotonic() + 60
    while True:
        job = bus.call(src.queue, GetMigrationJob(domain_id=spec.uuid), timeout=10)
        assert isinstance(job, MigrationJob)
        if job.phase in (MigrationPhase.DONE, MigrationPhase.FAILED, MigrationPhase.CANCELLED):
            break
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert job.phase is MigrationPhase.DONE, job
    assert job.downtime_ms is not None
    # The guest counts on at the target, from where it was: no restart.
    text = wait_counter(bus, dst, spec.uuid, before + 3)
    assert "READY" not in text.split(f"COUNTER {before}\n")[-1]
    seen = events.wait(
        spec.uuid, lambda evs: any(e.TYPE == "domain.started" and e.host == dst.host for e in evs)
    )
    lifecycle = [
        (e.TYPE, str(getattr(e, "detail", "")), e.host, e.seq)
        for e in sorted(seen, key=lambda e: e.seq)
        if not isinstance(e, DomainMigrationProgress)
    ]
    assert lifecycle == [
        ("domain.defined", "added", src.host, 1),
        ("domain.started", "booted", src.host, 2),
        ("domain.suspended", "migrated", src.host, 3),
        ("domain.stopped", "migrated", src.host, 4),
        ("domain.started", "migrated", dst.host, 5),
    ]
    on_dst = bus.call(dst.queue, ListDomains(), timeout=10)
    on_src = bus.call(src.queue, ListDomains(), timeout=10)
    assert isinstance(on_dst, DomainList)
    assert isinstance(on_src, DomainList)
    assert [d.domain_id for d in on_dst.domains] == [spec.uuid]
    assert on_src.domains == []
    info = bus.call(dst.queue, GetDomainInfo(domain_id=spec.uuid), timeout=10)
    assert isinstance(info, DomainInfo)
    assert (info.state, info.seq) == (PowerState.RUNNING, 5)
    call(bus, dst.queue, DestroyDomain(domain_id=spec.uuid))
    bus.call(dst.queue, UndefineDomain(domain_id=spec.uuid), timeout=20)


@pytest.fixture
def shared_pair(
    amqp_url: str, tmp_path: Path, make_bus: MakeBus, guest: Path
) -> Iterator[tuple[ComputeProcess, ComputeProcess, Bus, Path]]:
    """Two KVM nodes that both mount the shared pool `shared` (one directory here)."""
    tag = uuid.uuid4().hex[:6]
    shared = tmp_path / "shared"
    shared.mkdir()
    env = {
        "FLOTILLA_ALLOWED_BOOT_DIRS": str(guest.parent),
        "FLOTILLA_POOLS": json.dumps([{"name": "shared", "path": str(shared), "kind": "shared"}]),
    }
    bus = make_bus("test-client")
    nodes = []
    for name in ("src", "dst"):
        (tmp_path / name).mkdir()
        nodes.append(ComputeProcess(amqp_url, tmp_path / name, f"kvol-{name}-{tag}", env))
    try:
        for node in nodes:
            node.start(bus)
        yield nodes[0], nodes[1], bus, shared
    finally:
        for node in nodes:
            node.stop()
        for node in nodes:
            for pid_file in (node.state_dir / "domains").glob("*/vmm.pid"):
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                except (ValueError, ProcessLookupError):
                    pass


@pytest.mark.slow
def test_a_guest_writing_a_shared_volume_migrates_live(
    shared_pair: tuple[ComputeProcess, ComputeProcess, Bus, Path], guest: Path
) -> None:
    """The target prepares while the source's VMM holds the volume's lock; the lock moves at
    the commit and the guest's writes after the switch land (docs/storage.md, "Locks")."""
    src, dst, bus, shared = shared_pair
    vid = uuid.uuid4()
    volume = shared / "volumes" / str(vid)
    volume.parent.mkdir(exist_ok=True)
    with volume.open("wb") as f:
        f.truncate(1 << 20)
    spec = DomainSpec(
        name=f"kvol-{uuid.uuid4().hex[:6]}",
        boot=BootSpec(
            kernel=str(guest),
            cmdline="ready blkwrite=0,8,3 blkflush sleep=6000 blkwrite=64,8,5 "
            "blkverify=64,8,5 blkflush counter",
        ),
        memory_mib=64,
        disks=[DiskSpec(target="vda", volume_id=vid)],
    )
    binding = DiskBinding(target="vda", volume_id=vid, pool="shared")
    call(bus, src.queue, DefineDomain(spec=spec, disks=[binding]))
    call(bus, src.queue, StartDomain(domain_id=spec.uuid))
    deadline = time.monotonic() + 20
    while "BLK write sector=0 count=8 status=ok" not in console(bus, src, spec.uuid):
        assert time.monotonic() < deadline, console(bus, src, spec.uuid)[-400:]
        time.sleep(0.1)
    reply = bus.call(src.queue, StartMigration(domain_id=spec.uuid, target=dst.host), timeout=30)
    assert isinstance(reply, MigrationJob), reply
    deadline = time.monotonic() + 60
    while True:
        job = bus.call(src.queue, GetMigrationJob(domain_id=spec.uuid), timeout=10)
        assert isinstance(job, MigrationJob)
        if job.phase in (MigrationPhase.DONE, MigrationPhase.FAILED, MigrationPhase.CANCELLED):
            break
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert job.phase is MigrationPhase.DONE, job
    # The second write ran at the target, after the switch, and landed on the volume.
    text = wait_counter(bus, dst, spec.uuid, 1)
    assert "BLK verify sector=64 count=8 ok" in text
    assert "BLK write sector=0 " not in text
    data = volume.read_bytes()
    assert data[:512] != bytes(512)
    assert data[64 * 512 : 72 * 512] != bytes(8 * 512)
    call(bus, dst.queue, DestroyDomain(domain_id=spec.uuid))
    bus.call(dst.queue, UndefineDomain(domain_id=spec.uuid), timeout=20)
