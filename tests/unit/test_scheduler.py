"""The scheduler's loop and service without a broker: choice, claims, retries, concurrency."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from protos.base import Message
from protos.bindings import DiskBinding, ImageRef
from protos.codec import envelope_for
from protos.commands import DefineDomain, DestroyDomain, StartDomain, UndefineDomain
from protos.domain import PowerState
from protos.events import DomainStarted, DomainUndefined, StartedDetail, UndefinedDetail
from protos.scheduler import ClaimPhase, PlacementClaim, ScheduleDomain
from services.bus import RpcTimeout, ServiceError
from services.scheduler.config import SchedulerConfig
from services.scheduler.filters import build_filters
from services.scheduler.placer import Decision, NoValidHost, Placer
from services.scheduler.service import SchedulerService
from services.scheduler.state import ClusterState, GroupKey
from services.scheduler.weights import build_weighers
from tests.unit.scheduler_fakes import (
    FakeComputes,
    Sent,
    feed,
    route,
    schedule,
    service,
    spec,
)
from tests.unit.test_scheduler_filters import beat, request

# ---- the loop ---------------------------------------------------------------------------------


def make_placer(names: dict[str, int], top_n: int, seed: int = 0) -> Placer:
    config = SchedulerConfig(replica="t", top_n=top_n)
    state = ClusterState()
    for name, mib in names.items():
        state.on_heartbeat(beat(name, memory_mib=mib), sent_at=time.time(), now=time.monotonic())
    return Placer(
        state, build_filters(config), build_weighers(config), top_n=top_n, rng=random.Random(seed)
    )


def test_the_loop_picks_only_among_the_top_n() -> None:
    chosen: Counter[str] = Counter()
    for seed in range(60):
        placer = make_placer({"a": 1024, "b": 2048, "c": 4096, "d": 8192}, top_n=2, seed=seed)
        decision = placer.decide(request(), replica="t")
        assert isinstance(decision, Decision)
        chosen[decision.host] += 1
    assert set(chosen) == {"c", "d"}


def test_a_claim_is_seen_by_the_next_decision_and_released() -> None:
    placer = make_placer({"a": 1024, "b": 1024}, top_n=1)
    first = placer.decide(request(memory_mib=1000), replica="t")
    second = placer.decide(request(memory_mib=1000), replica="t")
    assert isinstance(first, Decision)
    assert isinstance(second, Decision)
    assert first.host != second.host
    third = placer.decide(request(memory_mib=1000), replica="t")
    assert isinstance(third, NoValidHost)
    assert sorted(third.filtered["memory"]) == ["a", "b"]
    placer.state.release(first.claim.domain_id)
    again = placer.decide(request(memory_mib=1000), replica="t")
    assert isinstance(again, Decision)
    assert again.host == first.host


def test_a_settled_claim_lasts_until_a_heartbeat_sent_after_it() -> None:
    state = ClusterState()
    state.on_heartbeat(beat("a", memory_mib=1024), sent_at=time.time(), now=time.monotonic())
    placer = Placer(state, build_filters(SchedulerConfig(replica="t")), [], top_n=1)
    decision = placer.decide(request(memory_mib=1000), replica="t")
    assert isinstance(decision, Decision)
    placed_at = time.time()
    state.settle(decision.claim.domain_id, settles_at=placed_at)
    # A heartbeat sent before the compute answered does not show the domain yet.
    state.on_heartbeat(beat("a", memory_mib=1024), sent_at=placed_at - 0.5, now=time.monotonic())
    assert state.hosts["a"].free_memory_mib == 24
    state.on_heartbeat(
        beat("a", memory_mib=1024, used_mib=1000), sent_at=placed_at + 0.01, now=time.monotonic()
    )
    assert state.hosts["a"].free_memory_mib == 24
    assert state.claims == {}


def test_a_claim_ends_exactly_when_a_heartbeat_counts_the_domain() -> None:
    """The host says at which of its claim counts it took the domain; a beat read at that
    count or later has it in its usage, whatever its clock says. A beat read between the
    host's claim and its answer used to leave the claim standing beside the usage that
    counted the domain: a host with room for one more was filtered out."""
    state = ClusterState()
    state.on_heartbeat(
        beat("a", memory_mib=2048, claims_seq=100), sent_at=time.time(), now=time.monotonic()
    )
    placer = Placer(state, build_filters(SchedulerConfig(replica="t")), [], top_n=1)
    first = placer.decide(request(memory_mib=1000), replica="t")
    assert isinstance(first, Decision)
    placed_at = time.time()
    state.settle(first.claim.domain_id, settles_at=placed_at, claim_seq=101)
    # Read before the host took it (count 100), though sent after the answer by its clock.
    state.on_heartbeat(
        beat("a", memory_mib=2048, claims_seq=100), sent_at=placed_at + 5, now=time.monotonic()
    )
    assert state.hosts["a"].free_memory_mib == 1048
    # Read after the host took it (count 101), sent before the answer by its clock: the
    # usage counts it once, the claim is gone, and the room left takes a second domain.
    state.on_heartbeat(
        beat("a", memory_mib=2048, used_mib=1000, claims_seq=101),
        sent_at=placed_at - 0.05,
        now=time.monotonic(),
    )
    assert state.claims == {}
    assert state.hosts["a"].free_memory_mib == 1048
    assert isinstance(placer.decide(request(memory_mib=1000), replica="t"), Decision)


def test_a_beat_that_came_while_the_claim_was_in_flight_ends_it_at_the_answer() -> None:
    """The host took the domain (count 101) and beat (its usage read at 101) before the
    scheduler had its answer: that beat came while the claim was still in flight. At the
    answer the usage counts the domain already, so the claim goes then, not at the next
    beat: placed right after, a domain that fits is not refused for a double count."""
    state = ClusterState()
    state.on_heartbeat(
        beat("a", memory_mib=2048, claims_seq=100), sent_at=time.time(), now=time.monotonic()
    )
    placer = Placer(state, build_filters(SchedulerConfig(replica="t")), [], top_n=1)
    first = placer.decide(request(memory_mib=1000), replica="t")
    assert isinstance(first, Decision)
    state.on_heartbeat(
        beat("a", memory_mib=2048, used_mib=1000, claims_seq=101),
        sent_at=time.time(),
        now=time.monotonic(),
    )
    assert state.hosts["a"].free_memory_mib == 48  # in flight: counted twice for now
    state.settle(first.claim.domain_id, settles_at=time.time(), claim_seq=101)
    assert state.claims == {}
    assert state.hosts["a"].free_memory_mib == 1048
    assert isinstance(placer.decide(request(memory_mib=1000), replica="t"), Decision)


def test_a_deleted_domain_frees_its_claim_before_the_next_heartbeat() -> None:
    state = ClusterState()
    state.on_heartbeat(beat("a", memory_mib=1024), sent_at=time.time(), now=time.monotonic())
    placer = Placer(state, build_filters(SchedulerConfig(replica="t")), [], top_n=1)
    decision = placer.decide(request(memory_mib=1000), replica="t")
    assert isinstance(decision, Decision)
    state.settle(decision.claim.domain_id, settles_at=time.time())
    assert isinstance(placer.decide(request(memory_mib=1000), replica="t"), NoValidHost)
    state.on_domain_undefined(decision.claim.domain_id, "a")
    assert state.claims == {}
    assert isinstance(placer.decide(request(memory_mib=1000), replica="t"), Decision)


def test_a_settled_claim_ends_after_three_heartbeats_whatever_the_clocks() -> None:
    state = ClusterState()
    state.on_heartbeat(beat("a", memory_mib=1024), sent_at=0.0, now=time.monotonic())
    placer = Placer(state, build_filters(SchedulerConfig(replica="t")), [], top_n=1)
    decision = placer.decide(request(memory_mib=1000), replica="t")
    assert isinstance(decision, Decision)
    state.settle(decision.claim.domain_id, settles_at=time.time())
    for _ in range(2):  # a host whose clock is far behind ours
        state.on_heartbeat(beat("a", memory_mib=1024, used_mib=1000), sent_at=0.0, now=0.0)
        assert state.hosts["a"].claimed_memory_mib == 1000
    state.on_heartbeat(beat("a", memory_mib=1024, used_mib=1000), sent_at=0.0, now=0.0)
    assert state.claims == {}
    assert state.hosts["a"].free_memory_mib == 24


def test_domain_events_move_group_membership() -> None:
    state = ClusterState()
    d, g = uuid.uuid4(), GroupKey("p", "g")
    state.learn(d, "a", g)
    assert state.group_hosts(g) == {"a"}
    assert state.group_hosts(GroupKey("q", "g")) == frozenset()  # another project's `g`
    state.on_domain_undefined(d, "b")  # a clean-up elsewhere: still on a
    assert state.group_hosts(g) == {"a"}
    state.on_domain_started(d, "c")
    assert state.group_hosts(g) == {"c"}
    state.on_domain_undefined(d, "c")
    assert state.group_hosts(g) == frozenset()


# ---- the service ------------------------------------------------------------------------------


@pytest.mark.parametrize("node", ["1.7", "older"])
def test_schedule_defines_and_starts_on_the_chosen_host(node: str) -> None:
    """One DefineDomain that starts the domain too (`and_start`); a node older than
    DefineDomain 1.7 answers it shut off, and StartDomain (only if still pending) follows."""
    computes = FakeComputes({"a": (4, 4096), "b": (4, 2048)})
    computes.and_start = node == "1.7"
    svc = service(computes, top_n=1)
    s = spec()
    placement = schedule(svc, ScheduleDomain(spec=s, project="p"))
    assert placement.host == "a"
    assert placement.attempts == []
    assert placement.info.state is PowerState.RUNNING
    define = computes.commands[0]
    assert isinstance(define, DefineDomain)
    assert (define.start, define.and_start) == (True, True)
    if node == "1.7":
        assert computes.calls == [("a", DefineDomain.TYPE)]
    else:
        assert computes.calls == [("a", DefineDomain.TYPE), ("a", StartDomain.TYPE)]
        start = computes.commands[1]
        assert isinstance(start, StartDomain)
        assert start.if_pending
    assert svc.state.domain_host[s.uuid] == "a"


def test_start_false_only_defines() -> None:
    computes = FakeComputes({"a": (4, 4096)})
    placement = schedule(service(computes), ScheduleDomain(spec=spec(), project="p", start=False))
    assert placement.info.state is PowerState.SHUTOFF
    assert computes.calls == [("a", DefineDomain.TYPE)]


def test_a_refusing_host_is_cleaned_up_and_the_next_host_tried() -> None:
    computes = FakeComputes({"a": (4, 8192), "b": (4, 4096), "c": (4, 2048)})
    computes.refuse = {"a": "spawn_failed", "b": "no_capacity"}
    svc = service(computes, top_n=1)
    s = spec()
    placement = schedule(svc, ScheduleDomain(spec=s, project="p"))
    assert placement.host == "c"
    assert [(a.host, a.code) for a in placement.attempts] == [
        ("a", "spawn_failed"),
        ("b", "no_capacity"),
    ]
    assert ("a", UndefineDomain.TYPE) in computes.calls
    assert ("b", UndefineDomain.TYPE) in computes.calls
    assert s.uuid not in computes.defined["a"]
    assert svc.state.claims[s.uuid].host == "c"  # only the winning claim remains
    assert svc.state.hosts["a"].claimed_memory_mib == 0


def test_after_max_attempts_the_answer_is_no_valid_host_with_attempts_and_filters() -> None:
    computes = FakeComputes({"a": (4, 8192), "b": (4, 4096), "c": (4, 2048), "tiny": (1, 256)})
    computes.refuse = dict.fromkeys(computes.limits, "no_capacity")
    svc = service(computes, top_n=1)
    with pytest.raises(ServiceError) as raised:
        schedule(svc, ScheduleDomain(spec=spec(memory_mib=1024), project="p", max_attempts=2))
    err = raised.value
    assert err.code == "no_valid_host"
    assert [a["host"] for a in err.details["attempts"]] == ["a", "b"]
    assert err.details["filtered"] == {"memory": ["tiny"]}
    assert "2 host(s) refused" in err.message
    assert svc.state.claims == {}


def test_no_host_fits_answers_at_once_with_the_filters() -> None:
    computes = FakeComputes({"a": (2, 1024), "b": (2, 1024)})
    svc = service(computes)
    with pytest.raises(ServiceError) as raised:
        schedule(svc, ScheduleDomain(spec=spec(vcpus=4), project="p"))
    assert raised.value.details == {"attempts": [], "filtered": {"vcpus": ["a", "b"]}}
    assert computes.calls == []


def test_a_beating_host_silent_to_the_start_and_its_clean_up_is_not_left_for_another() -> None:
    """Still heartbeating, it may yet start the domain: trying another host could run two
    copies. So without its clean-up confirmed the answer is no_valid_host, naming it."""
    computes = FakeComputes({"a": (4, 8192), "b": (4, 2048)})
    computes.silent = {"a"}
    svc = service(computes, top_n=1)
    with pytest.raises(ServiceError) as raised:
        schedule(svc, ScheduleDomain(spec=spec(), project="p"))
    assert raised.value.code == "no_valid_host"
    assert [(a["host"], a["code"]) for a in raised.value.details["attempts"]] == [
        ("a", "unavailable")
    ]
    assert "may still start it" in raised.value.message
    assert not any(host == "b" for host, _ in computes.calls)
    assert svc.state.claims == {}


def test_a_host_that_beats_but_does_not_answer_is_passed_by_until_it_answers() -> None:
    """Its heartbeat thread runs, its worker is stuck: the create placed there fails (it may
    yet start there), but the next ones go elsewhere at once, not to it again and again; once
    the wait is over it is tried again, and answering makes it a host like any other."""
    computes = FakeComputes({"a": (4, 8192), "b": (4, 2048)})
    computes.silent = {"a"}
    svc = service(computes, top_n=1, unanswered_retry_s=3600.0)  # `a` has more room: first
    with pytest.raises(ServiceError) as raised:
        schedule(svc, ScheduleDomain(spec=spec(), project="p"))
    assert "may still start it" in raised.value.message
    asked = len(computes.calls)
    placement = schedule(svc, ScheduleDomain(spec=spec(), project="p"))
    assert (placement.host, placement.attempts) == ("b", [])
    assert all(host == "b" for host, _ in computes.calls[asked:])
    # The filters say why, when no other host will do.
    with pytest.raises(ServiceError) as raised:
        schedule(svc, ScheduleDomain(spec=spec(memory_mib=4096), project="p"))
    assert raised.value.details["filtered"]["responsive"] == ["a"]
    # Past the wait it is asked again; it answers now, and takes requests as before.
    computes.silent = set()
    svc.state.hosts["a"].unanswered_at = time.monotonic() - 3601.0
    assert schedule(svc, ScheduleDomain(spec=spec(memory_mib=4096), project="p")).host == "a"
    assert svc.state.hosts["a"].unanswered_at is None


@pytest.mark.parametrize("node", ["1.7", "older"])
def test_a_beating_host_whose_start_timed_out_is_cleaned_up_before_the_next_host(
    node: str,
) -> None:
    computes = FakeComputes({"a": (4, 8192), "b": (4, 2048)})
    computes.and_start = node == "1.7"
    svc = service(computes, top_n=1, compute_timeout_s=0.1)
    starting = DefineDomain if node == "1.7" else StartDomain

    def start_times_out_on_a(sent: Sent) -> Message | None:
        if sent.queue == "compute.a" and isinstance(sent.command, starting):
            assert sent.expires, "the start must expire when the scheduler stops waiting"
            raise RpcTimeout("no reply")
        return None

    route(svc, computes, start_times_out_on_a)
    placement = schedule(svc, ScheduleDomain(spec=spec(), project="p"))
    assert placement.host == "b"
    assert placement.attempts[0].host == "a"
    calls = computes.calls
    first_b = calls.index(("b", DefineDomain.TYPE))
    assert calls.index(("a", DestroyDomain.TYPE)) < calls.index(("a", UndefineDomain.TYPE))
    assert calls.index(("a", UndefineDomain.TYPE)) < first_b


def test_a_host_that_went_silent_is_waited_for_with_the_same_command() -> None:
    """Its worker restarting: the start waits in its queue, and a clean-up sent in its place
    would run beside it once the worker is back. So the same command (same id) is sent again,
    and nothing is cleaned up or tried elsewhere."""
    computes = FakeComputes({"a": (4, 8192), "b": (4, 2048)})
    computes.and_start = False  # the start a command of its own (a node older than 1.7)
    svc = service(computes, top_n=1, compute_timeout_s=0.1, restart_wait_s=30.0)
    sent: list[tuple[str, str | None]] = []

    def first_start_unanswered(call: Sent) -> Message | None:
        sent.append((call.command.TYPE, call.message_id))
        if isinstance(call.command, StartDomain) and len(sent) == 2:
            svc.state.hosts["a"].seen_at -= 1000.0  # its heartbeats stopped meanwhile
            raise RpcTimeout("no reply")
        return None

    route(svc, computes, first_start_unanswered)
    placement = schedule(svc, ScheduleDomain(spec=spec(), project="p"))
    assert (placement.host, placement.attempts) == ("a", [])
    _, start, again = sent
    assert start == again
    assert start[0] == StartDomain.TYPE
    assert [c for c in computes.calls if c[1] != StartDomain.TYPE] == [("a", DefineDomain.TYPE)]


def test_a_host_silent_past_the_restart_wait_is_given_up() -> None:
    computes = FakeComputes({"a": (4, 8192), "b": (4, 2048)})
    computes.silent = {"a"}
    svc = service(computes, top_n=1, compute_timeout_s=0.05, restart_wait_s=0.2)
    svc.state.hosts["a"].seen_at -= 100.0  # missed a heartbeat (its interval is 60 s)
    placement = schedule(svc, ScheduleDomain(spec=spec(), project="p"))
    assert placement.host == "b"
    assert placement.attempts[0].code == "unavailable"
    assert computes.calls.count(("a", DefineDomain.TYPE)) >= 2  # asked again meanwhile


def test_a_conflict_is_not_retried() -> None:
    computes = FakeComputes({"a": (4, 8192), "b": (4, 2048)})
    computes.refuse = {"a": "conflict"}
    svc = service(computes, top_n=1)
    with pytest.raises(ServiceError) as raised:
        schedule(svc, ScheduleDomain(spec=spec(), project="p"))
    assert raised.value.code == "conflict"
    assert svc.state.claims == {}


@pytest.mark.parametrize("code", ["invalid", "forbidden"])
def test_a_refusal_of_the_spec_itself_is_the_answer_at_once(code: str) -> None:
    """A bad path or a file that is no kernel is the same on every host: no second host is
    asked, the half-made definition is removed, the code and the field reach the caller."""
    computes = FakeComputes({"a": (4, 8192), "b": (4, 2048)})
    computes.refuse = {"a": code, "b": code}
    svc = service(computes, top_n=1)
    s = spec()
    with pytest.raises(ServiceError) as raised:
        schedule(svc, ScheduleDomain(spec=s, project="p"))
    assert (raised.value.code, raised.value.message) == (code, f"a says {code}")
    assert raised.value.details["host"] == "a"
    # define (and start), undefine: the definition the refused start left is removed
    assert computes.calls == [("a", DefineDomain.TYPE), ("a", UndefineDomain.TYPE)]
    assert s.uuid not in computes.defined["a"]
    assert svc.state.claims == {}


def test_the_requesters_role_travels_to_the_compute_node() -> None:
    computes = FakeComputes({"a": (4, 8192)})
    sent: list[DefineDomain] = []
    svc = service(computes)

    def record_defines(call: Sent) -> None:
        if isinstance(call.command, DefineDomain):
            sent.append(call.command)

    route(svc, computes, record_defines)
    schedule(svc, ScheduleDomain(spec=spec(), project="p", privileged=True))
    schedule(svc, ScheduleDomain(spec=spec(), project="p"))
    assert [c.privileged for c in sent] == [True, False]


def disk_on(host: str | None, target: str = "vda") -> DiskBinding:
    pool = "local" if host else "nfs"
    return DiskBinding(target=target, volume_id=uuid.uuid4(), pool=pool, host=host)


def test_a_volume_on_a_host_places_the_domain_there_and_its_bindings_travel() -> None:
    computes = FakeComputes(dict.fromkeys("abc", (8, 8192)))
    sent: list[DefineDomain] = []
    svc = service(computes)

    def record_defines(call: Sent) -> None:
        if isinstance(call.command, DefineDomain):
            sent.append(call.command)

    route(svc, computes, record_defines)
    kernel = ImageRef(sha256="a" * 64, pool="nfs", kind="kernel")
    for _ in range(5):
        disks = [disk_on("b"), disk_on(None, "vdb")]
        cmd = ScheduleDomain(spec=spec(), project="p", disks=disks, kernel_image=kernel)
        placement = schedule(svc, cmd)
        assert placement.host == "b"
        assert sent[-1].disks == disks
        assert sent[-1].kernel_image == kernel
    image_on_c = ImageRef(sha256="b" * 64, pool="local", host="c", kind="kernel")
    assert (
        schedule(svc, ScheduleDomain(spec=spec(), project="p", kernel_image=image_on_c)).host == "c"
    )
    # An initrd image in a `dir` pool places the domain on its host and travels too; with
    # its kernel image on another host no host has both.
    initrd_on_a = ImageRef(sha256="c" * 64, pool="local", host="a", kind="initrd")
    cmd = ScheduleDomain(spec=spec(), project="p", kernel_image=kernel, initrd_image=initrd_on_a)
    assert schedule(svc, cmd).host == "a"
    assert sent[-1].initrd_image == initrd_on_a
    apart = ScheduleDomain(
        spec=spec(), project="p", kernel_image=image_on_c, initrd_image=initrd_on_a
    )
    with pytest.raises(ServiceError) as raised:
        schedule(svc, apart)
    assert raised.value.code == "no_valid_host"


def test_volumes_on_two_hosts_are_no_valid_host_naming_the_filter() -> None:
    computes = FakeComputes(dict.fromkeys("abc", (8, 8192)))
    svc = service(computes)
    cmd = ScheduleDomain(spec=spec(), project="p", disks=[disk_on("a"), disk_on("b", "vdb")])
    with pytest.raises(ServiceError) as raised:
        schedule(svc, cmd)
    assert raised.value.code == "no_valid_host"
    assert sorted(raised.value.details["filtered"]["volume_locality"]) == ["a", "b", "c"]
    assert "volume_locality" in raised.value.message
    assert computes.calls == []


def test_a_volume_on_a_host_that_is_full_is_no_valid_host_not_another_host() -> None:
    computes = FakeComputes({"a": (8, 8192), "b": (1, 256)})
    svc = service(computes)
    with pytest.raises(ServiceError) as raised:
        schedule(svc, ScheduleDomain(spec=spec(memory_mib=1024), project="p", disks=[disk_on("b")]))
    assert raised.value.details["filtered"] == {"volume_locality": ["a"], "memory": ["b"]}


def test_anti_affinity_and_affinity_through_the_service() -> None:
    computes = FakeComputes(dict.fromkeys("abc", (8, 8192)))
    svc = service(computes)
    anti = {
        schedule(svc, ScheduleDomain(spec=spec(group="web"), project="p")).host for _ in range(3)
    }
    assert anti == {"a", "b", "c"}
    with pytest.raises(ServiceError) as raised:
        schedule(svc, ScheduleDomain(spec=spec(group="web"), project="p"))
    assert sorted(raised.value.details["filtered"]["group_policy"]) == ["a", "b", "c"]
    aff = {
        schedule(svc, ScheduleDomain(spec=spec(group="db", policy="affinity"), project="p")).host
        for _ in range(3)
    }
    assert len(aff) == 1


def test_groups_belong_to_their_project() -> None:
    """Project q's anti-affinity `web` filling every host does not block p's `web`, and the
    affinity group `db` of p does not pull q's `db` along."""
    computes = FakeComputes(dict.fromkeys("ab", (8, 8192)))
    svc = service(computes)
    for _ in range(2):
        schedule(svc, ScheduleDomain(spec=spec(group="web"), project="q"))
    placed = schedule(svc, ScheduleDomain(spec=spec(group="web"), project="p"))
    assert placed.host in {"a", "b"}
    with pytest.raises(ServiceError):  # q's own group is still full
        schedule(svc, ScheduleDomain(spec=spec(group="web"), project="q"))
    db = spec(group="db", policy="affinity")
    first = schedule(svc, ScheduleDomain(spec=db, project="p")).host
    assert svc.state.group_hosts(GroupKey("p", "db")) == {first}
    assert svc.state.group_hosts(GroupKey("q", "db")) == frozenset()


