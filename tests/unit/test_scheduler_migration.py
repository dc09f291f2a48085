"""The scheduler's `MigrateDomain` without a broker: the target's choice (never the source,
a named target judged by the filters), the claim's announcements, refusals and retries."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from protos.base import Message
from protos.codec import envelope_for
from protos.commands import Command, GetDomainInfo
from protos.domain import BootSpec, DomainSpec, PlacementHints, PlacementPolicy, PowerState
from protos.events import DefinedDetail, DomainDefined, DomainMigrationProgress
from protos.host import HostHeartbeat
from protos.migration import (
    MigrateDomain,
    MigrationJob,
    MigrationParams,
    MigrationPhase,
    StartMigration,
)
from protos.replies import DomainInfo
from protos.scheduler import ClaimPhase, PlacementClaim
from services.bus import (
    BusError,
    ConnectionLost,
    Context,
    RemoteError,
    Retry,
    RpcTimeout,
    ServiceError,
)
from services.scheduler.config import SchedulerConfig
from services.scheduler.service import SchedulerService
from services.scheduler.state import GroupKey
from tests.unit.test_scheduler_filters import beat


class Cluster:
    """Compute nodes behind `SchedulerService.call`: the source answers GetDomainInfo and
    StartMigration (or refuses it as told)."""

    def __init__(self, spec: DomainSpec, source: str) -> None:
        self.spec = spec
        self.source = source
        self.refuse: dict[str, str] = {}  # target → the code the source answers with
        self.silent: BusError | None = None  # what the call raises instead of an answer
        self.queued = False  # the source answers the job `queued` (over its limit)
        self.target_claim_seq: int | None = None  # the target's claim count, when it says
        self.started: list[StartMigration] = []

    def __call__(
        self,
        queue: str,
        command: Command,
        *,
        timeout: float,
        message_id: str | None,
        expires: bool = False,
    ) -> Message:
        host = queue.removeprefix("compute.")
        assert host == self.source, f"{command.TYPE} sent to {host}, not the source"
        if isinstance(command, GetDomainInfo):
            return DomainInfo(
                domain_id=self.spec.uuid,
                name=self.spec.name,
                host=host,
                state=PowerState.RUNNING,
                vcpus=self.spec.vcpus,
                memory_mib=self.spec.memory_mib,
                seq=4,
            )
        assert isinstance(command, StartMigration)
        assert message_id is not None
        self.started.append(command)
        if self.silent is not None:
            raise self.silent
        code = self.refuse.get(command.target)
        if code:
            raise RemoteError(code, f"{command.target} says {code}")
        return MigrationJob(
            domain_id=command.domain_id,
            source=host,
            target=command.target,
            live=command.params.live,
            phase=MigrationPhase.QUEUED if self.queued else MigrationPhase.PRECOPY,
            params=command.params,
            started_at=time.time(),
            elapsed_ms=1.0,
            queue_position=1 if self.queued else None,
            target_claim_seq=None if self.queued else self.target_claim_seq,
        )


def domain(vcpus: int = 2, memory_mib: int = 1024, **placement: object) -> DomainSpec:
    return DomainSpec(
        name=f"d-{uuid.uuid4().hex[:8]}",
        vcpus=vcpus,
        memory_mib=memory_mib,
        boot=BootSpec(kernel="/k"),
        placement=PlacementHints(**placement),  # type: ignore[arg-type]
    )


class Scheduler(SchedulerService):
    """The service with its claim announcements recorded instead of published."""

    def __init__(self) -> None:
        super().__init__(SchedulerConfig(replica="r1", top_n=1))  # the best host, always
        self.announced: list[PlacementClaim] = []

    def announce(self, event: PlacementClaim, *, confirm: bool) -> None:
        self.announced.append(event)


def scheduler(cluster: Cluster, hosts: dict[str, dict[str, object]]) -> Scheduler:
    svc = Scheduler()
    svc.call = cluster  # type: ignore[method-assign]
    for name, kw in hosts.items():
        svc.state.on_heartbeat(
            beat(name, interval_s=60.0, **kw),  # type: ignore[arg-type]
            sent_at=time.time(),
            now=time.monotonic(),
        )
    svc.state.learn(cluster.spec.uuid, cluster.source, None)
    return svc


def migrate(svc: SchedulerService, cmd: MigrateDomain) -> MigrationJob:
    return svc.migrate(cmd, Context(envelope_for(cmd, source="test")))


def command(spec: DomainSpec, source: str = "a", target: str | None = None) -> MigrateDomain:
    return MigrateDomain(
        domain_id=spec.uuid,
        source=source,
        target=target,
        project="p",
        params=MigrationParams(max_downtime_ms=50),
        spec=spec,
    )


def phases(svc: Scheduler) -> list[tuple[str, str]]:
    return [(c.phase.value, c.host) for c in svc.announced]


def test_the_target_is_never_the_source_and_is_claimed_then_placed() -> None:
    spec = domain()
    cluster = Cluster(spec, "a")
    # The source has the most room: a placement would pick it, a migration cannot.
    svc = scheduler(cluster, {"a": {"memory_mib": 65536}, "b": {}, "c": {"used_mib": 3500}})
    job = migrate(svc, command(spec))
    assert job.target == "b"  # c has no room for 1 GiB
    assert [(s.target, s.params.max_downtime_ms) for s in cluster.started] == [("b", 50)]
    assert phases(svc) == [("claimed", "b"), ("placed", "b")]
    # The claim holds the room on the target; the domain still lives on its source.
    assert svc.state.hosts["b"].claimed_memory_mib == 1024
    assert svc.state.domain_host[spec.uuid] == "a"
    # Its arrival there (here a cold migration's definition) moves it.
    svc.on_event(
        envelope_for(command(spec), source="test"),
        DomainDefined(
            domain_id=spec.uuid,
            name=spec.name,
            host="b",
            seq=5,
            state=PowerState.SHUTOFF,
            detail=DefinedDetail.MIGRATED,
        ),
    )
    assert svc.state.domain_host[spec.uuid] == "b"


def test_a_named_target_must_pass_the_filters() -> None:
    spec = domain(vcpus=2)
    cluster = Cluster(spec, "a")
    svc = scheduler(cluster, {"a": {}, "b": {"enabled": False}, "c": {"memory_mib": 512}, "d": {}})
    for target, filter_name in (("b", "alive"), ("c", "memory")):
        with pytest.raises(ServiceError) as err:
            migrate(svc, command(spec, target=target))
        assert err.value.code == "no_valid_host"
        assert err.value.details["filtered"][filter_name] == [target]
        assert target in err.value.message
    assert cluster.started == []
    with pytest.raises(ServiceError) as err:
        migrate(svc, command(spec, target="a"))
    assert (err.value.code, err.value.details["field"]) == ("invalid", "host")
    assert migrate(svc, command(spec, target="d")).target == "d"


def test_the_target_has_the_pools_of_the_domains_host_local_volumes() -> None:
    spec = domain()
    cluster = Cluster(spec, "a")
    hosts: dict[str, dict[str, object]] = {
        "a": {"pools": ["default", "fast"]},
        # b has the most room but no pool `fast`; c says nothing of its pools (older node).
        "b": {"pools": ["default"], "memory_mib": 65536},
        "c": {"pools": ["default", "fast"]},
    }
    svc = scheduler(cluster, hosts)
    cmd = command(spec).model_copy(update={"pools": ["fast"]})
    assert migrate(svc, cmd).target == "c"
    assert [s.target for s in cluster.started] == ["c"]
    # Named, b is refused by the filter, with its name where the others report theirs.
    with pytest.raises(ServiceError) as err:
        migrate(svc, cmd.model_copy(update={"target": "b"}))
    assert err.value.code == "no_valid_host"
    assert err.value.details["filtered"] == {"forced_host": ["c"], "pools": ["b"]}
    assert "pools removed b" in err.value.message
    # An older host that does not list its pools is not removed for that reason.
    svc = scheduler(Cluster(spec, "a"), {**hosts, "c": {"pools": None}})
    assert migrate(svc, cmd).target == "c"
    # Without host-local volumes, the roomiest host it is.
    svc = scheduler(Cluster(spec, "a"), hosts)
    assert migrate(svc, command(spec)).target == "b"


def test_no_host_but_the_source_is_no_valid_host() -> None:
    spec = domain()
    svc = scheduler(Cluster(spec, "a"), {"a": {}})
    with pytest.raises(ServiceError) as err:
        migrate(svc, command(spec))
    assert err.value.code == "no_valid_host"
    assert "no compute node but a" in err.value.message


def test_a_refusing_target_is_released_and_the_next_one_tried() -> None:
    spec = domain()
    cluster = Cluster(spec, "a")
    svc = scheduler(cluster, {"a": {}, "b": {"memory_mib": 8192}, "c": {}})
    cluster.refuse["b"] = "no_capacity"
    job = migrate(svc, command(spec))
    assert job.target == "c"
    assert phases(svc) == [
        ("claimed", "b"),
        ("released", "b"),
        ("claimed", "c"),
        ("placed", "c"),
    ]
    assert svc.state.hosts["b"].claimed_memory_mib == 0
    assert svc.state.domain_host[spec.uuid] == "a"
    # A refusal of the migration itself (the state table on the source) is the answer.
    cluster.refuse = {"b": "conflict", "c": "conflict"}
    svc.announced.clear()
    with pytest.raises(ServiceError) as err:
        migrate(svc, command(spec, target="b"))
    assert err.value.code == "conflict"
    assert phases(svc) == [("claimed", "b"), ("released", "b")]
    # A named target that refuses is not replaced by another.
    cluster.refuse = {"b": "no_capacity"}
    with pytest.raises(ServiceError) as err:
        migrate(svc, command(spec, target="b"))
    assert err.value.code == "no_capacity"


@pytest.mark.parametrize(
    "failure",
    [RpcTimeout("no reply"), ConnectionLost("broker connection lost while waiting for the reply")],
    ids=["source-silent", "own-connection-lost"],
)
def test_a_silent_source_keeps_the_claim(failure: BusError) -> None:
    """No answer, or this replica's own connection lost while it waited: the source may have
    started the job either way, so the target's claim stays."""
    spec = domain()
    cluster = Cluster(spec, "a")
    svc = scheduler(cluster, {"a": {}, "b": {}})
    cluster.silent = failure
    with pytest.raises(ServiceError) as err:
        migrate(svc, command(spec))
    assert err.value.code == "unavailable"
    assert "may be under way" in err.value.message
    assert svc.state.hosts["b"].claimed_memory_mib == 1024  # until heartbeats settle it


