"""The source node's memory of migration jobs (compute_node.migration_jobs), the last ended
one of each domain kept in the node's store across restarts."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from compute_node.migration_jobs import KEPT_JOBS, Job, Jobs
from compute_node.store import Store
from protos.migration import MigrationParams, MigrationPhase


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "compute.db", host="node-a", source="compute:node-a")
    yield opened
    opened.close()


def job() -> Job:
    return Job(uuid.uuid4(), "web", "node-a", "node-b", MigrationParams())


def test_a_running_job_is_never_dropped_to_make_room(store: Store) -> None:
    """An evacuation starts a job per domain of the host: more than KEPT_JOBS of them must
    not drop the first ones while they still run (their domains would lose the `migrating`
    task: a second job, a pause or a shutdown would be let through under the stream)."""
    jobs = Jobs(store)
    first = job()
    jobs.add(first)
    ended = []
    for _ in range(KEPT_JOBS + 10):
        later = job()
        jobs.add(later)
        later.end(MigrationPhase.DONE)
        ended.append(later)
    assert jobs.running(first.domain_id) is first
    # Ended ones still go, oldest first: the memory stays bounded.
    assert jobs.get(ended[0].domain_id) is None
    assert jobs.get(ended[-1].domain_id) is ended[-1]
    assert len(jobs._jobs) == KEPT_JOBS


def test_running_jobs_all_stay_beyond_the_bound(store: Store) -> None:
    jobs = Jobs(store)
    running = [job() for _ in range(KEPT_JOBS + 3)]
    for j in running:
        jobs.add(j)
    assert all(jobs.running(j.domain_id) is j for j in running)
    running[0].end(MigrationPhase.FAILED)
    jobs.add(job())  # the next one makes room from what ended
    assert jobs.get(running[0].domain_id) is None


def test_the_last_ended_job_outlives_a_restart(tmp_path: Path) -> None:
    """domjobinfo after the source node restarted: its domain's last ended job is answered
    from the store; a job that ran when the node stopped is none (the target then forgets the
    domain, docs/migration.md), nor is the one before it."""
    path = tmp_path / "compute.db"
    store = Store(path, host="node-a", source="compute:node-a")
    jobs = Jobs(store)
    done, failed, cut = job(), job(), job()
    for j, phase in ((done, MigrationPhase.DONE), (failed, MigrationPhase.FAILED)):
        jobs.add(j)
        j.downtime_ms = 4.5
        j.end(phase, "refused" if phase is MigrationPhase.FAILED else None, keep=jobs.keep)
    jobs.add(cut)
    cut.end(MigrationPhase.CANCELLED, keep=jobs.keep)
    again = Job(cut.domain_id, "web", "node-a", "node-c", MigrationParams())
    jobs.add(again)  # running as the node stops
    store.close()

    store = Store(path, host="node-a", source="compute:node-a")
    jobs = Jobs(store)
    kept = jobs.last(done.domain_id)
    assert kept is not None
    assert kept == done.snapshot()
    assert (kept.phase, kept.target, kept.downtime_ms) == (MigrationPhase.DONE, "node-b", 4.5)
    assert jobs.last(failed.domain_id) == failed.snapshot()
    assert jobs.last(cut.domain_id) is None
    assert jobs.running(done.domain_id) is None  # no `migrating` task from a kept job
    # A job that never started gives the domain its last one back.
    retry = job()
    retry.domain_id = done.domain_id
    previous = jobs.add(retry)
    now = jobs.last(done.domain_id)
    assert now is not None
    assert (now.phase, now.started_at) == (MigrationPhase.PREPARING, retry.started_at)
    jobs.restore(retry, previous)
    assert jobs.last(done.domain_id) == done.snapshot()
    store.close()


def test_the_store_keeps_a_bounded_number_of_jobs(store: Store) -> None:
    jobs = Jobs(store)
    ended = [job() for _ in range(KEPT_JOBS + 2)]
    for j in ended:
        jobs.add(j)
        j.end(MigrationPhase.DONE, keep=jobs.keep)
    assert store.kept_job(ended[0].domain_id) is None
    assert store.kept_job(ended[-1].domain_id) == ended[-1].snapshot()
