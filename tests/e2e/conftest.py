"""One all-in-one stack for the end-to-end tests: the API, the scheduler and two compute nodes
(two processes with different host names) on the session's broker, started as `flotilla up`
starts them (services.cli.stack) and ended by pid.

Skipped, with the reason, only where KVM cannot create a VM; without a broker the tests fail
(tests/conftest.py says how to get one).
"""

from __future__ import annotations

import os
import signal
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import native
from native.testguest import build
from services.broker import free_port
from services.cli.stack import ComputeSpec, Stack, StackConfig, TokenSpec
from tests.brokers import BrokerHandle
from tests.e2e.harness import E2E


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e" in str(item.fspath):
            item.add_marker(pytest.mark.kvm)
            item.add_marker(pytest.mark.integration)


def kill_guests(state_dir: Path) -> None:
    """VMMs a failed test left behind, by the pids they recorded."""
    for pid_file in state_dir.glob("compute/*/domains/*/vmm.pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ValueError, OSError):
            pass


# Package scope: the stack's scheduler and API consume shared queues (`scheduler`,
# `api.events`) on the session's broker, so it must be gone before tests/integration runs.
@pytest.fixture(scope="package")
def e2e(broker: BrokerHandle) -> Iterator[E2E]:
    reason = native.kvm_unavailable_reason()
    if reason is not None:
        print(f"\ntests/e2e skipped: KVM cannot create a VM here: {reason}")
        pytest.skip(f"KVM unavailable: {reason}")
    guest = build()
    suffix = uuid.uuid4().hex[:6]  # compute queues of an earlier run on a shared broker
    hosts = [f"e2e-a-{suffix}", f"e2e-b-{suffix}"]
    tokens = {
        "alice": "alice-" + uuid.uuid4().hex,
        "bob": "bob-" + uuid.uuid4().hex,
        "capped": "capped-" + uuid.uuid4().hex,
    }
    with tempfile.TemporaryDirectory(prefix="flotilla-e2e-") as tmp:
        state_dir = Path(tmp)
        config = StackConfig(
            state_dir=state_dir,
            amqp_url=broker.url,
            listen_port=free_port(),
            computes=[ComputeSpec(h) for h in hosts],
            tokens=[TokenSpec(t, p) for p, t in tokens.items()],
            quotas={"capped": {"domains": 1, "vcpus": 4, "memory_mib": 256}},
            # Deterministic placement: the best-weighed host, never a random one of the top.
            scheduler_settings={"FLOTILLA_SCHEDULER_TOP_N": "1"},
        )
        stack = Stack(config)
        try:
            stack.start(timeout=90)
            env = E2E(stack, guest, {**tokens, "admin": stack.admin_token}, hosts)
            yield env
            env.close()
        finally:
            stack.stop()
            kill_guests(state_dir)