def test_an_unconfirmed_claim_asks_no_source_and_hands_the_command_back() -> None:
    """The target's `claimed` announcement not confirmed (this replica's own link): the
    source was not asked, the claim goes and the command is requeued, no target counted as
    refusing."""
    spec = domain()
    cluster = Cluster(spec, "a")
    svc = scheduler(cluster, {"a": {}, "b": {}})

    def announce(event: PlacementClaim, *, confirm: bool) -> None:
        if confirm:
            raise ConnectionLost("broker did not confirm within 5 s (connection down?)")
        svc.announced.append(event)

    svc.announce = announce  # type: ignore[method-assign]
    with pytest.raises(Retry, match="not confirmed"):
        migrate(svc, command(spec))
    assert cluster.started == []
    assert phases(svc) == [("released", "b")]
    assert svc.state.hosts["b"].claimed_memory_mib == 0
    assert svc.state.domain_host[spec.uuid] == "a"


def test_group_policies_see_the_moving_domain_as_no_other_member() -> None:
    # Affinity with no other member: any host will do (the domain's own host is not one).
    spec = domain(group="g", policy=PlacementPolicy.AFFINITY)
    cluster = Cluster(spec, "a")
    svc = scheduler(cluster, {"a": {}, "b": {}})
    svc.state.learn(spec.uuid, "a", GroupKey("p", "g"))
    assert migrate(svc, command(spec)).target == "b"
    # Anti-affinity: not onto the host of another member.
    spec2 = domain(group="h", policy=PlacementPolicy.ANTI_AFFINITY)
    cluster2 = Cluster(spec2, "a")
    svc2 = scheduler(cluster2, {"a": {}, "b": {"memory_mib": 8192}, "c": {}})
    svc2.state.learn(spec2.uuid, "a", GroupKey("p", "h"))
    svc2.state.learn(uuid.uuid4(), "b", GroupKey("p", "h"))
    assert migrate(svc2, command(spec2)).target == "c"
    with pytest.raises(ServiceError) as err:
        migrate(svc2, command(spec2, target="b"))
    assert err.value.details["filtered"]["group_policy"] == ["b"]


