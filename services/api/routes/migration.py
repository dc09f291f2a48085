"""Migration (docs/migration.md, "The control plane"): `POST /v1/domains/{id}/migrate`, the job
(`GET`, `PATCH`, `DELETE /v1/domains/{id}/job`: domjobinfo, migrate-setmaxdowntime and
migrate-setspeed, domjobabort) and `POST /v1/hosts/{name}/evacuate`.

A migration is the scheduler's to start (it picks and claims the target, the source runs the
job); the API checks the transition table first (409), sets the task `migrating` for the
request that wins it, and puts it back when the scheduler refuses. The events end the task
(services.api.registry): the target's arrival, the final progress, the source resuming.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated

import structlog
from fastapi import APIRouter, Body

from protos import routing
from protos.domain import ACTIVE_STATES, TaskState
from protos.events import DomainMigrationProgress
from protos.migration import (
    FINAL_PHASES,
    AbortMigration,
    GetMigrationJob,
    MigrateDomain,
    MigrationJob,
    MigrationPhase,
    SetMigrationParams,
)
from protos.states import Action, Verdict, decide
from services.api.context import ApiContext
from services.api.migration_models import (
    EvacuatedDomain,
    Evacuation,
    JobUpdate,
    JobView,
    MigrateRequest,
)
from services.api.problems import Problem, not_found, responses
from services.api.registry.domains import DomainRecord
from services.api.routes.deps import Admin, Caller, Ctx, Mask
from services.api.routes.disks import local_pools
from services.api.visibility import HostMask

log = structlog.get_logger("flotilla.api")
router = APIRouter(tags=["migration"])


def _conflict(record: DomainRecord, reason: str, action: str = "migrate") -> Problem:
    return Problem(
        409, "conflict", reason, state=record.power.value, task=record.task.value, action=action
    )


def start_migration(ctx: ApiContext, record: DomainRecord, body: MigrateRequest) -> MigrationJob:
    """Check, mark `migrating` and ask the scheduler; the job the source started. A refusal
    leaves the domain as it was (task back to none) and is raised as a Problem."""
    decision = decide(record.power, record.task, Action.MIGRATE)
    if decision.verdict is Verdict.REFUSE:
        raise _conflict(record, decision.reason)
    if record.host is None:
        raise _conflict(record, "domain has no host yet")
    active = record.power in ACTIVE_STATES
    live = active if body.live is None else body.live
    if live and not active:
        raise _conflict(record, "domain is not running: migrate it offline (live false)")
    if not live and active:
        raise _conflict(record, "domain is active: migrate it live, or shut it down first")
    pools = local_pools(ctx, record.id, record.spec)
    if not ctx.registry.domains.swap_task(record.id, TaskState.NONE, TaskState.MIGRATING):
        raise _conflict(record, "another task started meanwhile")
    command = MigrateDomain(
        domain_id=record.id,
        source=record.host,
        target=body.host,
        project=record.project,
        params=body.params(live),
        spec=record.spec,
        pools=pools,
    )
    try:
        job = ctx.call(routing.SCHEDULER_QUEUE, command, ctx.config.schedule_timeout_s)
    except Problem:
        # Nothing started (or, after a timeout, nothing we can know of: the events will
        # move the domain if it did).
        ctx.registry.domains.swap_task(record.id, TaskState.MIGRATING, TaskState.NONE)
        raise
    assert isinstance(job, MigrationJob)
    log.info("migration started", domain_id=str(record.id), target=job.target, live=live)
    return job


@router.post(
    "/v1/domains/{domain_id}/migrate",
    status_code=202,
    response_model=JobView,
    responses=responses(401, 403, 404, 409, 422, 501, 503, 504),
)
def migrate_domain(
    domain_id: uuid.UUID,
    ctx: Ctx,
    caller: Caller,
    mask: Mask,
    body: Annotated[MigrateRequest | None, Body()] = None,
) -> JobView:
    """Migrate the domain to another host (virsh migrate): live while it runs or is paused,
    offline when it is shut off. 202 with the job once the source has it under way; the
    domain's task is `migrating` until the migration's events end it (its `host` changes
    when the target takes over). 409 from the transition table (with `state` and `task`);
    403 for `host` from a member (host names are admin-only); 503 `no_valid_host` (with
    `filtered`, `attempts`) when no host other than its own can take it."""
    request = body or MigrateRequest()
    if request.host is not None and not caller.is_admin:
        raise Problem(403, "forbidden", "host: only an admin may choose the target host")
    record = ctx.visible_domain(caller, domain_id)
    return JobView.of(start_migration(ctx, record, request), mask)


def _job(ctx: ApiContext, host: str | None, domain_id: uuid.UUID) -> MigrationJob | None:
    """The job `host` holds for the domain (running, or the last one it ran), if any."""
    if host is None:
        return None
    try:
        job = ctx.call_host(host, GetMigrationJob(domain_id=domain_id))
    except Problem as problem:
        if problem.code == "not_found":
            return None
        raise
    assert isinstance(job, MigrationJob)
    return job


@router.get(
    "/v1/domains/{domain_id}/job",
    response_model=JobView,
    responses=responses(401, 404, 503, 504),
)
def get_job(domain_id: uuid.UUID, ctx: Ctx, caller: Caller, mask: Mask) -> JobView:
    """The domain's migration job (virsh domjobinfo): the running one, from its source;
    when none runs, the last one that ended (with the measured `downtime_ms` when it was
    done). 404 when the domain never migrated. A domain still `migrating` whose host runs
    no job (and whose migrate request is over) gets its task back to none here."""
    record = ctx.visible_domain(caller, domain_id)
    job = _job(ctx, record.host, domain_id)
    if job is not None and job.phase not in FINAL_PHASES:
        return JobView.of(job, mask)
    _settle_task(ctx, record)
    # The newest job known wins: the host's last one, the last final progress logged, and,
    # when the host's last job took the domain away from it, the job of the host it came
    # back from (the domain migrated back since, and that job's end may not be logged yet;
    # or the registry has not seen the move away yet: then the host's own job is newest).
    # A host with no job at all may be the target of one that just ended: the registry has
    # the domain there already while the job's final progress is not logged yet, so the job
    # is the source's, the host it came from.
    found: list[tuple[float, JobView]] = []
    if job is not None:
        found.append((job.started_at, JobView.of(job, mask)))
    if record.host is not None and (
        job is None or (job.phase is MigrationPhase.DONE and job.target != record.host)
    ):
        came_from = ctx.registry.events.last_host_besides(domain_id, record.host)
        other = _job(ctx, came_from, domain_id)
        if other is not None and other.phase not in FINAL_PHASES:
            return JobView.of(other, mask)
        if other is not None:
            found.append((other.started_at, JobView.of(other, mask)))
    logged = ctx.registry.events.last_migration(domain_id)
    if logged is not None:
        event = DomainMigrationProgress.model_validate(logged.body)
        view = JobView.of_event(event, logged.ts, mask)
        found.append((view.started_at, view))
    if not found:
        raise not_found(f"a migration job of domain {domain_id}")
    return max(found, key=lambda f: f[0])[1]


def _settle_task(ctx: ApiContext, record: DomainRecord) -> None:
    """The domain's host runs no migration job: a `migrating` task whose ending events will
    never come (its source restarted mid-job and forgot it) ends here. Only once the task is
    older than a migrate request can wait, so a request still waiting for its job is left
    alone."""
    if record.task is not TaskState.MIGRATING:
        return
    if time.time() - record.updated_at <= ctx.config.schedule_timeout_s:
        return
    if ctx.registry.domains.swap_task(record.id, TaskState.MIGRATING, TaskState.NONE):
        log.warning("migrating task ended: no job runs on the host", domain_id=str(record.id))


def _running_job_host(record: DomainRecord, action: str) -> str:
    if record.task is not TaskState.MIGRATING or record.host is None:
        raise _conflict(record, "no migration is under way", action)
    return record.host


@router.patch(
    "/v1/domains/{domain_id}/job",
    response_model=JobView,
    responses=responses(401, 404, 409, 422, 503, 504),
)
def update_job(
    domain_id: uuid.UUID, body: JobUpdate, ctx: Ctx, caller: Caller, mask: Mask
) -> JobView:
    """Change the running migration's downtime budget or bandwidth cap (virsh
    migrate-setmaxdowntime, migrate-setspeed); the pre-copy uses them from its next round.
    409 when no migration is under way."""
    record = ctx.visible_domain(caller, domain_id)
    host = _running_job_host(record, "migration_set")
    command = SetMigrationParams(
        domain_id=domain_id,
        max_downtime_ms=body.max_downtime_ms,
        bandwidth_mibps=body.bandwidth_mibps,
    )
    job = ctx.call_host(host, command)
    assert isinstance(job, MigrationJob)
    return JobView.of(job, mask)


@router.delete(
    "/v1/domains/{domain_id}/job",
    response_model=JobView,
    responses=responses(401, 404, 409, 503, 504),
)
def abort_job(domain_id: uuid.UUID, ctx: Ctx, caller: Caller, mask: Mask) -> JobView:
    """Cancel the running migration before its commit (virsh domjobabort): the domain runs
    on where it was (phase `cancelled`). 409 when none is under way, or (reason
    `committed`) when the target has taken over already."""
    record = ctx.visible_domain(caller, domain_id)
    host = _running_job_host(record, "migration_abort")
    job = ctx.call_host(host, AbortMigration(domain_id=domain_id))
    assert isinstance(job, MigrationJob)
    return JobView.of(job, mask)


@router.post(
    "/v1/hosts/{host}/evacuate",
    status_code=202,
    response_model=Evacuation,
    responses=responses(401, 403, 404, 409),
)
def evacuate_host(host: str, ctx: Ctx, _admin: Admin) -> Evacuation:
    """Migrate every domain off the disabled host `host`: live for running and paused ones,
    offline for shut-off ones, each to where the scheduler picks. Answers per domain what
    was started, or why not (the same refusals as `migrate`); call it again for those
    that could not go. 409 while the host is enabled (disable it first, so nothing new
    lands on it)."""
    found = ctx.registry.hosts.records(host)
    if not found:
        raise not_found(f"host {host}")
    if found[0].enabled:
        raise Problem(409, "conflict", f"host {host} is enabled: disable it first", host=host)
    admin_mask = HostMask(None, ctx.registry.hosts.names)
    outcomes = [_evacuate(ctx, admin_mask, r) for r in ctx.registry.domains.matching(host=host)]
    started = sum(1 for o in outcomes if o.job is not None)
    return Evacuation(host=host, started=started, refused=len(outcomes) - started, domains=outcomes)


def _evacuate(ctx: ApiContext, mask: HostMask, record: DomainRecord) -> EvacuatedDomain:
    live = record.power in ACTIVE_STATES  # a crashed one is refused by the table
    outcome = EvacuatedDomain(
        domain_id=record.id, name=record.name, state=record.power.value, live=live
    )
    try:
        job = start_migration(ctx, record, MigrateRequest(live=live))
    except Problem as problem:
        outcome.code, outcome.detail = problem.code, problem.detail
        return outcome
    outcome.job = JobView.of(job, mask)
    return outcome
