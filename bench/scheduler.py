"""The scheduler's decision loop on 1,000 simulated hosts, in process.

    python bench/scheduler.py [--hosts 1000] [--seconds 3]

What is measured: `Placer.decide` — filter (all registered filters) → weigh (RAM spread) →
pick among the top N → claim — against host states fed through `ClusterState.on_heartbeat`
as the real service does. No broker and no compute calls: the figure is the ceiling the loop
puts on one replica, not an end-to-end placement rate (that is bounded by the compute node's
define + start round trips; see tests/integration/test_scale.py).

The hosts are mixed: sizes 16-128 vCPUs and 64-512 GiB, usage 0-90 %, ~2 % disabled, ~2 %
silent (down); requests take 1-8 vCPUs and 0.5-16 GiB, one in five in one of 50
anti-affinity groups. 64 claims stay in flight (the oldest is released as each decision is
made), as when compute nodes answer while decisions go on. The figure is the median of three
runs of `seconds`/3 each.

Anchor: the issue's target, 500 decisions/s (a constant, not measured here).
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import uuid
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.figures import emit, figure
from protos.domain import PlacementPolicy
from protos.host import HostHeartbeat, HostInventory, KvmKind, Resources
from services.scheduler.config import SchedulerConfig
from services.scheduler.filters import build_filters
from services.scheduler.placer import Decision, Placer
from services.scheduler.state import ClusterState, GroupKey, PlacementRequest
from services.scheduler.weights import build_weighers

TARGET = 500.0
IN_FLIGHT = 64


def simulated_cluster(hosts: int, rng: random.Random, config: SchedulerConfig) -> ClusterState:
    state = ClusterState(config.down_after_intervals)
    now = time.monotonic()
    for i in range(hosts):
        vcpus = rng.choice((16, 32, 64, 128))
        memory = rng.choice((64, 128, 256, 512)) * 1024
        load = rng.random() * 0.9
        beat = HostHeartbeat(
            host=f"sim-{i:04d}",
            version="bench",
            interval_s=2.0,
            enabled=rng.random() > 0.02,
            inventory=HostInventory(
                capacity=Resources(vcpus=vcpus, memory_mib=memory),
                cpu_allocation_ratio=4.0,
                ram_allocation_ratio=1.0,
                kvm=KvmKind.HARDWARE,
                max_vcpus_per_domain=vcpus,
            ),
            usage=Resources(vcpus=int(vcpus * 4 * load), memory_mib=int(memory * load)),
        )
        silent = rng.random() < 0.02
        state.on_heartbeat(beat, sent_at=time.time(), now=now - (100.0 if silent else 0.0))
    return state


def requests(rng: random.Random) -> list[PlacementRequest]:
    made = []
    for _ in range(4096):
        grouped = rng.random() < 0.2
        made.append(
            PlacementRequest(
                domain_id=uuid.uuid4(),
                vcpus=rng.choice((1, 1, 2, 2, 4, 8)),
                memory_mib=rng.choice((512, 1024, 2048, 4096, 8192, 16384)),
                group=GroupKey("bench", f"group-{rng.randrange(50)}") if grouped else None,
                policy=PlacementPolicy.ANTI_AFFINITY,
            )
        )
    return made


def _run(placer: Placer, pool: list[PlacementRequest], seconds: float) -> tuple[float, float]:
    """(decisions per CPU second, decisions per wall-clock second) over `seconds` of CPU."""
    in_flight: deque[uuid.UUID] = deque()
    decisions = 0
    start, wall = time.thread_time(), time.perf_counter()
    deadline = start + seconds
    while True:
        for template in pool:
            # A fresh id per decision: every decision claims anew.
            request = PlacementRequest(
                uuid.uuid4(), template.vcpus, template.memory_mib, template.group, template.policy
            )
            decision = placer.decide(request, replica="bench")
            decisions += 1
            if isinstance(decision, Decision):
                in_flight.append(request.domain_id)
                if len(in_flight) > IN_FLIGHT:
                    placer.state.release(in_flight.popleft())
            if decisions % 64 == 0 and time.thread_time() >= deadline:
                cpu = time.thread_time() - start
                return decisions / cpu, decisions / (time.perf_counter() - wall)


def measure_decisions_per_s(hosts: int = 1000, seconds: float = 3.0, seed: int = 7) -> float:
    """Scheduler decisions per second of CPU (filter → weigh → pick → claim) on `hosts`
    simulated host states, in process, no compute calls; the median of three runs of
    `seconds`/3 of CPU time each."""
    return _measure(hosts, seconds, seed)[0]


def _measure(hosts: int, seconds: float, seed: int) -> tuple[float, float]:
    rng = random.Random(seed)
    config = SchedulerConfig(replica="bench")
    state = simulated_cluster(hosts, rng, config)
    placer = Placer(
        state,
        build_filters(config),
        build_weighers(config),
        top_n=config.top_n,
        rng=random.Random(seed),
    )
    pool = requests(rng)
    _run(placer, pool[:200], 0.2)  # warm-up
    runs = [_run(placer, pool, seconds / 3) for _ in range(3)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    value, wall = _measure(args.hosts, args.seconds, seed=7)
    print(f"wall-clock: {wall:.1f} decisions/s", file=sys.stderr)
    emit(
        [
            figure(
                "sched.decisions_per_s",
                value,
                "decisions/s",
                anchor="target",
                anchor_value=TARGET,
                target="ratio >= 1",
            )
        ]
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
