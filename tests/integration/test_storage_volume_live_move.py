"""Live migration of a guest writing a host-local (`dir` pool) volume between two KVM compute
node processes, with the storage service on a real broker: the stream copies the volume into
an empty file the storage service made on the target (docs/storage.md, "Moving a volume
live"). Committed: the target's file holds every write, the catalog names the target, the
source's file is gone. Cancelled: the source runs on with its volume, the catalog is
unchanged, and the target has no file."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from protos.bindings import DiskBinding
from protos.commands import DefineDomain, DestroyDomain, StartDomain
from protos.domain import BootSpec, DiskSpec, DomainSpec
from protos.events import DomainMigrationProgress
from protos.migration import AbortMigration, MigrationParams, MigrationPhase
from protos.volumes import Attachment, AttachVolume, CreateVolume, GetVolume, Volume
from services.bus import Bus
from tests.brokers import STORAGE_EVENTS, purge_queues
from tests.integration.compute_harness import ComputeProcess, EventLog, call
from tests.integration.conftest import MakeBus
from tests.integration.storage_harness import StorageProcess, VolumeWatcher
from tests.integration.storage_harness import call as storage_call
from tests.integration.test_compute_migration import ended, migrate
from tests.integration.test_compute_migration_kvm import console, counters, guest, wait_counter

pytestmark = [pytest.mark.integration, pytest.mark.kvm]
__all__ = ["guest"]
MiB = 1 << 20


class Hosts:
    def __init__(
        self,
        bus: Bus,
        computes: list[ComputeProcess],
        pools: dict[str, Path],
        events: EventLog,
        volume_events: VolumeWatcher,
    ) -> None:
        self.bus = bus
        self.computes = computes
        self.pools = pools
        self.events = events
        self.volume_events = volume_events

    def volume_log(self, volume_id: uuid.UUID) -> list[tuple[str, int, str, str]]:
        """(type, seq, host, from_host) of the volume's events published so far."""
        return [
            (e.TYPE, e.seq, e.host, getattr(e, "from_host", ""))
            for _, e in self.volume_events.all_of(self.bus, volume_id)
        ]

    def volume(self, command: object) -> Volume:
        reply = storage_call(self.bus, command, timeout=60)  # type: ignore[arg-type]
        assert isinstance(reply, Volume), reply
        return reply

    def file(self, host: str, volume_id: uuid.UUID) -> Path:
        return self.pools[host] / "volumes" / str(volume_id)


@pytest.fixture
def hosts(amqp_url: str, tmp_path: Path, make_bus: MakeBus, guest: Path) -> Iterator[Hosts]:
    tag = uuid.uuid4().hex[:6]
    bus = make_bus("test-client")
    events = EventLog(make_bus("test-watcher"))
    volume_events = VolumeWatcher(make_bus("test-volume-watcher"))
    storage = StorageProcess(
        amqp_url,
        f"sqlite:///{tmp_path}/cat.db",
        tmp_path / "storage.log",
        replica="r1",
        agent_hosts=[f"lv{i}-{tag}" for i in range(2)],
        default_pool="local",
    )
    computes: list[ComputeProcess] = []
    pools: dict[str, Path] = {}
    try:
        for host in storage.agent_hosts:
            pool, state = tmp_path / host / "pool", tmp_path / host / "state"
            pool.mkdir(parents=True)
            state.mkdir()
            env = {
                "FLOTILLA_ALLOWED_BOOT_DIRS": str(guest.parent),
                "FLOTILLA_POOLS": json.dumps([{"name": "local", "path": str(pool)}]),
            }
            computes.append(ComputeProcess(amqp_url, state, host, env).start(bus))
            pools[host] = pool
        purge_queues(amqp_url, STORAGE_EVENTS)
        storage.start(bus)
        yield Hosts(bus, computes, pools, events, volume_events)
    finally:
        storage.stop()
        for c in computes:
            c.stop()
        events.subscription.close()
        volume_events.subscription.close()
        for c in computes:  # guests a failed test left behind, by their VMMs' recorded pids
            for pid_file in (c.state_dir / "domains").glob("*/vmm.pid"):
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                except (ValueError, ProcessLookupError):
                    pass


def _running(
    h: Hosts, guest: Path, cmdline: str, size: int
) -> tuple[DomainSpec, Volume, ComputeProcess]:
    """A guest running `cmdline` on the host of a fresh `size` volume it has as vda."""
    vid = uuid.uuid4()
    made = h.volume(
        CreateVolume(volume_id=vid, project="p1", name=f"data-{vid.hex[:8]}", size=size)
    )
    src = next(c for c in h.computes if c.host == made.host)
    spec = DomainSpec(
        name=f"lv-{uuid.uuid4().hex[:6]}",
        boot=BootSpec(kernel=str(guest), cmdline=cmdline),
        memory_mib=64,
        disks=[DiskSpec(target="vda", volume_id=vid)],
    )
    attachment = Attachment(domain_id=spec.uuid, target="vda")
    volume = h.volume(AttachVolume(volume_id=vid, project="p1", attachment=attachment))
    binding = DiskBinding(target="vda", volume_id=vid, pool="local", host=src.host)
    call(h.bus, src.queue, DefineDomain(spec=spec, disks=[binding]))
    call(h.bus, src.queue, StartDomain(domain_id=spec.uuid))
    return spec, volume, src