def test_the_final_progress_says_where_the_domain_lives() -> None:
    spec = domain()
    svc = scheduler(Cluster(spec, "a"), {"a": {}, "b": {}})

    def final(phase: str) -> DomainMigrationProgress:
        return DomainMigrationProgress(
            domain_id=spec.uuid,
            name=spec.name,
            host="a",
            seq=4,
            state=PowerState.RUNNING,
            iteration=2,
            transferred_bytes=1,
            remaining_bytes=0,
            phase=phase,
            target="b",
        )

    envelope = envelope_for(command(spec), source="test")
    # A peer's `placed` claim counted the domain on the target; the migration then failed.
    svc.on_peer_claim(
        PlacementClaim(
            phase=ClaimPhase.PLACED,
            replica="r2",
            domain_id=spec.uuid,
            host="b",
            vcpus=2,
            memory_mib=1024,
        ),
        sent_at=time.time(),
        now=time.monotonic(),
    )
    assert svc.state.domain_host[spec.uuid] == "b"
    svc.on_event(envelope, final("precopy"))
    assert svc.state.domain_host[spec.uuid] == "b"  # not the end yet
    svc.on_event(envelope, final("failed"))
    assert svc.state.domain_host[spec.uuid] == "a"
    svc.on_event(envelope, final("done"))
    assert svc.state.domain_host[spec.uuid] == "b"


