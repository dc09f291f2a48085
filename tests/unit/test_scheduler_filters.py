"""Each scheduler filter and weigher on hand-made host states."""

from __future__ import annotations

import random
import time
import uuid

import pytest

from protos.domain import PlacementPolicy
from protos.host import HostHeartbeat, HostInventory, KvmKind, Resources
from services.scheduler.config import SchedulerConfig
from services.scheduler.filters import (
    AliveFilter,
    CpuFilter,
    ForcedHostFilter,
    GroupPolicyFilter,
    MaxVcpusFilter,
    PoolsFilter,
    RamFilter,
    VolumeLocalityFilter,
    build_filters,
)
from services.scheduler.placer import Placer
from services.scheduler.state import Claim, ClusterState, GroupKey, HostState, PlacementRequest
from services.scheduler.weights import CpuWeigher, RamWeigher, build_weighers

CONFIG = SchedulerConfig(replica="test")
NOW = 1000.0


def beat(
    name: str,
    *,
    vcpus: int = 4,
    memory_mib: int = 4096,
    used_vcpus: int = 0,
    used_mib: int = 0,
    cpu_ratio: float = 1.0,
    ram_ratio: float = 1.0,
    enabled: bool = True,
    interval_s: float = 1.0,
    max_vcpus: int = 64,
    claims_seq: int = 0,
    pools: list[str] | None = None,
) -> HostHeartbeat:
    return HostHeartbeat(
        host=name,
        version="test",
        interval_s=interval_s,
        enabled=enabled,
        claims_seq=claims_seq,
        inventory=HostInventory(
            capacity=Resources(vcpus=vcpus, memory_mib=memory_mib),
            cpu_allocation_ratio=cpu_ratio,
            ram_allocation_ratio=ram_ratio,
            kvm=KvmKind.NONE,
            max_vcpus_per_domain=max_vcpus,
            pools=pools,
        ),
        usage=Resources(vcpus=used_vcpus, memory_mib=used_mib),
    )


def host(state: ClusterState | None = None, *, seen_at: float = NOW, **kwargs: object) -> HostState:
    state = state or ClusterState()
    name = str(kwargs.pop("name", "node-1"))
    return state.on_heartbeat(beat(name, **kwargs), sent_at=time.time(), now=seen_at)  # type: ignore[arg-type]


def request(**kwargs: object) -> PlacementRequest:
    values: dict[str, object] = {
        "domain_id": uuid.uuid4(),
        "vcpus": 1,
        "memory_mib": 512,
        "now": NOW,
    }
    values.update(kwargs)
    return PlacementRequest(**values)  # type: ignore[arg-type]


def test_alive_filter_removes_silent_and_disabled_hosts() -> None:
    flt = AliveFilter(CONFIG)
    assert flt.host_passes(host(seen_at=NOW - 2.9, interval_s=1.0), request())
    assert not flt.host_passes(host(seen_at=NOW - 3.1, interval_s=1.0), request())
    assert flt.host_passes(host(seen_at=NOW - 5.0, interval_s=2.0), request())
    assert not flt.host_passes(host(enabled=False), request())
    lenient = AliveFilter(SchedulerConfig(replica="t", down_after_intervals=10))
    assert lenient.host_passes(host(seen_at=NOW - 9.0, interval_s=1.0), request())


def alive(state: ClusterState, now: float) -> set[str]:
    """The hosts the placer's alive filter passes at `now`, checked against `is_alive`."""
    placer = Placer(state, [AliveFilter(CONFIG)], [])
    passed, _ = placer.filter(request(now=now, hearing=state.hearing(now)))
    names = {h.name for h in passed}
    assert names == {h.name for h in state.hosts.values() if state.is_alive(h, now)}
    return names


