"""Live migration between two KvmDrivers (docs/migration.md, "The control plane").

Two drivers with their own domain dirs in this process play the source and the target host;
each guest is a VMM process of its own, the stream goes over loopback. The test guest counts
(`counter`, a line every 10 ms) after writing a region whose checksum it printed (`memtest`),
or rewrites 8 MiB forever (`rewrite=8`). Every run must end with exactly one machine running
the guest, and the events at both sinks exactly as compute_node/driver.py says.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from compute_node.driver import DriverError, IncomingMachine, MigrationStats
from compute_node.kvm import KvmDriver
from compute_node.vmm.client import VmmClient, VmmGone, end
from protos.domain import DomainSpec, PowerState
from protos.migration import MigrationParams, TimeoutAction
from tests.kvm.test_driver_save import Host, counters, hosts, make_spec
from tests.kvm.test_migration_native import Relay

# The target's RESUMED record header on the wire (type 18, flags 0, 16 bytes; migrate.h).
RESUMED = (18).to_bytes(4, "little") + bytes(4) + (16).to_bytes(8, "little")

__all__ = ["hosts"]  # the fixture, shared with test_driver_save

MIGRATED = [("started", "migrated", "")]


@pytest.fixture
def two(hosts: Callable[[str], Host]) -> Iterator[tuple[Host, Host]]:
    """The source and the target host; any VMM left in their dirs is ended afterwards (a
    target still waiting has no events, so the hosts' own clean-up does not know of it)."""
    a, b = hosts("a"), hosts("b")
    yield a, b
    for host in (a, b):
        for directory in host.driver.domains_dir.iterdir():
            end(directory)


def running(host: Host, spec: DomainSpec, work: str) -> int:
    """Boots `work` after memtest on `host`; returns the memtest checksum the guest printed."""
    host.driver.spawn(spec, host.boot_files())
    text = host.wait_console(spec.uuid, r"COUNTER 3\b")
    m = re.search(r"MEMTEST mib=16 base=0x[0-9a-f]+ checksum=0x([0-9a-f]{16})", text)
    assert m is not None, text
    return int(m.group(1), 16)


def counts_on(host: Host, spec: DomainSpec, after: int) -> None:
    host.wait_console(spec.uuid, rf"COUNTER {after + 5}\b")


def gone(host: Host, spec: DomainSpec, timeout: float = 10.0) -> bool:
    """The domain's VMM on `host` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            VmmClient(host.driver.directory(spec.uuid), timeout=1.0).status()
        except VmmGone:
            return True
        time.sleep(0.02)
    return False


def events_at(host: Host, spec: DomainSpec, n: int) -> list[tuple[str, str, str]]:
    """The domain's events at `host` once there are `n` (the target's VMM journals them as
    its guest starts, after the source's migrate_out returned)."""
    deadline = time.monotonic() + 10
    while len(host.kinds(spec.uuid)) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # and no more come
    return host.kinds(spec.uuid)


def source_runs_on(source: Host, spec: DomainSpec, before: list[tuple[str, str, str]]) -> None:
    assert source.driver.get_info(spec.uuid).state is PowerState.RUNNING
    assert source.kinds(spec.uuid) == before  # nothing happened to it, as far as events go
    last = counters(source.console(spec.uuid))[-1]
    counts_on(source, spec, last)


@pytest.mark.parametrize("work", ["counter", "rewrite=8"])
def test_a_running_guest_moves_and_counts_on(
    two: tuple[Host, Host], test_guest: Path, work: str
) -> None:
    a, b = two
    assert a.driver.capabilities().live_migration is True
    spec = make_spec(test_guest, f"ready echo memtest=16 {work}")
    running(a, spec, work)
    target = b.driver.prepare_incoming(spec, b.boot_files())
    assert re.fullmatch(r"[0-9a-f]{64}", target.token)
    assert b.kinds(spec.uuid) == []  # nothing while it waits
    seen: list[MigrationStats] = []
    t0 = time.monotonic()
    outcome = a.driver.migrate_out(spec.uuid, target, MigrationParams(verify=True), seen.append)
    elapsed = time.monotonic() - t0
    assert outcome.committed, outcome
    assert outcome.phase == "done"
    assert outcome.error is None
    # The pause the target measured, and the source's own measure of it (one host's clock).
    assert outcome.downtime_ms is not None
    assert outcome.paused_ms is not None
    assert 0 < outcome.downtime_ms <= outcome.paused_ms
    assert outcome.stats.bytes_sent > 0
    assert outcome.stats.memory_bytes == 64 << 20
    # Progress at most every MIGRATION_PROGRESS_S (1 s), never after the end.
    assert len(seen) <= elapsed + 1
    assert all(s.phase in ("setup", "precopy", "stopcopy", "commit") for s in seen)
    # The source's machine is gone (its VMM exited), the target's counts on: no reboot.
    assert a.kinds(spec.uuid)[-2:] == [("paused", "migrating", ""), ("stopped", "migrated", "")]
    assert [k for k, _, _ in a.kinds(spec.uuid)] == ["started", "paused", "stopped"]
    assert a.driver.get_info(spec.uuid).state is PowerState.SHUTOFF
    assert gone(a, spec)
    assert events_at(b, spec, 1) == MIGRATED
    assert b.driver.get_info(spec.uuid).state is PowerState.RUNNING
    source_text = a.console(spec.uuid)  # its console log stays after the VMM
    last = counters(source_text)[-1]
    counts_on(b, spec, last)
    target_text = b.console(spec.uuid)
    assert "READY" not in target_text
    assert "MEMTEST" not in target_text  # memtest ran once, at the source
    joined = counters(source_text + target_text)
    start = joined.index(counters(source_text)[0])
    # Verify mode checked every page's checksum on arrival and all of RAM before the commit
    # (the commit is refused on a difference), so the memtest region arrived as written.
    if work == "counter":
        run = joined[start:]
        # The switch may fall inside a line: at most the line it cut is unreadable.
        missing = sorted(set(range(run[0], run[-1] + 1)) - set(run))
        assert len(missing) <= 1, missing
    # After a compute node restart, a new driver adopts the migrated-in machine.
    b.driver.close()
    again = KvmDriver(b.driver.domains_dir)
    events: list[tuple[str, str]] = []
    again.set_event_sink(lambda e: events.append((e.kind.value, e.reason)))
    info = again.adopt(spec.uuid, after_n=1)
    assert info is not None
    assert info.state is PowerState.RUNNING
    again.destroy(spec.uuid)
    assert events == [("stopped", "destroyed")]
    again.close()


def test_a_paused_guest_arrives_paused(two: tuple[Host, Host], test_guest: Path) -> None:
    a, b = two
    spec = make_spec(test_guest, "ready echo memtest=16 counter")
    running(a, spec, "counter")
    a.driver.pause(spec.uuid)
    frozen = counters(a.console(spec.uuid))[-1]
    target = b.driver.prepare_incoming(spec, b.boot_files(), paused=True)
    outcome = a.driver.migrate_out(spec.uuid, target, MigrationParams(), lambda _s: None)
    assert outcome.committed
    # Paused already: no pause of the migration's own.
    assert a.kinds(spec.uuid) == [
        ("started", "", "booted"),
        ("paused", "host", ""),
        ("stopped", "migrated", ""),
    ]
    assert events_at(b, spec, 2) == [*MIGRATED, ("paused", "migrated", "")]
    assert b.driver.get_info(spec.uuid).state is PowerState.PAUSED
    time.sleep(0.1)
    assert counters(b.console(spec.uuid)) == []  # it never ran here: not one line
    b.driver.resume(spec.uuid)
    counts_on(b, spec, frozen)


def test_cancel_mid_precopy_leaves_the_source_running_and_the_target_gone(
    two: tuple[Host, Host], test_guest: Path
) -> None:
    a, b = two
    spec = make_spec(test_guest, "ready echo memtest=16 rewrite=8")
    running(a, spec, "rewrite=8")
    before = a.kinds(spec.uuid)
    target = b.driver.prepare_incoming(spec, b.boot_files())
    seen: list[MigrationStats] = []

    def cancel(stats: MigrationStats) -> None:
        seen.append(stats)
        a.driver.migration_cancel(spec.uuid)

    # Capped at 4 MiB/s the first pass over 64 MiB takes seconds: the cancel hits pre-copy.
    params = MigrationParams(bandwidth_mibps=4)
    outcome = a.driver.migrate_out(spec.uuid, target, params, cancel)
    assert not outcome.committed
    assert outcome.phase == "cancelled"
    assert seen
    assert seen[0].phase == "precopy"
    assert "cancel" in (outcome.error or "")
    source_runs_on(a, spec, before)
    assert gone(b, spec)
    assert b.kinds(spec.uuid) == []
    b.driver.cancel_incoming(spec.uuid)  # a no-op now


def test_the_target_vmm_killed_mid_stream_leaves_the_source_running(
    two: tuple[Host, Host], test_guest: Path
) -> None:
    a, b = two
    spec = make_spec(test_guest, "ready echo memtest=16 rewrite=8")
    running(a, spec, "rewrite=8")
    before = a.kinds(spec.uuid)
    target = b.driver.prepare_incoming(spec, b.boot_files())
    pid = b.driver.get_info(spec.uuid).pid
    assert pid is not None

    def kill(stats: MigrationStats) -> None:
        if stats.phase == "precopy":
            os.kill(pid, signal.SIGKILL)

    outcome = a.driver.migrate_out(spec.uuid, target, MigrationParams(bandwidth_mibps=4), kill)
    assert not outcome.committed
    assert outcome.phase == "failed"
    source_runs_on(a, spec, before)
    assert gone(b, spec)
    assert b.kinds(spec.uuid) == []


def test_a_wrong_token_is_refused_and_the_target_waits_on(
    two: tuple[Host, Host], test_guest: Path
) -> None:
    a, b = two
    spec = make_spec(test_guest, "ready echo memtest=16 counter")
    running(a, spec, "counter")
    before = a.kinds(spec.uuid)
    target = b.driver.prepare_incoming(spec, b.boot_files())
    forged = IncomingMachine(target.address, target.port, uuid.uuid4().hex * 2)
    outcome = a.driver.migrate_out(spec.uuid, forged, MigrationParams(), lambda _s: None)
    assert not outcome.committed
    assert outcome.phase == "failed"
    assert "wrong migration token" in (outcome.error or "")
    source_runs_on(a, spec, before)
    # The impostor spent nothing: the target still waits, and cancelling it is silent.
    assert not gone(b, spec, timeout=0.2)
    b.driver.cancel_incoming(spec.uuid)
    assert gone(b, spec)
    assert b.kinds(spec.uuid) == []


def test_a_budget_raised_on_the_fly_completes_a_migration_that_could_not_converge(
    two: tuple[Host, Host], test_guest: Path
) -> None:
    a, b = two
    spec = make_spec(test_guest, "ready echo memtest=16 rewrite=8")
    running(a, spec, "rewrite=8")
    target = b.driver.prepare_incoming(spec, b.boot_files())
    # A 1 µs pause never fits (the round trip alone is more) and nothing throttles the guest.
    params = MigrationParams(max_downtime_ms=0.001, auto_converge=False)
    seen: list[MigrationStats] = []
    raised = threading.Event()

    def steer(stats: MigrationStats) -> None:
        seen.append(stats)
        if len(seen) == 2:  # two seconds of pre-copy that did not end
            a.driver.migration_set(spec.uuid, max_downtime_ms=300)
            raised.set()

    outcome = a.driver.migrate_out(spec.uuid, target, params, steer)
    assert raised.is_set()
    assert seen[1].phase == "precopy"
    assert seen[1].iteration > 1
    assert outcome.committed
    assert outcome.stats.throttle_pct == 0
    assert events_at(b, spec, 1) == MIGRATED
    counts_on(b, spec, counters(a.console(spec.uuid))[-1])
    with pytest.raises(DriverError) as none:
        b.driver.migration_set(spec.uuid, max_downtime_ms=10)
    assert none.value.code == "conflict"


@pytest.mark.parametrize("action", [TimeoutAction.ABORT, TimeoutAction.PAUSE])
def test_the_timeout_aborts_or_pauses_to_complete(
    two: tuple[Host, Host], test_guest: Path, action: TimeoutAction
) -> None:
    """A migration that cannot converge meets its timeout: `abort` leaves the source running
    and the target gone; `pause` pauses the guest for the rest, and it completes."""
    a, b = two
    spec = make_spec(test_guest, "ready echo memtest=16 rewrite=8")
    running(a, spec, "rewrite=8")
    before = a.kinds(spec.uuid)
    target = b.driver.prepare_incoming(spec, b.boot_files())
    params = MigrationParams(
        max_downtime_ms=0.001, auto_converge=False, timeout_s=1.0, timeout_action=action
    )
    t0 = time.monotonic()
    outcome = a.driver.migrate_out(spec.uuid, target, params, lambda _s: None)
    assert time.monotonic() - t0 < 10
    if action is TimeoutAction.ABORT:
        assert not outcome.committed
        assert outcome.phase == "failed"
        assert "timed out" in (outcome.error or "")
        source_runs_on(a, spec, before)
        assert gone(b, spec)
        assert b.kinds(spec.uuid) == []
    else:
        assert outcome.committed
        assert a.kinds(spec.uuid)[-2:] == [("paused", "migrating", ""), ("stopped", "migrated", "")]
        assert events_at(b, spec, 1) == MIGRATED
        counts_on(b, spec, counters(a.console(spec.uuid))[-1])


def test_a_commit_the_target_never_confirms_leaves_the_source_paused(
    two: tuple[Host, Host], test_guest: Path
) -> None:
    """The connection drops as the target's RESUMED comes back: the target runs the guest,
    the source cannot know it and stays paused (DriverError `migration_unconfirmed`); one
    running copy still."""
    a, b = two
    spec = make_spec(test_guest, "ready echo memtest=16 counter")
    running(a, spec, "counter")
    target = b.driver.prepare_incoming(spec, b.boot_files())
    relay = Relay((target.address, target.port), cut_at=RESUMED, downstream=False)
    via = IncomingMachine(str(relay.address[0]), int(relay.address[1]), target.token)
    with pytest.raises(DriverError) as unconfirmed:
        a.driver.migrate_out(spec.uuid, via, MigrationParams(), lambda _s: None)
    relay.join()
    assert relay.cut.is_set()
    assert unconfirmed.value.code == "migration_unconfirmed"
    assert a.kinds(spec.uuid)[-1] == ("paused", "migrating", "")
    assert a.driver.get_info(spec.uuid).state is PowerState.PAUSED
    assert events_at(b, spec, 1) == MIGRATED
    counts_on(b, spec, counters(a.console(spec.uuid))[-1])
    # Whoever learns the target's fate decides: here it runs, so the source goes.
    a.driver.destroy(spec.uuid)
    assert a.kinds(spec.uuid)[-1] == ("stopped", "destroyed", "host")


def test_destroying_the_source_mid_precopy_ends_the_migration_first(
    two: tuple[Host, Host], test_guest: Path
) -> None:
    """A destroy while the migration streams: the VMM cancels it (the engine holds the
    machine), answers the migration (cancelled), then destroys; the target ends silently."""
    a, b = two
    spec = make_spec(test_guest, "ready echo memtest=16 rewrite=8")
    running(a, spec, "rewrite=8")
    target = b.driver.prepare_incoming(spec, b.boot_files())

    def destroy(_stats: MigrationStats) -> None:
        if a.driver.get_info(spec.uuid).state is PowerState.RUNNING:
            a.driver.destroy(spec.uuid)

    outcome = a.driver.migrate_out(spec.uuid, target, MigrationParams(bandwidth_mibps=4), destroy)
    assert not outcome.committed
    assert outcome.phase == "cancelled"
    assert a.kinds(spec.uuid) == [("started", "", "booted"), ("stopped", "destroyed", "host")]
    assert gone(a, spec)
    assert gone(b, spec)
    assert b.kinds(spec.uuid) == []


def test_a_target_of_an_older_release_is_spoken_to_in_stream_version_1(
    two: tuple[Host, Host], test_guest: Path
) -> None:
    """The target says the newest stream version its VMM speaks; one that names none (its
    IncomingEndpoint predates the field) gets version 1, through the VMM process too."""
    a, b = two
    spec = make_spec(test_guest, "ready echo memtest=16 counter")
    running(a, spec, "counter")
    target = b.driver.prepare_incoming(spec, b.boot_files())
    assert target.stream_version == 2
    newer = dataclasses.replace(target, stream_version=3)  # the VMM gets the version: refused
    with pytest.raises(DriverError, match=r"stream_version must be 1\.\.2"):
        a.driver.migrate_out(spec.uuid, newer, MigrationParams(), lambda _s: None)
    older = dataclasses.replace(target, stream_version=1)
    outcome = a.driver.migrate_out(spec.uuid, older, MigrationParams(verify=True), lambda _s: None)
    assert outcome.committed, outcome
    counts_on(b, spec, counters(a.console(spec.uuid))[-1])
