"""The compute worker killed (-9) in the middle of a start the scheduler asked for, and back
only after the scheduler's compute timeout: the placement must still complete what was asked,
define and start, each once (seq 1, 2, no gap, no duplicate), on that host.

Found by the chaos suite: a create on a KVM host whose worker was being restarted (a restart
takes seconds on a loaded machine) ended defined but shut off. The scheduler gave up on the
silent host after `compute_timeout_s` and sent it a clean-up (destroy, undefine) under new
message ids; the restarted worker then ran the redelivered start and the clean-up side by
side, in any order, while the caller got `no_valid_host`.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from protos import routing
from protos.commands import GetDomainInfo
from protos.domain import DomainSpec, PowerState
from protos.replies import DomainInfo
from protos.scheduler import Placement, ScheduleDomain
from services.bus import Bus
from services.scheduler import Scheduler, SchedulerConfig
from tests.bootfiles import KERNEL
from tests.integration.compute_harness import ComputeProcess, EventLog

# Two worker starts and a wait past the scheduler's timeout: ~25-40 s on a loaded machine.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

COMPUTE_TIMEOUT_S = 3.0


def test_a_start_cut_off_by_a_worker_restart_completes_once_the_worker_is_back(
    amqp_url: str, make_bus: Callable[..., Bus], tmp_path: Path
) -> None:
    host = f"restart-{uuid.uuid4().hex[:6]}"
    state = tmp_path / host
    state.mkdir()
    bus = make_bus()
    events = EventLog(bus)
    node = ComputeProcess(amqp_url, state, host, module="tests.integration.held_compute")
    node.start(bus)
    config = SchedulerConfig(
        amqp_url=amqp_url, replica="restart", compute_timeout_s=COMPUTE_TIMEOUT_S
    )
    scheduler = Scheduler(config).start()
    try:
        scheduler.wait_for_hosts(1)
        name = f"restart-{uuid.uuid4().hex[:6]}"
        spec = DomainSpec.model_validate(
            {"name": name, "memory_mib": 32, "boot": {"kernel": KERNEL}}
        )
        (state / "hold").touch()
        replies: list[object] = []

        def schedule() -> None:
            command = ScheduleDomain(spec=spec, project="p", privileged=True)
            try:
                replies.append(bus.call(routing.SCHEDULER_QUEUE, command, timeout=90))
            except Exception as exc:
                replies.append(exc)

        caller = threading.Thread(target=schedule)
        caller.start()
        deadline = time.monotonic() + 30
        while not (state / "spawning").exists():  # defined, and the start under way
            assert time.monotonic() < deadline, "the host was never asked to start it"
            time.sleep(0.02)
        node.kill()
        (state / "hold").unlink()
        # Back only after the scheduler's wait for the start ran out.
        time.sleep(COMPUTE_TIMEOUT_S + 1.0)
        node.start(bus)
        caller.join(90)

        (reply,) = replies
        assert isinstance(reply, Placement), reply
        assert (reply.host, reply.info.state) == (host, PowerState.RUNNING)
        time.sleep(2.0)  # a late clean-up would show here
        seen = [(e.TYPE, e.seq) for e in events.of(spec.uuid)]
        assert seen == [("domain.defined", 1), ("domain.started", 2)], seen
        # Nothing ran twice. A copy of an event already seen (its message id) may come: the
        # worker was killed before its outbox dropped the published row, and sends it again
        # at its restart (at least once; subscribers deduplicate by id, docs/events.md).
        copies = [(events.by_id[i].TYPE, events.by_id[i].seq) for i in events.duplicates]
        assert set(copies) <= {("domain.defined", 1)}, copies
        info = bus.call(node.queue, GetDomainInfo(domain_id=spec.uuid), timeout=10)
        assert isinstance(info, DomainInfo)
        assert info.state is PowerState.RUNNING
    finally:
        with contextlib.suppress(FileNotFoundError):
            (state / "hold").unlink()
        scheduler.stop()
        node.stop()