def test_a_replica_that_fell_behind_judges_silence_by_the_stream_of_heartbeats() -> None:
    """By the replica's own clock every host goes silent at once when it stops taking events
    (a busy process, a stalled broker): no host is down for that, for a grace. Taken late but
    in order, heartbeats show by their sending times who missed beats and who did not."""
    state = ClusterState(down_after_intervals=3.0, silence_grace_intervals=10.0)
    wall, mono = 5000.0, 100.0  # a beat sent at wall + k is taken at mono + k when on time
    for k in range(5):
        for name in ("a", "b"):
            state.on_heartbeat(beat(name), sent_at=wall + k, now=mono + k)
    assert alive(state, mono + 4 + 3.0) == {"a", "b"}
    # The replica hears nothing from 4 s on: at 10 s of silence, 3 intervals late by its
    # clock, nobody is down (it heard nobody at all); past the grace, everybody is.
    assert alive(state, mono + 4 + 10) == {"a", "b"}
    assert alive(state, mono + 4 + 13.5) == set()
    # It takes the backlog at last, fast and in order: b stopped at sent time 8, a beat on.
    now = mono + 4 + 14
    for k in range(5, 19):
        now += 0.05
        for name in ("a", "b") if k <= 8 else ("a",):
            state.on_heartbeat(beat(name), sent_at=wall + k, now=now)
        assert alive(state, now) == {"a", "b"}, k  # b's last beat was taken just now
    # b is down 3 intervals after its last beat was taken (the stream shows it silent since).
    b_taken = state.hosts["b"].seen_at
    assert alive(state, b_taken + 2.9) == {"a", "b"}
    assert alive(state, b_taken + 3.1) == {"a"}
    # A host whose clock is off by minutes but that beats on is never down.
    state.on_heartbeat(beat("c"), sent_at=wall - 600, now=now)
    assert alive(state, now + 2.9) == {"a", "c"}
    # In real time with a taken on time, c's silence is c's own: down after 3 intervals.
    for k in range(19, 25):
        state.on_heartbeat(beat("a"), sent_at=wall + k, now=now + k - 18)
    assert alive(state, now + 6) == {"a"}


def test_cpu_filter_applies_the_allocation_ratio_usage_and_claims() -> None:
    flt = CpuFilter(CONFIG)
    state = ClusterState()
    h = host(state, vcpus=4, cpu_ratio=2.0, used_vcpus=5)  # 8 allowed, 3 free
    assert flt.host_passes(h, request(vcpus=3))
    assert not flt.host_passes(h, request(vcpus=4))
    state.add_claim(Claim(uuid.uuid4(), "node-1", 2, 0, None, "test"))
    assert flt.host_passes(h, request(vcpus=1))
    assert not flt.host_passes(h, request(vcpus=2))


def test_ram_filter_applies_the_allocation_ratio_usage_and_claims() -> None:
    flt = RamFilter(CONFIG)
    state = ClusterState()
    h = host(state, memory_mib=1000, ram_ratio=1.5, used_mib=1000)  # 1500 allowed, 500 free
    assert flt.host_passes(h, request(memory_mib=500))
    assert not flt.host_passes(h, request(memory_mib=501))
    domain = uuid.uuid4()
    state.add_claim(Claim(domain, "node-1", 0, 400, None, "test"))
    assert not flt.host_passes(h, request(memory_mib=101))
    state.release(domain)
    assert flt.host_passes(h, request(memory_mib=500))


def test_group_policy_filter() -> None:
    flt = GroupPolicyFilter(CONFIG)
    a, b = host(name="a"), host(name="b")
    g = GroupKey("p", "g")
    anti = request(group=g, policy=PlacementPolicy.ANTI_AFFINITY, group_hosts=frozenset({"a"}))
    assert not flt.host_passes(a, anti)
    assert flt.host_passes(b, anti)
    aff = request(group=g, policy=PlacementPolicy.AFFINITY, group_hosts=frozenset({"a"}))
    assert flt.host_passes(a, aff)
    assert not flt.host_passes(b, aff)
    first = request(group=g, policy=PlacementPolicy.AFFINITY)
    assert flt.host_passes(a, first)
    assert flt.host_passes(b, first)
    assert flt.host_passes(a, request(group_hosts=frozenset({"a"})))  # no group: no policy


def test_forced_host_filter() -> None:
    flt = ForcedHostFilter(CONFIG)
    assert flt.host_passes(host(name="a"), request(forced_host="a"))
    assert not flt.host_passes(host(name="b"), request(forced_host="a"))
    assert flt.host_passes(host(name="b"), request())


def test_max_vcpus_filter() -> None:
    flt = MaxVcpusFilter(CONFIG)
    assert flt.host_passes(host(max_vcpus=4, vcpus=64), request(vcpus=4))
    assert not flt.host_passes(host(max_vcpus=4, vcpus=64), request(vcpus=5))