def test_forced_host_through_the_service() -> None:
    computes = FakeComputes(dict.fromkeys("abc", (8, 8192)))
    svc = service(computes)
    assert schedule(svc, ScheduleDomain(spec=spec(host="b"), project="p")).host == "b"


def test_peer_claims_count_and_teach_group_membership() -> None:
    computes = FakeComputes({"a": (4, 1024), "b": (4, 1024)})
    svc = service(computes, top_n=1)
    peer_domain = uuid.uuid4()

    def peer(phase: ClaimPhase) -> None:
        event = PlacementClaim(
            phase=phase,
            replica="r2",
            domain_id=peer_domain,
            host="a",
            vcpus=1,
            memory_mib=1000,
            group="g",
            project="p",
        )
        svc.on_event(envelope_for(event, source="r2"), event)

    peer(ClaimPhase.CLAIMED)
    assert svc.state.hosts["a"].free_memory_mib == 24
    assert svc.state.group_hosts(GroupKey("p", "g")) == {"a"}
    assert svc.state.group_hosts(GroupKey("q", "g")) == frozenset()
    placement = schedule(svc, ScheduleDomain(spec=spec(memory_mib=1000), project="p"))
    assert placement.host == "b"
    peer(ClaimPhase.RELEASED)
    assert svc.state.hosts["a"].free_memory_mib == 1024
    assert svc.state.group_hosts(GroupKey("p", "g")) == frozenset()


