"""The chaos suite: guests cycle (create, destroy, start, delete) from several client threads
through two API replicas while broker connections are cut, a broker node, the compute
worker, VMMs, an API replica and a scheduler replica are killed (-9) and restarted. Then
the invariants hold (tests/chaos/checks.py), or the test fails with the evidence.

FLOTILLA_CHAOS_SECONDS sets the length of the faulted run (default 75); the rig's start (a
three-node broker cluster, PostgreSQL, the services) comes on top. `bench/soak.py` runs the
same longer and prints figures.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from services.broker import available
from tests.chaos.run import run

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.chaos]

SECONDS = float(os.environ.get("FLOTILLA_CHAOS_SECONDS", "75"))


@pytest.mark.timeout(int(SECONDS) + 900)
def test_guests_cycle_through_faults_and_every_invariant_holds() -> None:
    if not available():
        pytest.fail("rabbitmq-server is not installed: `apt-get install -y rabbitmq-server`")
    base = Path(tempfile.mkdtemp(prefix="flotilla-chaos-"))
    keep = True  # the logs, unless the run passes
    try:
        result = run(base, SECONDS)
        report = result.report
        print(f"\nkvm node: {'yes' if not result.kvm else 'no (' + result.kvm + ')'}")
        print(f"faults injected: {[(i.at, i.fault, i.detail) for i in result.injected]}")
        print(f"figures: {report.figures}; seconds: {result.seconds}")
        print(f"refusals: {report.refusals}")
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
        keep = False
    finally:
        if keep:
            print(f"logs kept under {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
