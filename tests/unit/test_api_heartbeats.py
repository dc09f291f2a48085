"""The API's heartbeat writer (services.api.heartbeats): beats coalesce newest per host into
one transaction, an older beat never replaces a newer one, a running writer records a beat
within its interval and `stop()` records what it holds. On the registry's real SQLite."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from protos.domain import PowerState
from protos.host import HostHeartbeat, HostInventory, KvmKind, Resources
from services.api.heartbeats import HeartbeatWriter
from services.api.registry import Registry


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = Registry.open(f"sqlite:///{tmp_path}/registry.db")
    yield reg
    reg.close()


def beat(host: str, used_vcpus: int = 0) -> HostHeartbeat:
    return HostHeartbeat(
        host=host,
        version="0.1.0",
        interval_s=5.0,
        enabled=True,
        inventory=HostInventory(capacity=Resources(vcpus=8, memory_mib=4096), kvm=KvmKind.NONE),
        usage=Resources(vcpus=used_vcpus, memory_mib=0),
        domains_by_state={PowerState.RUNNING: used_vcpus},
    )


def count_writes(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of each record_many call, which still writes to the database."""
    sizes: list[int] = []
    write = registry.hosts.record_many

    def counted(beats: Sequence[tuple[HostHeartbeat, float]]) -> None:
        sizes.append(len(beats))
        write(beats)

    monkeypatch.setattr(registry.hosts, "record_many", counted)
    return sizes


def test_held_beats_are_recorded_newest_per_host_in_one_transaction(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = count_writes(registry, monkeypatch)
    writer = HeartbeatWriter(registry)  # not started: flush() by hand
    for i in range(100):  # 20 beats from each of 5 hosts
        writer.offer(beat(f"h{i % 5}", used_vcpus=i % 8), seen_at=1000.0 + i)
    writer.offer(beat("h0", used_vcpus=1), seen_at=10.0)  # a late delivery of an old beat
    assert writer.flush() == 5
    assert writes == [5]
    hosts = {h.name: h for h in registry.hosts.records()}
    assert {name: h.last_seen for name, h in hosts.items()} == {
        f"h{k}": 1095.0 + k for k in range(5)
    }
    assert hosts["h0"].usage.vcpus == 95 % 8
    assert writer.flush() == 0
    assert writes == [5]


def test_a_running_writer_records_promptly_coalesces_a_burst_and_flushes_on_stop(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = count_writes(registry, monkeypatch)
    writer = HeartbeatWriter(registry, interval_s=0.2).start()
    try:
        writer.offer(beat("h1"))
        deadline = time.monotonic() + 2
        while not registry.hosts.records("h1"):
            assert time.monotonic() < deadline, "the beat was not recorded within 2 s"
            time.sleep(0.01)
        for i in range(300):  # a burst: 300 hosts beating at once
            writer.offer(beat(f"burst{i}"))
        deadline = time.monotonic() + 2
        while len(registry.hosts.records()) < 301:
            assert time.monotonic() < deadline, "the burst was not recorded within 2 s"
            time.sleep(0.01)
        assert sum(writes) == 301
        assert len(writes) <= 4  # one per interval, not one per beat
        writer.offer(beat("last"))
    finally:
        writer.stop()
    assert registry.hosts.records("last"), "stop() records what it holds"


def test_one_write_of_several_beats_of_a_host_keeps_the_newest(registry: Registry) -> None:
    registry.hosts.record_many([(beat("d", used_vcpus=1), 200.0), (beat("d", used_vcpus=2), 100.0)])
    registry.hosts.record_many([(beat("d", used_vcpus=3), 150.0)])  # older than the stored one
    [host] = registry.hosts.records("d")
    assert (host.last_seen, host.usage.vcpus) == (200.0, 1)
