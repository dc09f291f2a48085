"""The source node's memory of migration jobs (compute_node.migration_jobs)."""

from __future__ import annotations

import uuid

from compute_node.migration_jobs import KEPT_JOBS, Job, Jobs
from protos.migration import MigrationParams, MigrationPhase


def job() -> Job:
    return Job(uuid.uuid4(), "web", "node-a", "node-b", MigrationParams())


def test_a_running_job_is_never_dropped_to_make_room() -> None:
    """An evacuation starts a job per domain of the host: more than KEPT_JOBS of them must
    not drop the first ones while they still run (their domains would lose the `migrating`
    task: a second job, a pause or a shutdown would be let through under the stream)."""
    jobs = Jobs()
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


def test_running_jobs_all_stay_beyond_the_bound() -> None:
    jobs = Jobs()
    running = [job() for _ in range(KEPT_JOBS + 3)]
    for j in running:
        jobs.add(j)
    assert all(jobs.running(j.domain_id) is j for j in running)
    running[0].end(MigrationPhase.FAILED)
    jobs.add(job())  # the next one makes room from what ended
    assert jobs.get(running[0].domain_id) is None