def test_domain_events_from_the_bus_update_membership() -> None:
    svc = SchedulerService(SchedulerConfig(replica="r1"))
    d = uuid.uuid4()
    started = DomainStarted(
        domain_id=d,
        name="x",
        host="h1",
        seq=2,
        state=PowerState.RUNNING,
        detail=StartedDetail.BOOTED,
    )
    svc.on_event(envelope_for(started, source="c"), started)
    assert svc.state.domain_host[d] == "h1"
    gone = DomainUndefined(
        domain_id=d,
        name="x",
        host="h1",
        seq=4,
        state=PowerState.SHUTOFF,
        detail=UndefinedDetail.REMOVED,
    )
    svc.on_event(envelope_for(gone, source="c"), gone)
    assert d not in svc.state.domain_host


def test_concurrent_requests_never_over_commit_a_host() -> None:
    """Many threads place at once while heartbeats report usage; the fake compute nodes
    refuse anything beyond their limits, so any refusal is a lapse in the scheduler's claims."""
    limits = {f"h{i}": (4, 4096) for i in range(4)}  # room for 16 x (1 vCPU, 1 GiB)
    computes = FakeComputes(limits)
    computes.delay = 0.002
    svc = service(computes, top_n=3)
    stop = threading.Event()

    def heartbeats() -> None:
        while not stop.wait(0.005):
            feed(svc, computes)

    beater = threading.Thread(target=heartbeats)
    beater.start()
    outcomes: Counter[str] = Counter()

    def place(_: int) -> None:
        try:
            schedule(svc, ScheduleDomain(spec=spec(memory_mib=1024), project="p"))
            outcomes["placed"] += 1
        except ServiceError as exc:
            outcomes[exc.code] += 1

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(place, range(24)))
    finally:
        stop.set()
        beater.join()
    assert outcomes == {"placed": 16, "no_valid_host": 8}
    assert computes.refusals == 0
    for host, (vcpus, mib) in limits.items():
        assert computes.used[host]["vcpus"] <= vcpus
        assert computes.used[host]["mib"] <= mib