def progress(spec: DomainSpec, phase: str) -> DomainMigrationProgress:
    return DomainMigrationProgress(
        domain_id=spec.uuid,
        name=spec.name,
        host="a",
        seq=4,
        state=PowerState.RUNNING,
        iteration=0,
        transferred_bytes=0,
        remaining_bytes=0,
        phase=phase,
        target="b",
    )


@pytest.mark.parametrize("end", ["cancelled", "failed"])
def test_a_queued_jobs_claim_holds_until_it_runs_and_goes_when_it_does_not(end: str) -> None:
    spec = domain()
    cluster = Cluster(spec, "a")
    cluster.queued = True
    svc = scheduler(cluster, {"a": {}, "b": {}})
    envelope = envelope_for(command(spec), source="test")
    assert migrate(svc, command(spec)).phase is MigrationPhase.QUEUED
    assert phases(svc) == [("claimed", "b")]
    claim = svc.state.claims[spec.uuid]
    assert claim.settles_at is None  # held while queued: heartbeats do not drop it
    for _ in range(5):
        svc.state.on_heartbeat(beat("b", interval_s=60.0), sent_at=time.time() + 10, now=0.0)
    assert svc.state.hosts["b"].claimed_memory_mib == 1024
    svc.on_event(envelope, progress(spec, "queued"))
    assert svc.state.claims[spec.uuid].settles_at is None
    # Cancelled (or failed) before it ran: the room on the target goes at once.
    svc.on_event(envelope, progress(spec, end))
    assert spec.uuid not in svc.state.claims
    assert svc.state.hosts["b"].claimed_memory_mib == 0
    assert svc.state.domain_host[spec.uuid] == "a"
    assert phases(svc) == [("claimed", "b"), ("released", "b")]


def test_a_queued_jobs_claim_settles_once_it_leaves_the_queue() -> None:
    spec = domain()
    cluster = Cluster(spec, "a")
    cluster.queued = True
    svc = scheduler(cluster, {"a": {}, "b": {}})
    migrate(svc, command(spec))
    svc.on_event(envelope_for(command(spec), source="test"), progress(spec, "preparing"))
    assert svc.state.claims[spec.uuid].settles_at is not None
    assert phases(svc) == [("claimed", "b"), ("placed", "b")]


def test_a_queued_jobs_claim_goes_when_its_source_is_down() -> None:
    """A source that restarts cancels its queued jobs (whose final event releases the claim);
    one that never comes back sends nothing: its queued job's claim on the target goes once
    the source is down, not never."""
    spec = domain()
    cluster = Cluster(spec, "a")
    cluster.queued = True
    svc = scheduler(cluster, {"a": {}, "b": {}})  # beating every 60 s
    migrate(svc, command(spec))
    assert svc.state.claims[spec.uuid].waits_on == "a"
    later = time.monotonic() + 120  # a missed one: silent, not yet down (3 intervals)
    svc.state.on_heartbeat(beat("b", interval_s=60.0), sent_at=time.time() + 120, now=later)
    assert svc.state.hosts["b"].claimed_memory_mib == 1024
    down = time.monotonic() + 200  # b beat on meanwhile: a's silence is a's
    svc.state.on_heartbeat(beat("b", interval_s=60.0), sent_at=time.time() + 200, now=down)
    assert spec.uuid not in svc.state.claims
    assert svc.state.hosts["b"].claimed_memory_mib == 0
    # One that left the queue settles as any other, and is no longer tied to its source.
    other = domain()
    cluster2 = Cluster(other, "a")
    cluster2.queued = True
    svc2 = scheduler(cluster2, {"a": {}, "b": {}})
    migrate(svc2, command(other))
    svc2.on_event(envelope_for(command(other), source="test"), progress(other, "preparing"))
    assert svc2.state.claims[other.uuid].waits_on is None


