"""The registry on SQLite and on a real PostgreSQL: quotas, projection rules, the event log,
hosts, tokens."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from protos.domain import BootSpec, DomainSpec, Fault, PowerState, TaskState
from protos.events import (
    DefinedDetail,
    DomainDefined,
    DomainEvent,
    DomainMigrationProgress,
    DomainResumed,
    DomainStarted,
    DomainStopped,
    DomainSuspended,
    DomainUndefined,
    StartedDetail,
    StoppedDetail,
    UndefinedDetail,
)
from protos.host import HostHeartbeat, HostInventory, KvmKind, Resources
from protos.replies import DomainInfo
from services.api.config import Quota, Role
from services.api.registry import Registry
from services.api.registry.domains import NameInUse, QuotaExceeded
from services.api.registry.projection import Outcome
from tests.pg import fresh_database


@pytest.fixture(params=["sqlite", "postgresql"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    if request.param == "sqlite":
        reg = Registry.open(f"sqlite:///{tmp_path}/registry.db")
        yield reg
        reg.close()
        return
    server = request.getfixturevalue("pg_server")
    with fresh_database(server) as url:
        reg = Registry.open(url)
        yield reg
        reg.close()


def spec(name: str = "", vcpus: int = 1, memory_mib: int = 64) -> DomainSpec:
    return DomainSpec(
        name=name or f"g-{uuid.uuid4().hex[:8]}",
        vcpus=vcpus,
        memory_mib=memory_mib,
        boot=BootSpec(kernel="/k"),
    )


def info(s: DomainSpec, host: str, state: PowerState, seq: int) -> DomainInfo:
    return DomainInfo(
        domain_id=s.uuid,
        name=s.name,
        host=host,
        state=state,
        vcpus=s.vcpus,
        memory_mib=s.memory_mib,
        seq=seq,
    )


def started(s: DomainSpec, host: str, seq: int) -> DomainStarted:
    return DomainStarted(
        domain_id=s.uuid,
        name=s.name,
        host=host,
        seq=seq,
        state=PowerState.RUNNING,
        detail=StartedDetail.BOOTED,
    )


def stopped(s: DomainSpec, host: str, seq: int) -> DomainStopped:
    return DomainStopped(
        domain_id=s.uuid,
        name=s.name,
        host=host,
        seq=seq,
        state=PowerState.SHUTOFF,
        detail=StoppedDetail.DESTROYED,
    )


def apply(reg: Registry, event: DomainEvent) -> Outcome:
    return reg.events.apply(uuid.uuid4().hex, event.routing_key(), event)


def test_create_counts_against_the_quota(registry: Registry) -> None:
    quota = Quota(domains=2, vcpus=3)
    a = registry.domains.create(spec(vcpus=2), "p", quota)
    assert a.task is TaskState.SCHEDULING
    assert a.power is PowerState.NOSTATE
    with pytest.raises(QuotaExceeded) as exc:
        registry.domains.create(spec(vcpus=2), "p", quota)
    assert (exc.value.resource, exc.value.limit, exc.value.used) == ("vcpus", 3, 2)
    registry.domains.create(spec(vcpus=1), "p", quota)
    with pytest.raises(QuotaExceeded) as exc:
        registry.domains.create(spec(vcpus=1), "p", quota)
    assert exc.value.resource == "domains"
    # Another project has its own count.
    registry.domains.create(spec(vcpus=3), "q", quota)
    assert registry.domains.usage("p") == {"domains": 2, "vcpus": 3, "memory_mib": 128}


def test_names_are_unique(registry: Registry) -> None:
    registry.domains.create(spec("web"), "p", Quota())
    for project in ("p", "q"):  # hosts key domains by name, whatever the project
        with pytest.raises(NameInUse):
            registry.domains.create(spec("web"), project, Quota())


def test_concurrent_creates_never_exceed_the_quota(registry: Registry) -> None:
    quota = Quota(domains=3)
    results: list[str] = []

    def create() -> None:
        try:
            registry.domains.create(spec(), "p", quota)
            results.append("ok")
        except QuotaExceeded:
            results.append("over")

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 3
    assert registry.domains.usage("p")["domains"] == 3


def test_projection_ignores_duplicates_stale_and_other_hosts(registry: Registry) -> None:
    s = spec()
    registry.domains.create(s, "p", Quota())
    placed = registry.domains.set_placement(s.uuid, "h1", info(s, "h1", PowerState.RUNNING, 2))
    assert placed is not None
    assert (placed.host, placed.power, placed.seq, placed.task) == (
        "h1",
        PowerState.RUNNING,
        2,
        TaskState.NONE,
    )
    event = stopped(s, "h1", 3)
    assert registry.events.apply("m-3", event.routing_key(), event) is Outcome.APPLIED
    assert registry.events.apply("m-3", event.routing_key(), event) is Outcome.DUPLICATE
    assert apply(registry, started(s, "h1", 2)) is Outcome.STALE  # late and out of order
    assert apply(registry, started(s, "h2", 9)) is Outcome.LOGGED  # another host's
    record = registry.domains.get(s.uuid)
    assert record is not None
    assert (record.power, record.seq) == (PowerState.SHUTOFF, 3)
    # Every non-duplicate event is in the log, in arrival order.
    rows = registry.events.after(0, domain_id=s.uuid)
    assert [(r.host, r.seq) for r in rows] == [("h1", 3), ("h1", 2), ("h2", 9)]


def test_events_before_placement_are_caught_up(registry: Registry) -> None:
    s = spec()
    registry.domains.create(s, "p", Quota())
    # The host's events overtake the scheduler's reply: the start places the domain at once
    # (its API replica may be gone), and the reply, older than the stop, changes nothing.
    assert apply(registry, started(s, "h1", 2)) is Outcome.APPLIED
    assert apply(registry, stopped(s, "h1", 3)) is Outcome.APPLIED
    placed = registry.domains.set_placement(s.uuid, "h1", info(s, "h1", PowerState.RUNNING, 2))
    assert placed is not None
    assert (placed.host, placed.power, placed.seq) == ("h1", PowerState.SHUTOFF, 3)
    assert placed.task is TaskState.NONE


def test_a_start_places_a_scheduling_domain_other_events_do_not(registry: Registry) -> None:
    s = spec()
    registry.domains.create(s, "p", Quota())
    defined = DomainDefined(
        domain_id=s.uuid,
        name=s.name,
        host="h1",
        seq=1,
        state=PowerState.SHUTOFF,
        detail=DefinedDetail.ADDED,
    )
    # A definition may be an attempt the host then refuses: only logged.
    assert apply(registry, defined) is Outcome.LOGGED
    record = registry.domains.get(s.uuid)
    assert record is not None
    assert (record.host, record.task) == (None, TaskState.SCHEDULING)
    assert apply(registry, started(s, "h2", 2)) is Outcome.APPLIED
    record = registry.domains.get(s.uuid)
    assert record is not None
    assert (record.host, record.power, record.seq) == ("h2", PowerState.RUNNING, 2)
    assert (record.task, record.fault) == (TaskState.NONE, None)


def test_undefined_removes_the_record_only_while_deleting(registry: Registry) -> None:
    s = spec()
    registry.domains.create(s, "p", Quota())
    registry.domains.set_placement(s.uuid, "h1", info(s, "h1", PowerState.SHUTOFF, 1))
    gone = DomainUndefined(
        domain_id=s.uuid,
        name=s.name,
        host="h1",
        seq=2,
        state=PowerState.SHUTOFF,
        detail=UndefinedDetail.REMOVED,
    )
    assert apply(registry, gone) is Outcome.APPLIED
    record = registry.domains.get(s.uuid)
    assert record is not None
    assert record.task is TaskState.ERROR
    assert record.fault is not None
    assert record.fault.code == "undefined_on_host"

    t = spec()
    registry.domains.create(t, "p", Quota())
    registry.domains.set_placement(t.uuid, "h1", info(t, "h1", PowerState.SHUTOFF, 1))
    registry.domains.set_task(t.uuid, TaskState.DELETING)
    gone = gone.model_copy(update={"domain_id": t.uuid, "name": t.name})
    assert apply(registry, gone) is Outcome.REMOVED
    assert registry.domains.get(t.uuid) is None


def test_a_start_seen_after_a_scheduler_timeout_places_the_domain(registry: Registry) -> None:
    s = spec()
    registry.domains.create(s, "p", Quota())
    registry.domains.set_task(
        s.uuid, TaskState.ERROR, Fault(code="schedule_timeout", message="late")
    )
    defined = DomainDefined(
        domain_id=s.uuid,
        name=s.name,
        host="h1",
        seq=1,
        state=PowerState.SHUTOFF,
        detail=DefinedDetail.ADDED,
    )
    assert apply(registry, defined) is Outcome.LOGGED
    assert apply(registry, started(s, "h1", 2)) is Outcome.APPLIED
    record = registry.domains.get(s.uuid)
    assert record is not None
    assert (record.host, record.power, record.task, record.fault) == (
        "h1",
        PowerState.RUNNING,
        TaskState.NONE,
        None,
    )


def test_observe_info_follows_the_seq_rule(registry: Registry) -> None:
    s = spec()
    registry.domains.create(s, "p", Quota())
    registry.domains.set_placement(s.uuid, "h1", info(s, "h1", PowerState.RUNNING, 2))
    registry.domains.observe_info(info(s, "h1", PowerState.PAUSED, 3))
    registry.domains.observe_info(info(s, "h1", PowerState.RUNNING, 2))
    registry.domains.observe_info(info(s, "h2", PowerState.SHUTOFF, 7))
    record = registry.domains.get(s.uuid)
    assert record is not None
    assert (record.power, record.seq) == (PowerState.PAUSED, 3)


def test_event_log_is_scoped_by_project_and_resumable(registry: Registry) -> None:
    mine, theirs = spec(), spec()
    registry.domains.create(mine, "p", Quota())
    registry.domains.create(theirs, "q", Quota())
    for n in (1, 2, 3):
        apply(registry, started(mine, "h1", n))
        apply(registry, started(theirs, "h1", n))
    unknown = spec()
    apply(registry, started(unknown, "h1", 1))  # a domain the registry does not know
    everything = registry.events.after(0)
    assert len(everything) == 7
    assert [r.id for r in everything] == sorted(r.id for r in everything)
    only_p = registry.events.after(0, project="p")
    assert [r.seq for r in only_p] == [1, 2, 3]
    assert {r.project for r in only_p} == {"p"}
    resumed = registry.events.after(only_p[0].id, project="p")
    assert [r.seq for r in resumed] == [2, 3]
    by_seq = registry.events.after(0, domain_id=mine.uuid, since_seq=2)
    assert [r.seq for r in by_seq] == [3]
    assert registry.events.last_id() == everything[-1].id


def heartbeat(
    host: str, enabled: bool = True, used_vcpus: int = 0, generation: int = 0
) -> HostHeartbeat:
    return HostHeartbeat(
        host=host,
        version="0.1.0",
        interval_s=2.0,
        enabled=enabled,
        enabled_generation=generation,
        inventory=HostInventory(capacity=Resources(vcpus=8, memory_mib=4096), kvm=KvmKind.NONE),
        usage=Resources(vcpus=used_vcpus, memory_mib=0),
        domains_by_state={PowerState.RUNNING: used_vcpus},
    )


def test_heartbeats_keep_the_newest(registry: Registry) -> None:
    registry.hosts.record(heartbeat("h1", used_vcpus=2), seen_at=100.0)
    registry.hosts.record(heartbeat("h1", used_vcpus=1), seen_at=90.0)  # late delivery
    registry.hosts.record(heartbeat("h2", enabled=False), seen_at=100.0)
    hosts = {h.name: h for h in registry.hosts.records()}
    assert hosts["h1"].usage.vcpus == 2
    assert hosts["h1"].last_seen == 100.0
    assert hosts["h1"].domains_by_state == {"running": 2}
    assert hosts["h2"].enabled is False
    registry.hosts.record(heartbeat("h1", used_vcpus=3), seen_at=110.0)
    assert registry.hosts.records("h1")[0].usage.vcpus == 3


def test_a_heartbeat_sent_before_a_disable_does_not_enable_the_host_again(
    registry: Registry,
) -> None:
    registry.hosts.record(heartbeat("h1"), seen_at=100.0)
    # The API disables h1 (the host took the command's generation) and writes it down...
    generation = registry.hosts.next_generation("h1")
    assert generation > 0
    registry.hosts.set_enabled("h1", False, generation)
    # ...then a beat the host published before the command arrives: it is newer by arrival
    # but says nothing about the switch, so its usage counts and its `enabled` does not.
    registry.hosts.record(heartbeat("h1", used_vcpus=1), seen_at=101.0)
    h1 = registry.hosts.records("h1")[0]
    assert (h1.enabled, h1.usage.vcpus, h1.last_seen) == (False, 1, 101.0)
    # The host's beats after the command carry its generation and agree.
    registry.hosts.record(heartbeat("h1", False, 2, generation), seen_at=102.0)
    assert registry.hosts.records("h1")[0].enabled is False
    # A later enable elsewhere (a newer generation) wins over an older set that lands late.
    newer = registry.hosts.next_generation("h1")
    assert newer > generation
    registry.hosts.set_enabled("h1", True, newer)
    registry.hosts.set_enabled("h1", False, generation)
    assert registry.hosts.records("h1")[0].enabled is True
    registry.hosts.record(heartbeat("h1", True, 2, newer), seen_at=103.0)
    assert registry.hosts.records("h1")[0].enabled is True
    # A host disabled from its own side (a newer generation in its beat) is believed.
    registry.hosts.record(heartbeat("h1", False, 2, newer + 1), seen_at=104.0)
    assert registry.hosts.records("h1")[0].enabled is False


def test_tokens_and_quotas(registry: Registry) -> None:
    token = registry.access.add_token("d" * 64, "p", Role.MEMBER, "ci")
    found = registry.access.find_token("d" * 64)
    assert found is not None
    assert (found.project, found.role, found.description) == ("p", Role.MEMBER, "ci")
    assert [t.id for t in registry.access.list_tokens()] == [token.id]
    assert registry.access.delete_token(token.id)
    assert registry.access.find_token("d" * 64) is None
    assert registry.access.get_quota("p") is None
    registry.access.set_quota("p", Quota(domains=1))
    registry.access.set_quota("p", Quota(domains=2, memory_mib=512))
    assert registry.access.get_quota("p") == Quota(domains=2, memory_mib=512)


def test_migrate_is_idempotent(registry: Registry) -> None:
    registry.migrate()
    registry.migrate()
    assert registry.domains.matching() == []


def test_a_secret_is_made_once_and_kept(registry: Registry) -> None:
    key = registry.access.secret("host_alias")
    assert len(key) == 64
    assert registry.access.secret("host_alias") == key
    assert registry.access.secret("other") != key


def undefined(s: DomainSpec, host: str, seq: int) -> DomainUndefined:
    return DomainUndefined(
        domain_id=s.uuid,
        name=s.name,
        host=host,
        seq=seq,
        state=PowerState.NOSTATE,
        detail=UndefinedDetail.REMOVED,
    )


def test_an_orphaned_create_is_placed_where_its_events_say(registry: Registry) -> None:
    """A create whose API replica died before recording the placement, of a domain defined
    but not started (`start: false`; a start would have placed it at once): the events from
    the host that holds it (only logged while `scheduling`) place it once the record is old."""
    s = spec()
    registry.domains.create(s, "p", Quota())
    # A refused attempt on h1, then h2 defines it.
    for event in (
        DomainDefined(
            domain_id=s.uuid, name=s.name, host="h1", seq=1, state=PowerState.SHUTOFF,
            detail=DefinedDetail.ADDED,
        ),
        undefined(s, "h1", 2),
        DomainDefined(
            domain_id=s.uuid, name=s.name, host="h2", seq=1, state=PowerState.SHUTOFF,
            detail=DefinedDetail.ADDED,
        ),
    ):  # fmt: skip
        assert apply(registry, event) is Outcome.LOGGED
    assert (
        registry.settling.resolve_orphans(older_than_s=60) == []
    )  # a live create may still answer
    [settled] = registry.settling.resolve_orphans(older_than_s=0)
    assert (settled.host, settled.power, settled.seq, settled.task) == (
        "h2",
        PowerState.SHUTOFF,
        1,
        TaskState.NONE,
    )
    assert registry.settling.resolve_orphans(older_than_s=0) == []  # settled once
    assert apply(registry, started(s, "h2", 2)) is Outcome.APPLIED


def test_an_orphaned_create_without_events_is_an_error_a_later_start_still_places(
    registry: Registry,
) -> None:
    s = spec()
    registry.domains.create(s, "p", Quota())
    [settled] = registry.settling.resolve_orphans(older_than_s=0)
    assert settled.task is TaskState.ERROR
    assert settled.fault is not None
    assert settled.fault.code == "schedule_interrupted"
    assert apply(registry, started(s, "h3", 2)) is Outcome.APPLIED
    record = registry.domains.get(s.uuid)
    assert record is not None
    assert (record.host, record.power, record.task) == ("h3", PowerState.RUNNING, TaskState.NONE)


def test_a_create_that_timed_out_is_settled_like_an_orphan(registry: Registry) -> None:
    """The scheduler did not answer in time (a 504: task `error`, fault `schedule_timeout`)
    and the domain was defined but its start never came: once the record is old, the log
    places it (shut off, task none, no fault) for the sweep to finish; one without events
    gets `schedule_interrupted` and is not taken again."""
    s, t = spec(), spec()
    timeout = Fault(code="schedule_timeout", message="no answer in 60 s")
    for x in (s, t):
        registry.domains.create(x, "p", Quota())
        registry.domains.set_task(x.uuid, TaskState.ERROR, timeout)
    assert apply(registry, defined(s, "h2", 1)) is Outcome.LOGGED
    assert registry.settling.resolve_orphans(older_than_s=60) == []  # only once no request waits
    settled = {r.id: r for r in registry.settling.resolve_orphans(older_than_s=0)}
    assert settled.keys() == {s.uuid, t.uuid}
    placed = settled[s.uuid]
    assert (placed.host, placed.power, placed.seq, placed.task, placed.fault) == (
        "h2",
        PowerState.SHUTOFF,
        1,
        TaskState.NONE,
        None,
    )
    lost = settled[t.uuid]
    assert (lost.host, lost.task) == (None, TaskState.ERROR)
    assert lost.fault is not None
    assert lost.fault.code == "schedule_interrupted"
    assert "answer to the create was lost" in lost.fault.message
    assert registry.settling.resolve_orphans(older_than_s=0) == []  # settled once
    # A broker that went away mid-call (503 broker_unavailable) left the outcome unknown as
    # well: its create is the sweep's too, and a start places it.
    u, v = spec(), spec()
    for x in (u, v):
        registry.domains.create(x, "p", Quota())
        registry.domains.set_task(
            x.uuid, TaskState.ERROR, Fault(code="broker_unavailable", message="x")
        )
    assert apply(registry, defined(u, "h4", 1)) is Outcome.LOGGED
    assert apply(registry, started(v, "h5", 1)) is Outcome.APPLIED
    swept = {r.id: r for r in registry.settling.resolve_orphans(older_than_s=0)}
    assert swept.keys() == {u.uuid}
    assert (swept[u.uuid].host, swept[u.uuid].task, swept[u.uuid].fault) == (
        "h4",
        TaskState.NONE,
        None,
    )
    record = registry.domains.get(v.uuid)
    assert record is not None
    assert (record.host, record.task, record.fault) == ("h5", TaskState.NONE, None)
    # Another error of a record without a host is not the sweep's.
    w = spec()
    registry.domains.create(w, "p", Quota())
    registry.domains.set_task(w.uuid, TaskState.ERROR, Fault(code="internal", message="x"))
    assert registry.settling.resolve_orphans(older_than_s=0) == []
    # A later start still places the one without events.
    assert apply(registry, started(t, "h3", 2)) is Outcome.APPLIED
    record = registry.domains.get(t.uuid)
    assert record is not None
    assert (record.host, record.task, record.fault) == ("h3", TaskState.NONE, None)


def test_a_start_clears_a_start_failed_fault(registry: Registry) -> None:
    """The sweep's start of an interrupted create failed or got no answer (task `error`,
    fault `start_failed`), then the domain started after all (the late start, or the
    user's): the record says it runs, with no task and no fault."""
    s = spec()
    registry.domains.create(s, "p", Quota())
    assert apply(registry, defined(s, "h1", 1)) is Outcome.LOGGED
    [settled] = registry.settling.resolve_orphans(older_than_s=0)
    assert settled.host == "h1"
    failed = Fault(code="start_failed", message="host h1 answered timeout", host="h1")
    registry.domains.set_task(s.uuid, TaskState.ERROR, failed)
    assert apply(registry, started(s, "h1", 2)) is Outcome.APPLIED
    record = registry.domains.get(s.uuid)
    assert record is not None
    assert (record.power, record.task, record.fault) == (PowerState.RUNNING, TaskState.NONE, None)
    # Another fault is not the start's to clear: a domain lost on its host stays in error.
    registry.domains.set_task(s.uuid, TaskState.ERROR, Fault(code="other", message="x"))
    assert apply(registry, started(s, "h1", 3)) is Outcome.APPLIED
    record = registry.domains.get(s.uuid)
    assert record is not None
    assert record.task is TaskState.ERROR
    assert record.fault is not None
    assert record.fault.code == "other"


# ---- deletes of domains not placed yet (services.api.reaping) ---------------------------------


def defined(s: DomainSpec, host: str, seq: int) -> DomainDefined:
    return DomainDefined(
        domain_id=s.uuid,
        name=s.name,
        host=host,
        seq=seq,
        state=PowerState.SHUTOFF,
        detail=DefinedDetail.ADDED,
    )


def tombstone(registry: Registry) -> DomainSpec:
    s = spec()
    registry.domains.create(s, "p", Quota())
    record = registry.domains.tombstone(s.uuid)
    assert record is not None
    assert (record.host, record.task) == (None, TaskState.DELETING)
    return s


def test_a_deleted_domain_that_starts_is_reaped_there_and_goes_with_its_undefine(
    registry: Registry,
) -> None:
    s = tombstone(registry)
    assert registry.domains.usage("p")["domains"] == 1  # counts until its host confirms
    assert apply(registry, started(s, "h1", 2)) is Outcome.REAP
    record = registry.domains.get(s.uuid)
    assert record is not None
    assert (record.host, record.task, record.seq) == ("h1", TaskState.DELETING, 2)
    assert apply(registry, undefined(s, "h1", 4)) is Outcome.REMOVED
    assert registry.domains.get(s.uuid) is None


def test_a_deleted_domain_defined_somewhere_is_reaped_but_stays_a_tombstone(
    registry: Registry,
) -> None:
    """A definition may be a refused attempt's (the scheduler then tries elsewhere): the
    record waits for a start, the create's answer or the sweep."""
    s = tombstone(registry)
    assert apply(registry, defined(s, "h1", 1)) is Outcome.REAP
    assert apply(registry, undefined(s, "h1", 2)) is Outcome.LOGGED
    record = registry.domains.get(s.uuid)
    assert record is not None
    assert (record.host, record.task) == (None, TaskState.DELETING)
    # The scheduler's answer reaches the create's replica: the domain is reaped there.
    placed = registry.domains.set_placement(s.uuid, "h2", info(s, "h2", PowerState.RUNNING, 2))
    assert placed is not None
    assert (placed.host, placed.task) == ("h2", TaskState.DELETING)
    assert registry.domains.remove_deleted(s.uuid, "h2")


def test_the_sweep_settles_tombstones_and_retries_deletes_left_on_a_host(
    registry: Registry,
) -> None:
    nowhere = tombstone(registry)  # never reached a host
    gone = tombstone(registry)  # defined on h1, removed from there again
    for event in (defined(gone, "h1", 1), undefined(gone, "h1", 2)):
        apply(registry, event)
    left = tombstone(registry)  # defined on h2 (start: false), not removed yet
    apply(registry, defined(left, "h2", 1))
    placed = spec()  # deleting on its host, its DELETE's calls cut short
    registry.domains.create(placed, "p", Quota())
    registry.domains.set_placement(placed.uuid, "h3", info(placed, "h3", PowerState.RUNNING, 2))
    registry.domains.set_task(placed.uuid, TaskState.DELETING)

    assert registry.settling.settle_deletes(older_than_s=60) == (
        [],
        [],
    )  # their creates may be live
    before = registry.domains.get(nowhere.uuid)
    again = registry.domains.tombstone(nowhere.uuid)  # a DELETE again does not put the sweep off
    assert before is not None
    assert again is not None
    assert again.updated_at == before.updated_at
    to_reap, removed = registry.settling.settle_deletes(older_than_s=0)
    assert sorted(r.id for r in removed) == sorted([nowhere.uuid, gone.uuid])
    assert {(r.id, host) for r, host in to_reap} == {(left.uuid, "h2"), (placed.uuid, "h3")}
    record = registry.domains.get(left.uuid)
    assert record is not None
    assert (record.host, record.task) == ("h2", TaskState.DELETING)
    assert registry.settling.settle_deletes(older_than_s=60) == ([], [])  # touched: next try later


def test_a_settled_tombstones_domain_appearing_later_elsewhere_is_reaped(
    registry: Registry,
) -> None:
    """The gap a settled tombstone left: a start timed out on a stuck host (h1), which
    cleaned up; the sweep removed the record; the scheduler's retry then defined and started
    the domain on h2. Its events there find no record: they are reaped, not left running."""
    gone = tombstone(registry)
    for event in (defined(gone, "h1", 1), undefined(gone, "h1", 2)):
        apply(registry, event)
    never = tombstone(registry)  # the stuck host never even defined it
    _, removed = registry.settling.settle_deletes(older_than_s=0)
    assert sorted(r.id for r in removed) == sorted([gone.uuid, never.uuid])
    for s in (gone, never):
        assert registry.domains.get(s.uuid) is None
        assert registry.domains.was_removed(s.uuid)
        assert apply(registry, defined(s, "h2", 1)) is Outcome.REAP
        assert apply(registry, started(s, "h2", 2)) is Outcome.REAP
        assert apply(registry, undefined(s, "h2", 3)) is Outcome.LOGGED


def test_a_deleted_domains_id_is_remembered_and_forgotten_after_its_time(
    registry: Registry,
) -> None:
    s = spec()  # a domain the API never knew (defined on a host directly): only logged
    assert apply(registry, started(s, "h1", 1)) is Outcome.LOGGED
    assert not registry.domains.was_removed(s.uuid)
    registry.domains.create(s, "p", Quota())
    assert not registry.domains.was_removed(s.uuid)
    assert registry.domains.remove(s.uuid)
    assert registry.domains.was_removed(s.uuid)
    assert registry.domains.forget_removed(older_than_s=3600) == 0
    assert registry.domains.forget_removed(older_than_s=-1) == 1
    assert not registry.domains.was_removed(s.uuid)
    assert apply(registry, started(s, "h1", 2)) is Outcome.LOGGED


def test_a_create_that_times_out_does_not_undo_a_delete(registry: Registry) -> None:
    s = tombstone(registry)
    fault = Fault(code="schedule_timeout", message="late")
    registry.domains.set_task(s.uuid, TaskState.ERROR, fault, unless=TaskState.DELETING)
    record = registry.domains.get(s.uuid)
    assert record is not None
    assert record.task is TaskState.DELETING


# ---- migration (protos.migration) -------------------------------------------------------------

P = PowerState


def migrating(
    registry: Registry, seq: int = 2, state: PowerState = PowerState.RUNNING
) -> DomainSpec:
    """A domain placed on h1 at `seq`, in task `migrating`."""
    s = spec()
    registry.domains.create(s, "p", Quota())
    assert registry.domains.set_placement(s.uuid, "h1", info(s, "h1", state, seq)) is not None
    assert registry.domains.set_task(s.uuid, TaskState.MIGRATING) is not None
    return s


def event_of(
    cls: type[DomainEvent], s: DomainSpec, host: str, seq: int, *, state: PowerState, detail: str
) -> DomainEvent:
    return cls.model_validate(
        {
            "domain_id": s.uuid,
            "name": s.name,
            "host": host,
            "seq": seq,
            "state": state,
            "detail": detail,
        }
    )


def progress(s: DomainSpec, host: str, seq: int, phase: str, target: str = "h2") -> DomainEvent:
    return DomainMigrationProgress(
        domain_id=s.uuid,
        name=s.name,
        host=host,
        seq=seq,
        state=PowerState.RUNNING,
        iteration=3,
        transferred_bytes=1 << 20,
        remaining_bytes=0,
        phase=phase,
        target=target,
        downtime_ms=4.5 if phase == "done" else None,
    )


def shown(registry: Registry, s: DomainSpec) -> tuple[str | None, PowerState, int, TaskState]:
    record = registry.domains.get(s.uuid)
    assert record is not None
    return record.host, record.power, record.seq, record.task


def test_a_live_migration_switches_the_host_and_ends_the_task(registry: Registry) -> None:
    s = migrating(registry)
    # The source pauses for the last pages, then its machine ends: seq moves on, the domain
    # is not shown shut off.
    assert apply(
        registry, event_of(DomainSuspended, s, "h1", 3, state=P.PAUSED, detail="migrated")
    ) is (Outcome.APPLIED)
    stop = event_of(DomainStopped, s, "h1", 4, state=P.SHUTOFF, detail="migrated")
    assert apply(registry, stop) is Outcome.APPLIED
    assert shown(registry, s) == ("h1", P.PAUSED, 4, TaskState.MIGRATING)
    # The target's start with the seq continuing: the host switches and the task ends.
    assert apply(
        registry, event_of(DomainStarted, s, "h2", 5, state=P.RUNNING, detail="migrated")
    ) is (Outcome.APPLIED)
    assert shown(registry, s) == ("h2", P.RUNNING, 5, TaskState.NONE)
    # The source's final progress arrives after the switch: logged, nothing changes.
    assert apply(registry, progress(s, "h1", 4, "done")) is Outcome.LOGGED
    assert shown(registry, s) == ("h2", P.RUNNING, 5, TaskState.NONE)
    # Its events keep flowing from the new host; the old host's are another host's.
    assert apply(registry, stopped(s, "h1", 6)) is Outcome.LOGGED
    assert apply(registry, stopped(s, "h2", 6)) is Outcome.APPLIED
    assert shown(registry, s) == ("h2", P.SHUTOFF, 6, TaskState.NONE)


def test_a_done_that_comes_before_the_targets_start_leaves_the_task_to_the_switch(
    registry: Registry,
) -> None:
    s = migrating(registry)
    # Progress carries the last lifecycle seq: it is never projected. The source's `done`
    # arriving before the target's start does not end the task: the domain would show no
    # task under way on the host it left (a client waiting for that saw the old host).
    assert apply(registry, progress(s, "h1", 2, "precopy")) is Outcome.LOGGED
    assert shown(registry, s) == ("h1", P.RUNNING, 2, TaskState.MIGRATING)
    assert apply(registry, progress(s, "h1", 2, "done")) is Outcome.LOGGED
    assert shown(registry, s) == ("h1", P.RUNNING, 2, TaskState.MIGRATING)
    # The target's start switches the host and ends the task.
    assert apply(
        registry, event_of(DomainStarted, s, "h2", 3, state=P.RUNNING, detail="migrated")
    ) is (Outcome.APPLIED)
    assert shown(registry, s) == ("h2", P.RUNNING, 3, TaskState.NONE)
    # A `done` naming the host it switched to ends a task still set then.
    assert registry.domains.set_task(s.uuid, TaskState.MIGRATING) is not None
    assert apply(registry, progress(s, "h1", 2, "done")) is Outcome.APPLIED
    assert shown(registry, s) == ("h2", P.RUNNING, 3, TaskState.NONE)


def test_a_failed_migration_leaves_the_domain_on_its_source(registry: Registry) -> None:
    s = migrating(registry)
    assert apply(
        registry, event_of(DomainSuspended, s, "h1", 3, state=P.PAUSED, detail="migrated")
    ) is (Outcome.APPLIED)
    # The source resumes: the task ends there.
    assert apply(
        registry, event_of(DomainResumed, s, "h1", 4, state=P.RUNNING, detail="migrated")
    ) is (Outcome.APPLIED)
    assert shown(registry, s) == ("h1", P.RUNNING, 4, TaskState.NONE)
    # A cancelled or failed job's final progress from the source ends a task too.
    assert registry.domains.set_task(s.uuid, TaskState.MIGRATING) is not None
    assert apply(registry, progress(s, "h1", 4, "cancelled")) is Outcome.APPLIED
    assert shown(registry, s) == ("h1", P.RUNNING, 4, TaskState.NONE)
    # ... but only about this domain's host: a third host's progress changes nothing.
    assert registry.domains.set_task(s.uuid, TaskState.MIGRATING) is not None
    assert apply(registry, progress(s, "h3", 4, "failed", target="h4")) is Outcome.LOGGED
    assert shown(registry, s)[3] is TaskState.MIGRATING


def test_another_hosts_events_switch_nothing_unless_they_are_a_migrations_arrival(
    registry: Registry,
) -> None:
    s = migrating(registry, seq=5)
    # Not arrivals: a boot, a plain definition, a stop on the target.
    for event in (
        event_of(DomainStarted, s, "h2", 9, state=P.RUNNING, detail="booted"),
        event_of(DomainDefined, s, "h2", 9, state=P.SHUTOFF, detail="added"),
        event_of(DomainStopped, s, "h2", 9, state=P.SHUTOFF, detail="migrated"),
        event_of(DomainResumed, s, "h2", 9, state=P.RUNNING, detail="migrated"),
    ):
        assert apply(registry, event) is Outcome.LOGGED
    # An arrival whose seq is not above the stored one is an old migration's.
    assert apply(
        registry, event_of(DomainStarted, s, "h2", 5, state=P.RUNNING, detail="migrated")
    ) is (Outcome.LOGGED)
    assert shown(registry, s) == ("h1", P.RUNNING, 5, TaskState.MIGRATING)


def test_a_cold_migration_switches_the_host_on_the_targets_definition(
    registry: Registry,
) -> None:
    s = migrating(registry, seq=3, state=PowerState.SHUTOFF)
    defined = event_of(DomainDefined, s, "h2", 4, state=P.SHUTOFF, detail="migrated")
    assert apply(registry, defined) is Outcome.APPLIED
    assert shown(registry, s) == ("h2", P.SHUTOFF, 4, TaskState.NONE)
    # Without a `migrating` task (an evacuation the API did not see start) it switches too.
    s2 = spec()
    registry.domains.create(s2, "p", Quota())
    assert registry.domains.set_placement(s2.uuid, "h1", info(s2, "h1", P.SHUTOFF, 1)) is not None
    assert apply(
        registry, event_of(DomainDefined, s2, "h3", 2, state=P.SHUTOFF, detail="migrated")
    ) is (Outcome.APPLIED)
    assert shown(registry, s2) == ("h3", P.SHUTOFF, 2, TaskState.NONE)


def test_a_removed_domains_reap_stays_pending_until_it_is_done(registry: Registry) -> None:
    """A REAP of a removed domain is remembered with the event that asked for it: a replica
    killed before it ran the reap, or a host that did not answer, leaves it to the sweep,
    which takes each due one once (marked tried) until the host no longer has the domain."""
    s = spec()
    registry.domains.create(s, "p", Quota())
    assert registry.domains.remove(s.uuid)
    assert apply(registry, defined(s, "h1", 1)) is Outcome.REAP
    assert apply(registry, started(s, "h2", 1)) is Outcome.REAP
    assert registry.domains.due_reaps(older_than_s=3600) == []  # just asked: its replica runs it
    due = registry.domains.due_reaps(older_than_s=-1)
    assert sorted(due) == sorted([(s.uuid, "h1"), (s.uuid, "h2")])
    assert registry.domains.due_reaps(older_than_s=1) == []  # tried just now: not again yet
    registry.domains.reaped(s.uuid, "h1")
    assert registry.domains.due_reaps(older_than_s=-1) == [(s.uuid, "h2")]
    # Done on h2: a redelivered copy of its event is a duplicate, asking nothing again.
    registry.domains.reaped(s.uuid, "h2")
    event = started(s, "h2", 1)
    assert registry.events.apply("m-1", event.routing_key(), event) is Outcome.REAP
    registry.domains.reaped(s.uuid, "h2")
    assert registry.events.apply("m-1", event.routing_key(), event) is Outcome.DUPLICATE
    assert registry.domains.due_reaps(older_than_s=-1) == []
    # Pending reaps of a domain forgotten (removed long ago) go with it.
    assert apply(registry, started(s, "h3", 2)) is Outcome.REAP
    assert registry.domains.forget_removed(older_than_s=-1) == 1
    assert registry.domains.due_reaps(older_than_s=-1) == []