@pytest.mark.slow
def test_a_guest_writing_a_host_local_volume_migrates_live(hosts: Hosts, guest: Path) -> None:
    h = hosts
    spec, volume, src = _running(
        h,
        guest,
        "ready blkwrite=0,8,3 blkflush sleep=4000 blkwrite=64,8,5 "
        "blkverify=0,8,3 blkverify=64,8,5 blkflush counter",
        4 * MiB,
    )
    dst = next(c for c in h.computes if c is not src)
    deadline = time.monotonic() + 20
    while "BLK write sector=0 count=8 status=ok" not in console(h.bus, src, spec.uuid):
        assert time.monotonic() < deadline, console(h.bus, src, spec.uuid)[-400:]
        time.sleep(0.1)
    source_file = h.file(src.host, volume.volume_id)
    migrate(h.bus, src, dst, spec, MigrationParams())
    job = ended(h.bus, src, spec.uuid)
    assert job.phase is MigrationPhase.DONE, job
    # The first write came with the stream, the second ran at the target, after the switch.
    text = wait_counter(h.bus, dst, spec.uuid, 1)
    assert "BLK verify sector=0 count=8 ok" in text
    assert "BLK verify sector=64 count=8 ok" in text
    assert "BLK write sector=0 " not in text
    data = h.file(dst.host, volume.volume_id).read_bytes()
    assert len(data) == 4 * MiB
    assert data[:512] != bytes(512)
    assert data[64 * 512 : 72 * 512] != bytes(8 * 512)
    moved = h.volume(GetVolume(volume_id=volume.volume_id, project="p1"))
    assert (moved.host, moved.state, moved.pool) == (dst.host, "attached", "local")
    assert not source_file.exists()
    # The block copy's commit is announced once, its seq going on from the volume's.
    assert h.volume_log(volume.volume_id) == [
        ("volume.created", 1, src.host, ""),
        ("volume.attached", 2, src.host, ""),
        ("volume.moved", 3, dst.host, src.host),
    ]
    # The domain's events run on unbroken from the source's to the target's.
    seen = h.events.wait(
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
    call(h.bus, dst.queue, DestroyDomain(domain_id=spec.uuid))


def test_a_cancelled_live_move_leaves_the_volume_on_the_source(hosts: Hosts, guest: Path) -> None:
    h = hosts
    spec, volume, src = _running(h, guest, "ready blkwrite=0,8,3 blkflush counter", 16 * MiB)
    dst = next(c for c in h.computes if c is not src)
    wait_counter(h.bus, src, spec.uuid, 0)
    source_file = h.file(src.host, volume.volume_id)
    with source_file.open("r+b") as f:  # data the copy needs seconds for at 1 MiB/s
        f.seek(8 * MiB)
        f.write(os.urandom(8 * MiB))
    migrate(h.bus, src, dst, spec, MigrationParams(bandwidth_mibps=1))
    time.sleep(1.5)
    assert h.file(dst.host, volume.volume_id).exists()  # the copy under way
    h.bus.call(src.queue, AbortMigration(domain_id=spec.uuid), timeout=30)
    job = ended(h.bus, src, spec.uuid)
    assert job.phase is MigrationPhase.CANCELLED, job
    before = counters_now(h, src, spec.uuid)
    wait_counter(h.bus, src, spec.uuid, before)  # runs on at the source
    deadline = time.monotonic() + 15
    while h.file(dst.host, volume.volume_id).exists():
        assert time.monotonic() < deadline, "the target's copy stayed"
        time.sleep(0.1)
    after = h.volume(GetVolume(volume_id=volume.volume_id, project="p1"))
    assert (after.host, after.state) == (src.host, "attached")
    assert source_file.stat().st_size == 16 * MiB
    # The aborted move announced nothing.
    assert [e[0] for e in h.volume_log(volume.volume_id)] == ["volume.created", "volume.attached"]
    call(h.bus, src.queue, DestroyDomain(domain_id=spec.uuid))


def counters_now(h: Hosts, node: ComputeProcess, domain_id: uuid.UUID) -> int:
    found = counters(console(h.bus, node, domain_id))
    return found[-1] if found else 0


@pytest.mark.slow
def test_a_target_vmm_killed_mid_copy_leaves_the_volume_on_the_source(
    hosts: Hosts, guest: Path
) -> None:
    h = hosts
    spec, volume, src = _running(h, guest, "ready blkwrite=0,8,3 blkflush counter", 16 * MiB)
    dst = next(c for c in h.computes if c is not src)
    wait_counter(h.bus, src, spec.uuid, 0)
    source_file = h.file(src.host, volume.volume_id)
    with source_file.open("r+b") as f:
        f.seek(8 * MiB)
        f.write(os.urandom(8 * MiB))
    migrate(h.bus, src, dst, spec, MigrationParams(bandwidth_mibps=1))
    pid_file = dst.state_dir / "domains" / str(spec.uuid) / "vmm.pid"
    deadline = time.monotonic() + 10
    while not pid_file.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)  # the VMM the target started for it
    job = ended(h.bus, src, spec.uuid)
    assert job.phase is MigrationPhase.FAILED, job
    wait_counter(h.bus, src, spec.uuid, counters_now(h, src, spec.uuid))  # runs on here
    deadline = time.monotonic() + 15
    while h.file(dst.host, volume.volume_id).exists():
        assert time.monotonic() < deadline, "the target's copy stayed"
        time.sleep(0.1)
    after = h.volume(GetVolume(volume_id=volume.volume_id, project="p1"))
    assert (after.host, after.state) == (src.host, "attached")
    call(h.bus, src.queue, DestroyDomain(domain_id=spec.uuid))