def announcer(publish: Callable[[PlacementClaim], None]) -> Callable[..., None]:
    def announce(event: PlacementClaim, *, confirm: bool) -> None:
        publish(event)

    return announce


def test_two_replicas_sharing_claims_do_not_collide() -> None:
    """Two services with one set of compute nodes, each hearing the other's claim events: a
    collision can only happen between a decision and its announcement, and the compute node's
    refusal then sends the loser elsewhere; every domain is placed, no host over-committed."""
    computes = FakeComputes({f"h{i}": (4, 4096) for i in range(5)})
    computes.delay = 0.002
    replicas = [service(computes, replica=f"r{i}", top_n=2) for i in range(2)]

    def relay(source: SchedulerService) -> Callable[[PlacementClaim], None]:
        def publish(event: PlacementClaim) -> None:
            for other in replicas:
                if other is not source:
                    other.on_event(envelope_for(event, source=source.replica), event)

        return publish

    for svc in replicas:
        svc.announce = announcer(relay(svc))  # type: ignore[method-assign]

    placed: Counter[str] = Counter()

    def place(i: int) -> None:
        try:
            schedule(replicas[i % 2], ScheduleDomain(spec=spec(memory_mib=1024), project="p"))
            placed["ok"] += 1
        except ServiceError:
            placed["none"] += 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(place, range(16)))
    assert placed["ok"] == 16
    for host, (vcpus, mib) in computes.limits.items():
        assert computes.used[host]["vcpus"] <= vcpus
        assert computes.used[host]["mib"] <= mib
    assert computes.refusals <= 4  # collisions are rare, not impossible
