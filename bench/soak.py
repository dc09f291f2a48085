"""The chaos suite, longer: a soak under faults.

    python bench/soak.py                 # 240 s of faulted run (plus ~1-2 min of start-up)
    python bench/soak.py --seconds 1800 --clients 6

The same run as tests/chaos (tests/chaos/run.py): a three-node private RabbitMQ cluster, a
private PostgreSQL, two API replicas on it, two scheduler replicas, FakeDriver compute nodes
and a KvmDriver node running the test guest where /dev/kvm can create a VM; client threads
cycle guests (create, destroy, start, delete) through the API while the fault plan repeats
every 90 s (broker connections cut, a broker node killed and restarted, compute workers,
VMMs, an API and a scheduler replica killed -9 and restarted). Then every invariant is
checked (registry, hosts, `ps`, an independent event subscriber).

Ends with JSON lines: commands, events, faults injected, invariants held (1 when none was
violated; the violations go to stderr) with `known_bug_violations`, the lines the checks set
aside as a known product bug (tests/chaos/checks.py). Exit status 1 when one was violated.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.figures import emit
from tests.chaos.run import run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=240.0, help="faulted run length")
    parser.add_argument("--clients", type=int, default=4, help="client threads")
    parser.add_argument("--fake-hosts", type=int, default=2, help="FakeDriver compute nodes")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="flotilla-soak-"))
    result = run(base, args.seconds, clients=args.clients, fake_hosts=args.fake_hosts)
    report = result.report
    for line in report.violations:
        print(f"VIOLATION {line}", file=sys.stderr)
    for line in report.known:
        print(line, file=sys.stderr)
    for line in report.waits:
        print(f"waited: {line}", file=sys.stderr)
    for fault in result.injected:
        print(f"fault at {fault.at:.1f} s: {fault.fault} {fault.detail}", file=sys.stderr)
    for failure in result.fault_failures:
        print(f"fault not injected: {failure}", file=sys.stderr)
    kinds = Counter(f.fault for f in result.injected)
    held = not report.violations and not result.fault_failures
    common = {"seconds": args.seconds, "clients": args.clients, "kvm_node": not result.kvm}
    figures: list[dict[str, object]] = [
        {
            "metric": "soak.commands",
            "value": report.figures["commands"],
            "unit": "requests",
            "accepted": report.figures["accepted"],
            "refused": report.figures["refused"],
            "unknown_outcome": report.figures["unknown_outcome"],
            "domains": report.figures["domains"],
            **common,
        },
        {
            "metric": "soak.events",
            "value": report.figures["events"],
            "unit": "events",
            "republished": report.figures["events_republished"],
            **common,
        },
        {
            "metric": "soak.faults_injected",
            "value": len(result.injected),
            "unit": "faults",
            "by_kind": dict(kinds),
            **common,
        },
        {
            "metric": "soak.invariants_held",
            "value": int(held),
            "unit": "bool",
            "violations": len(report.violations),
            "known_bug_violations": len(report.known),
            "target": "1",
            **common,
        },
    ]
    emit(figures)
    if held:
        shutil.rmtree(base, ignore_errors=True)
    else:
        print(f"kept for inspection: {base}", file=sys.stderr)
    return 0 if held else 1


if __name__ == "__main__":
    raise SystemExit(main())
