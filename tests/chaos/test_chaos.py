"""The chaos suite: guests cycle (create, destroy, start, delete) from several client threads
through two API replicas while broker connections are cut, a broker node, the compute
worker, VMMs, an API replica and a scheduler replica are killed (-9) and restarted. Then
the invariants hold (tests/chaos/checks.py), or the test fails with the evidence.

FLOTILLA_CHAOS_KEEP=1 keeps the run's logs (and says where) even when it passes.
FLOTILLA_CHAOS_SECONDS sets the length of the faulted run: by default 30 s, one round of the
twelve faults, which keeps the suite's share of `make test` near a minute and a half (`make
test-chaos` runs 75 s, docs/testing.md); the services' start and the clients' wind-down come
on top. The broker cluster is the session's (`broker_cluster`, shared with the cluster tests),
the run in a vhost of its own; PostgreSQL is the session's server, with a database of the
run's own. `bench/soak.py` runs the same longer on a cluster of its own and prints figures.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from services.broker import PrivateCluster
from tests.brokers import cluster_vhost
from tests.chaos.run import run
from tests.pg import fresh_database

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.chaos]

SECONDS = float(os.environ.get("FLOTILLA_CHAOS_SECONDS", "30"))


@pytest.mark.timeout(int(SECONDS) + 900)
def test_guests_cycle_through_faults_and_every_invariant_holds(
    broker_cluster: PrivateCluster, pg_server: str
) -> None:
    base = Path(tempfile.mkdtemp(prefix="flotilla-chaos-"))
    keep = True  # the logs, unless the run passes
    try:
        with (
            cluster_vhost(broker_cluster, "chaos") as amqp_url,
            fresh_database(pg_server) as pg_url,
        ):
            result = run(base, SECONDS, cluster=broker_cluster, amqp_url=amqp_url, pg_url=pg_url)
        report = result.report
        print(f"\nkvm node: {'yes' if not result.kvm else 'no (' + result.kvm + ')'}")
        print(f"faults injected: {[(i.at, i.fault, i.detail) for i in result.injected]}")
        print(f"figures: {report.figures}; seconds: {result.seconds}")
        print(f"refusals: {report.refusals}")
        for line in report.waits:
            print(f"waited: {line}")
        for line in report.known:
            print(line)
        for line in report.violations:
            print(f"VIOLATION {line}")
        if os.environ.get("FLOTILLA_CHAOS_STRICT") == "1":
            assert not report.known, "\n".join(report.known)
        assert not result.fault_failures, result.fault_failures
        assert {i.fault for i in result.injected} >= {
            "cut_connections",
            "kill_broker_node",
            "kill_compute_fake",
            "kill_api",
            "kill_scheduler",
        }, result.injected
        assert report.figures["accepted"] > 0, report.figures
        assert not report.violations, "\n".join(report.violations)
        keep = os.environ.get("FLOTILLA_CHAOS_KEEP") == "1"
    finally:
        if keep:
            print(f"logs kept under {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