def test_the_claim_goes_with_the_targets_heartbeat_read_at_its_claim_count() -> None:
    """The target said at which claim count it took the domain: its first heartbeat read at
    that count drops the claim, and one read there before the answer came drops it at once
    (kept, the domain counted twice: a target with room for one more refused it)."""
    spec = domain(vcpus=2, memory_mib=1024)
    cluster = Cluster(spec, "a")
    cluster.target_claim_seq = 7
    svc = scheduler(cluster, {"a": {}, "b": {"claims_seq": 5}})
    migrate(svc, command(spec, target="b"))
    claim = svc.state.claims[spec.uuid]
    assert claim.claim_seq == 7
    assert svc.announced[-1].claim_seq == 7  # the peers drop theirs on the same beat
    svc.state.on_heartbeat(beat("b", claims_seq=6), sent_at=time.time() + 10, now=0.0)
    assert spec.uuid in svc.state.claims  # a beat read before the claim, sent late
    svc.state.on_heartbeat(
        beat("b", claims_seq=7, used_vcpus=2, used_mib=1024), sent_at=0.0, now=0.0
    )
    assert spec.uuid not in svc.state.claims
    assert svc.state.hosts["b"].free_vcpus == 2  # counted once
    # The beat came first (the target took the domain, beat, then the source answered).
    other = domain(vcpus=2, memory_mib=1024)
    cluster2 = Cluster(other, "a")
    cluster2.target_claim_seq = 9
    svc2 = scheduler(cluster2, {"a": {}, "b": {}})
    late = beat("b", claims_seq=9, used_vcpus=2, used_mib=1024)
    svc2.call = _beat_first(svc2, cluster2, late)  # type: ignore[method-assign]
    migrate(svc2, command(other, target="b"))
    assert other.uuid not in svc2.state.claims
    assert svc2.state.hosts["b"].free_vcpus == 2


def _beat_first(svc: SchedulerService, cluster: Cluster, target_beat: HostHeartbeat) -> Cluster:
    """`cluster`, with the target's heartbeat arriving while StartMigration is in flight."""

    class BeatFirst(Cluster):
        def __call__(self, queue: str, command: Command, **kw: Any) -> Message:
            if isinstance(command, StartMigration):
                svc.state.on_heartbeat(target_beat, sent_at=time.time(), now=time.monotonic())
            return cluster(queue, command, **kw)

    return BeatFirst(cluster.spec, cluster.source)


def test_a_queued_jobs_claim_takes_the_targets_claim_count_once_it_is_prepared() -> None:
    spec = domain()
    cluster = Cluster(spec, "a")
    cluster.queued = True
    svc = scheduler(cluster, {"a": {}, "b": {}})
    migrate(svc, command(spec))
    envelope = envelope_for(command(spec), source="test")
    svc.on_event(envelope, progress(spec, "preparing"))  # it left the queue
    assert svc.state.claims[spec.uuid].claim_seq is None
    prepared = progress(spec, "preparing").model_copy(update={"target_claim_seq": 12})
    svc.on_event(envelope, prepared)
    assert svc.state.claims[spec.uuid].claim_seq == 12
    assert phases(svc) == [("claimed", "b"), ("placed", "b"), ("placed", "b")]
    assert svc.announced[-1].claim_seq == 12
    svc.state.on_heartbeat(beat("b", claims_seq=12), sent_at=0.0, now=0.0)
    assert spec.uuid not in svc.state.claims


def test_the_wait_for_the_source_outlasts_its_wait_for_the_target() -> None:
    """The source answers StartMigration only once its target is prepared (up to
    PEER_TIMEOUT_S): a scheduler giving up first would answer 503 and free the task while the
    migration goes on; the API's own wait must outlast the scheduler's."""
    from compute_node.migrating import PEER_TIMEOUT_S
    from services.api.config import ApiConfig
    from services.scheduler.config import SchedulerConfig

    waits = SchedulerConfig().migration_start_timeout_s
    assert PEER_TIMEOUT_S < waits < ApiConfig().schedule_timeout_s
