"""The decision loop: filter → weigh → pick among the top N → claim, atomically per replica.

    placer = Placer(state, build_filters(config), build_weighers(config), top_n=2)
    decision = placer.decide(PlacementRequest.from_spec(spec), replica="r1")
    if isinstance(decision, Decision): ... ask decision.host, then state.settle / state.release

No I/O happens here: the compute node is asked by the caller, outside the lock.
"""

from __future__ import annotations

import dataclasses
import heapq
import random
import time
from collections.abc import Collection
from dataclasses import dataclass
from itertools import compress, repeat

from services.scheduler.filters import Filter
from services.scheduler.state import Claim, ClusterState, HostState, PlacementRequest
from services.scheduler.weights import Weigher

# filter name → hosts it removed, in the order the hosts were considered.
Filtered = dict[str, list[str]]


@dataclass(frozen=True, slots=True)
class Decision:
    """A host was chosen and `claim` is held on it until released or settled."""

    host: str
    claim: Claim
    filtered: Filtered


@dataclass(frozen=True, slots=True)
class NoValidHost:
    """No host passed every filter; `filtered` says which filter removed which host."""

    filtered: Filtered


class Placer:
    def __init__(
        self,
        state: ClusterState,
        filters: list[Filter],
        weighers: list[Weigher],
        *,
        top_n: int = 2,
        rng: random.Random | None = None,
    ) -> None:
        self.state = state
        self.filters = filters
        self.weighers = weighers
        self.top_n = top_n
        self.rng = rng or random.Random()

    def decide(
        self,
        request: PlacementRequest,
        *,
        replica: str,
        exclude: Collection[str] = (),
        now: float | None = None,
    ) -> Decision | NoValidHost:
        """Choose a host for `request` among the known hosts not in `exclude` and claim its
        room. Hosts in `exclude` (refused earlier for this request) are not reported."""
        now = time.monotonic() if now is None else now
        with self.state.lock:
            request = dataclasses.replace(
                request,
                # The domain's own host is no other member's (it may be moving away).
                group_hosts=self.state.group_hosts(request.group, besides=request.domain_id),
                now=now,
                hearing=self.state.hearing(now),
            )
            hosts, filtered = self.filter(request, exclude)
            if not hosts:
                return NoValidHost(filtered)
            chosen = self.pick(self.weigh(hosts, request))
            claim = Claim(
                domain_id=request.domain_id,
                host=chosen.name,
                vcpus=request.vcpus,
                memory_mib=request.memory_mib,
                group=request.group,
                replica=replica,
            )
            self.state.add_claim(claim)
            return Decision(chosen.name, claim, filtered)

    def filter(
        self, request: PlacementRequest, exclude: Collection[str] = ()
    ) -> tuple[list[HostState], Filtered]:
        hosts = [h for h in self.state.hosts.values() if h.name not in exclude]
        filtered: Filtered = {}
        for flt in self.filters:
            # map/compress: this runs for every host of every decision.
            verdicts = list(map(flt.host_passes, hosts, repeat(request)))
            if not all(verdicts):
                removed = compress(hosts, [not ok for ok in verdicts])
                filtered[flt.name] = [h.name for h in removed]
                hosts = list(compress(hosts, verdicts))
                if not hosts:
                    break
        return hosts, filtered

    def weigh(
        self, hosts: list[HostState], request: PlacementRequest
    ) -> list[tuple[float, HostState]]:
        """Each weigher's raw scores scaled to 0..1 across `hosts`, times its multiplier,
        summed per host."""
        totals = [0.0] * len(hosts)
        for weigher in self.weighers:
            raw = list(map(weigher.weigh, hosts, repeat(request)))
            low, high = min(raw), max(raw)
            if high == low:
                continue  # no preference among these hosts
            scale = weigher.multiplier / (high - low)
            totals = [t + (r - low) * scale for t, r in zip(totals, raw, strict=True)]
        return list(zip(totals, hosts, strict=True))

    def pick(self, weighed: list[tuple[float, HostState]]) -> HostState:
        """At random among the best `top_n`, and among every host tied with the last of
        them, so replicas facing identical hosts do not all start with the same one."""
        threshold = heapq.nlargest(self.top_n, [w for w, _ in weighed])[-1]
        return self.rng.choice([h for w, h in weighed if w >= threshold])
