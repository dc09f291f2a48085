"""One chaos run: the rig up, clients cycling guests, faults on a schedule, then the checks.
Shared by tests/chaos/test_chaos.py and bench/soak.py."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.broker import PrivateCluster
from services.bus import Bus
from tests.chaos.checks import Report, Watcher, check
from tests.chaos.faults import FaultPlan, Injected
from tests.chaos.rig import Rig
from tests.chaos.workload import Workload
from tests.pg import private_cluster

KVM_HOST = "chaos-kvm"


@dataclass
class Result:
    report: Report
    injected: list[Injected]
    fault_failures: list[str]
    kvm: str  # "" when a KvmDriver node ran, else why not
    seconds: dict[str, float] = field(default_factory=dict)


def kvm_reason() -> str:
    """ "" where the KvmDriver node can run the test guest here, else why not."""
    try:
        from native import kvm_unavailable_reason

        return kvm_unavailable_reason() or ""
    except Exception as exc:
        return f"native runtime unavailable: {exc}"


def _kernel(kvm: bool) -> str:
    if kvm:
        from native.testguest import build

        return str(build())
    from tests.bootfiles import KERNEL

    return KERNEL  # the FakeDriver never reads it; an admin's path needs no allowed dir


def run(
    base: Path,
    duration: float,
    clients: int = 4,
    fake_hosts: int = 2,
    *,
    cluster: PrivateCluster | None = None,
    amqp_url: str = "",
    pg_url: str = "",
) -> Result:
    """Everything under `base`; every process started is ended by its pid before this
    returns. `cluster` (with `amqp_url`, its URL list for a vhost of the run's own) and
    `pg_url` (an empty database) are used as given, else formed here and ended after. A
    cluster given is left as whole as it was given: a node the faults kill has rejoined."""
    why_no_kvm = kvm_reason()
    kvm = not why_no_kvm
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        if cluster is None:
            cluster = PrivateCluster(base / "rabbitmq", 3, name="flotilla-chaos")
            stack.callback(cluster.stop)
            cluster.start(timeout=300)
        seconds["cluster_start"] = time.monotonic() - t0
        print(f"chaos: broker cluster up in {seconds['cluster_start']:.0f} s", file=sys.stderr)
        pg_url = pg_url or stack.enter_context(private_cluster())
        rig = Rig(base, cluster, pg_url, _kernel(kvm), amqp_url)
        stack.callback(rig.stop)
        for i in range(2):
            rig.add_api(i)
            rig.add_scheduler(i)
        for i in range(fake_hosts):
            rig.add_compute(f"chaos-fake-{i}", "fake")
        if kvm:
            rig.add_compute(KVM_HOST, "kvm")
        rig.wait_ready(timeout=240)
        seconds["rig_ready"] = time.monotonic() - t0
        print(f"chaos: services ready at {seconds['rig_ready']:.0f} s", file=sys.stderr)
        bus = stack.enter_context(Bus(rig.amqp_url, source="chaos-checker"))
        bus.start(timeout=60)
        watcher = Watcher(bus).start()
        stack.callback(watcher.close)
        hosts = {0: KVM_HOST} if kvm else {}
        workload = Workload(rig.api_urls, rig.auth(), rig.kernel, clients, hosts=hosts).start()
        plan = FaultPlan(rig, duration)
        injector = threading.Thread(target=plan.run, name="chaos-faults")
        injector.start()
        time.sleep(duration)
        plan.stop.set()
        injector.join()
        workload.join()
        seconds["clients_done"] = time.monotonic() - t0
        plan.finish()
        seconds["faults_done"] = time.monotonic() - t0
        seconds["run"] = time.monotonic() - t0 - seconds["rig_ready"]
        report = check(rig, workload, watcher, bus)
        seconds["total"] = time.monotonic() - t0
        for name, replica in (
            *((r.name, r) for r in (*rig.apis, *rig.schedulers)),
            *((c.replica.name, c.replica) for c in rig.computes),
        ):
            if not replica.alive():
                report.fail(f"{name} is not running at the end")
        if report.violations:
            print(f"logs under {base}", file=sys.stderr)
        return Result(report, plan.injected, plan.failures, why_no_kvm, seconds)
    raise AssertionError("unreachable")
