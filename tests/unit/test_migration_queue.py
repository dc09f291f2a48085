"""The limit on concurrent outgoing migrations (compute_node/migration_queue.py): the queue
itself, and a source node's jobs over the limit waiting `queued` (two lifecycles on fake
drivers in one process, as tests/unit/test_compute_migration.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from compute_node.lifecycle import Lifecycle
from compute_node.migration_queue import MigrationQueue
from compute_node.store import Store
from protos.codec import decode, parse_body
from protos.commands import GetDomainInfo
from protos.events import DomainMigrationProgress
from protos.migration import (
    AbortMigration,
    GetMigrationJob,
    MigrationJob,
    MigrationParams,
    MigrationPhase,
    PrepareIncoming,
)
from protos.replies import DomainInfo
from tests.unit.test_compute_migration import (
    CTX,
    Host,
    eventually,
    hosts,
    running,
    spec,
    start,
    wait_job,
)

__all__ = ["hosts"]  # the fixture, shared


def ids(n: int) -> list[uuid.UUID]:
    return [uuid.uuid4() for _ in range(n)]


def test_the_queue_runs_at_most_the_limit_first_come_first_served() -> None:
    queue: MigrationQueue[str] = MigrationQueue(2)
    a, b, c, d = ids(4)
    assert queue.admit(a, "a")
    assert queue.admit(b, "b")
    assert not queue.admit(c, "c")
    assert not queue.admit(d, "d")
    assert (queue.position(c), queue.position(d), queue.position(a)) == (1, 2, None)
    with pytest.raises(ValueError, match="already"):
        queue.admit(c, "c again")
    assert queue.release(a) == [(c, "c")]  # the freed slot goes to the first in line
    assert queue.position(d) == 1
    assert queue.running() == 2
    assert queue.release(uuid.uuid4()) == []  # one that held no slot frees none
    assert queue.withdraw(d) == "d"  # cancelled while queued
    assert queue.withdraw(d) is None
    assert queue.release(b) == []
    assert queue.release(c) == []
    assert queue.running() == 0


def test_a_newcomer_waits_behind_the_queue_even_when_a_slot_is_free() -> None:
    queue: MigrationQueue[str] = MigrationQueue(1)
    a, b, c = ids(3)
    assert queue.admit(a, "a")
    assert not queue.admit(b, "b")
    # The slot is handed over by release(), which returns b to start: c never jumps ahead.
    assert queue.release(a) == [(b, "b")]
    assert not queue.admit(c, "c")
    assert queue.waiting() == [c]


def test_no_limit_and_a_bad_limit() -> None:
    queue: MigrationQueue[int] = MigrationQueue(0)
    assert all(queue.admit(d, 0) for d in ids(50))
    assert queue.running() == 50
    with pytest.raises(ValueError, match="0"):
        MigrationQueue(-1)


SLOW = MigrationParams(bandwidth_mibps=64)  # the fake's 64 MiB in two rounds: about 2 s


def test_a_second_migration_waits_queued_holding_nothing_on_the_target(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    first, second = spec("web-1"), spec("web-2")
    running(a, first)
    running(a, second)
    start(a, first, SLOW)
    queued = start(a, second, MigrationParams())
    assert (queued.phase, queued.queue_position) == (MigrationPhase.QUEUED, 1)
    # Nothing asked of the target for it yet: no PrepareIncoming, no claim there.
    prepared = [c.spec.uuid for c in a.sent if isinstance(c, PrepareIncoming)]
    assert prepared == [first.uuid]
    assert not b.claims.holds(second.uuid)
    assert wait_job(a, first.uuid).phase is MigrationPhase.DONE
    done = wait_job(a, second.uuid)
    assert done.phase is MigrationPhase.DONE, done
    assert done.queue_position is None
    # It ran once the first had ended; its figures count from then.
    assert done.started_at >= wait_job(a, first.uuid).started_at
    phases = [e[1] for e in a.events() if e[0] == "domain.migration_progress"]
    assert "queued" in phases
    assert "preparing" in phases
    assert b.store.get(second.uuid) is not None


def test_abort_of_a_queued_job_cancels_it_at_once_with_the_domain_untouched(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    first, second = spec("web-1"), spec("web-2")
    running(a, first)
    running(a, second)
    start(a, first, SLOW)
    start(a, second, MigrationParams())
    aborted = a.do(AbortMigration(domain_id=second.uuid))
    assert isinstance(aborted, MigrationJob)
    assert aborted.phase is MigrationPhase.CANCELLED
    assert aborted.error is not None
    assert "queued" in aborted.error
    info = a.do(GetDomainInfo(domain_id=second.uuid))
    assert isinstance(info, DomainInfo)
    assert info.state.value == "running"
    final = [e for e in a.events() if e[0] == "domain.migration_progress" and e[1] == "cancelled"]
    assert len(final) == 1
    assert wait_job(a, first.uuid).phase is MigrationPhase.DONE
    # The cancelled one never runs, even once the slot is free.
    assert not any(isinstance(c, PrepareIncoming) and c.spec.uuid == second.uuid for c in a.sent)
    assert a.store.get(second.uuid) is not None
    assert b.store.get(second.uuid) is None


def test_a_restart_ends_queued_jobs_cancelled_saying_why(
    tmp_path: Path, hosts: tuple[Host, Host]
) -> None:
    a, _b = hosts
    first, second = spec("web-1"), spec("web-2")
    running(a, first)
    running(a, second)
    start(a, first, MigrationParams(bandwidth_mibps=16))
    start(a, second, MigrationParams())
    a.events()
    # The node restarts (a new lifecycle on the same store) while the second waits.
    store = Store(tmp_path / "node-a" / "compute.db", host="node-a", source="compute:node-a")
    try:
        restarted = Lifecycle("node-a", store, a.driver, a.claims, a.service.sources)
        restarted.end_queued_jobs()
        job = restarted.migration_job(GetMigrationJob(domain_id=second.uuid), CTX)
        assert job.phase is MigrationPhase.CANCELLED
        assert job.error is not None
        assert "restarted" in job.error
        assert store.queued_jobs() == []
        restarted.end_queued_jobs()  # ended once only
        finals = [
            e
            for e in (parse_body(decode(i.body)) for i in store.outbox())
            if isinstance(e, DomainMigrationProgress) and e.domain_id == second.uuid
        ]
        assert [(e.phase, e.error) for e in finals] == [("cancelled", job.error)]
    finally:
        a.do(AbortMigration(domain_id=second.uuid))  # the old service's job, still queued
        a.do(AbortMigration(domain_id=first.uuid))
        eventually(lambda: a.service.jobs.running(first.uuid) is None)
        store.close()