def test_volume_locality_filter() -> None:
    flt = VolumeLocalityFilter(CONFIG)
    assert flt.host_passes(host(name="a"), request())  # shared pools only: anywhere
    assert flt.host_passes(host(name="b"), request(volume_hosts=frozenset({"b"})))
    assert not flt.host_passes(host(name="a"), request(volume_hosts=frozenset({"b"})))
    # Volumes on two hosts: nowhere.
    for name in "ab":
        assert not flt.host_passes(host(name=name), request(volume_hosts=frozenset("ab")))


def test_pools_filter() -> None:
    flt = PoolsFilter(CONFIG)
    both = frozenset({"fast", "default"})
    assert flt.host_passes(host(pools=[]), request())  # no host-local volume: anywhere
    assert flt.host_passes(host(pools=["default", "fast", "x"]), request(pools=both))
    assert not flt.host_passes(host(pools=["default"]), request(pools=both))
    assert not flt.host_passes(host(pools=[]), request(pools=frozenset({"fast"})))
    # A host whose heartbeat does not list its pools (an older node) is not removed.
    assert flt.host_passes(host(pools=None), request(pools=both))


def test_filters_are_registered_explicitly_and_selectable() -> None:
    names = [f.name for f in build_filters(CONFIG)]
    assert names == [
        "forced_host",
        "volume_locality",
        "pools",
        "alive",
        "responsive",
        "max_vcpus",
        "vcpus",
        "memory",
        "group_policy",
    ]
    subset = build_filters(SchedulerConfig(replica="t", filters="alive, memory"))  # type: ignore[arg-type]
    assert [f.name for f in subset] == ["alive", "memory"]
    with pytest.raises(ValueError, match="unknown filters"):
        build_filters(SchedulerConfig(replica="t", filters=("alive", "nope")))


def test_weighers_score_free_room() -> None:
    roomy, tight = host(name="a", memory_mib=8192, vcpus=8), host(name="b", memory_mib=2048)
    assert RamWeigher(1.0).weigh(roomy, request()) > RamWeigher(1.0).weigh(tight, request())
    assert CpuWeigher(1.0).weigh(roomy, request()) > CpuWeigher(1.0).weigh(tight, request())
    spread = build_weighers(CONFIG)
    assert [(w.name, w.multiplier) for w in spread] == [("ram", 1.0)]
    pack = build_weighers(SchedulerConfig(replica="t", weigher="pack", cpu_weight_multiplier=0.5))
    assert [(w.name, w.multiplier) for w in pack] == [("ram", -1.0), ("cpu", -0.5)]


@pytest.mark.parametrize(("weigher", "expected"), [("spread", "big"), ("pack", "small")])
def test_spread_and_pack_choose_opposite_hosts(weigher: str, expected: str) -> None:
    config = SchedulerConfig(replica="t", weigher=weigher, top_n=1)  # type: ignore[arg-type]
    state = ClusterState()
    now = time.monotonic()
    for name, mib in (("small", 2048), ("mid", 4096), ("big", 8192)):
        state.on_heartbeat(beat(name, memory_mib=mib), sent_at=time.time(), now=now)
    placer = Placer(state, build_filters(config), build_weighers(config), top_n=1)
    decision = placer.decide(request(), replica="t")
    assert decision.host == expected  # type: ignore[union-attr]


def test_multipliers_weigh_one_weigher_against_another() -> None:
    state = ClusterState()
    now = time.monotonic()
    # "ram" has more free memory, "cpu" more free vCPUs.
    state.on_heartbeat(beat("ram", vcpus=2, memory_mib=8192), sent_at=time.time(), now=now)
    state.on_heartbeat(beat("cpu", vcpus=16, memory_mib=4096), sent_at=time.time(), now=now)
    for ram_m, cpu_m, expected in ((1.0, 0.5, "ram"), (0.5, 1.0, "cpu")):
        config = SchedulerConfig(
            replica="t", ram_weight_multiplier=ram_m, cpu_weight_multiplier=cpu_m
        )
        placer = Placer(
            state, build_filters(config), build_weighers(config), top_n=1, rng=random.Random(1)
        )
        decision = placer.decide(request(), replica="t")
        assert decision.host == expected  # type: ignore[union-attr]
        state.release(decision.claim.domain_id)  # type: ignore[union-attr]
