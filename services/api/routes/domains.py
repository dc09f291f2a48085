"""/v1/domains: create (schedule), list, get, delete, actions, console."""

from __future__ import annotations

import uuid
from typing import Annotated

import structlog
from fastapi import APIRouter, Query, Response

from protos import routing
from protos.commands import (
    Command,
    DestroyDomain,
    GetConsole,
    PauseDomain,
    RebootDomain,
    RebootMode,
    ResumeDomain,
    ShutdownDomain,
    StartDomain,
    UndefineDomain,
)
from protos.domain import (
    ACTIVE_STATES,
    DomainSpec,
    Fault,
    PowerState,
    TaskState,
    spec_problems,
)
from protos.replies import ConsoleOutput, DomainInfo
from protos.scheduler import Attempt, Placement, ScheduleDomain
from protos.states import Action, Verdict, decide
from services.api import boot_images, reaping
from services.api.context import ApiContext
from services.api.models import (
    ActionName,
    ActionRequest,
    ConsoleLog,
    DomainCreate,
    DomainList,
    DomainView,
)
from services.api.problems import Problem, responses
from services.api.registry.domains import DomainRecord, NameInUse, QuotaExceeded
from services.api.routes import disks, snapshots
from services.api.routes.deps import Caller, Ctx, Mask
from services.api.routes.networks import domain_interfaces

log = structlog.get_logger("flotilla.api")
router = APIRouter(prefix="/v1/domains", tags=["domains"])


@router.post(
    "",
    status_code=201,
    response_model=DomainView,
    responses=responses(401, 403, 409, 422, 503, 504),
)
def create_domain(
    body: DomainCreate, ctx: Ctx, caller: Caller, mask: Mask, response: Response
) -> DomainView:
    """Define a domain on a host the scheduler picks, and start it unless `start` is false.

    422 for a spec no host could run (relative path, NUL byte, a `boot.image` or
    `boot.initrd_image` that is no kernel or initrd image the project may use) and for what
    only the host finds (a file that is no kernel image), 403 `forbidden` for a host path a
    member may not use or for `placement.host` from a member (host names are admin-only), 403
    over quota, 409 if a domain of that name exists (names are unique across projects), 503
    `no_valid_host` (with `fault`, `attempts`, `filtered`) when no host fits, 503 when the
    broker is unreachable. Only a create whose outcome is unknown (504 timeout, broker lost)
    leaves a record (task `error`); every other refusal leaves nothing."""
    if body.placement.host is not None and not caller.is_admin:
        raise Problem(403, "forbidden", "placement.host: only an admin may choose the host")
    spec = DomainSpec.model_validate(body.model_dump(exclude={"start"}))
    _check_spec(spec)
    quota = ctx.registry.access.get_quota(caller.project) or ctx.config.quota_for(caller.project)
    try:
        record = ctx.registry.domains.create(spec, caller.project, quota)
    except QuotaExceeded as exc:
        raise Problem(
            403,
            "over_quota",
            str(exc),
            resource=exc.resource,
            limit=exc.limit,
            used=exc.used,
            requested=exc.requested,
        ) from None
    except NameInUse as exc:
        raise Problem(409, "name_in_use", str(exc), name=spec.name) from None
    project = None if caller.is_admin else caller.project
    try:
        boot = boot_images.boot_images(ctx, caller.project, spec)
        bindings = disks.attach_disks(ctx, project, record.id, spec, owner=caller.project)
    except Problem:
        ctx.registry.domains.remove(record.id)
        raise
    command = ScheduleDomain(
        spec=spec,
        project=caller.project,
        # From the token, never from the body: admins' host paths are not held to the
        # compute nodes' allowed_boot_dirs.
        privileged=caller.is_admin,
        start=body.start,
        max_attempts=ctx.config.schedule_max_attempts,
        disks=bindings,
        kernel_image=boot.kernel,
        initrd_image=boot.initrd,
    )
    try:
        placement = ctx.call(routing.SCHEDULER_QUEUE, command, ctx.config.schedule_timeout_s)
    except Problem as problem:
        _schedule_failed(ctx, record, problem)
        if problem.code not in _OUTCOME_UNKNOWN:
            disks.release_disks(ctx, record.id, spec)
        raise
    assert isinstance(placement, Placement)
    placed = ctx.registry.domains.set_placement(record.id, placement.host, placement.info)
    if placed is None or placed.task is TaskState.DELETING:
        # Deleted while the scheduler worked: do not leave the guest behind on its host.
        if placed is None:
            _remove_from_host(ctx, placement.host, record.id)
            disks.release_disks(ctx, record.id, spec)
        else:
            reaping.reap(ctx, record.id, placement.host)
        raise Problem(409, "deleted", f"domain {record.id} was deleted while being scheduled")
    response.headers["Location"] = f"/v1/domains/{record.id}"
    return DomainView.of(placed, mask, placement.attempts)


def _check_spec(spec: DomainSpec) -> None:
    """422 for what no host could run, before anything is stored."""
    problems = spec_problems(spec)
    if problems:
        field, reason = problems[0]
        raise Problem(
            422,
            "invalid",
            f"{field}: {reason}",
            title="Invalid request",
            field=field,
            errors=[{"field": f, "in": "body", "message": m} for f, m in problems],
        )


# Failures after which the scheduler may still have placed the domain: its record stays.
_OUTCOME_UNKNOWN = frozenset({"timeout", "broker_unavailable"})


def _schedule_failed(ctx: ApiContext, record: DomainRecord, problem: Problem) -> None:
    """Say in the reply which domain failed and why (`fault`). A definite refusal removes
    the record (nothing was placed, nothing counts against the quota); when the outcome is
    unknown the record stays in task `error` with the fault, for a later event to place."""
    code = "schedule_timeout" if problem.code == "timeout" else problem.code
    fault = Fault(code=code, message=problem.detail)
    if problem.code in _OUTCOME_UNKNOWN:
        # Unless deleted meanwhile: the tombstone stays for wherever the domain appears.
        ctx.registry.domains.set_task(record.id, TaskState.ERROR, fault, unless=TaskState.DELETING)
    else:
        ctx.registry.domains.remove(record.id)
    problem.extras.setdefault("domain_id", str(record.id))
    problem.extras["fault"] = fault.model_dump(mode="json")
    attempts = problem.extras.get("attempts")
    if attempts is not None:
        problem.extras["attempts"] = [Attempt.model_validate(a).model_dump() for a in attempts]


def _remove_from_host(ctx: ApiContext, host: str, domain_id: uuid.UUID) -> None:
    for command in (DestroyDomain(domain_id=domain_id), UndefineDomain(domain_id=domain_id)):
        try:
            ctx.call_host(host, command)
        except Problem as problem:
            log.warning("cleanup on host failed", host=host, error=problem.detail)


@router.get("", response_model=DomainList, responses=responses(401, 422))
def list_domains(
    *,
    ctx: Ctx,
    caller: Caller,
    mask: Mask,
    state: Annotated[PowerState | None, Query(description="power state")] = None,
    task: TaskState | None = None,
    host: Annotated[
        str | None, Query(description="a host name (admin) or a domain's `host` alias (member)")
    ] = None,
    name: str | None = None,
    project: Annotated[str | None, Query(description="admin only; members see theirs")] = None,
) -> DomainList:
    """The caller's domains (an admin's: every project's, or `project`'s)."""
    if not caller.is_admin:
        project = caller.project
    records = ctx.registry.domains.matching(
        project=project, power=state, task=task, host=host if caller.is_admin else None, name=name
    )
    if host is not None and not caller.is_admin:
        records = [r for r in records if mask.matches(r.host, host)]
    return DomainList(domains=[DomainView.of(r, mask) for r in records])


@router.get("/{domain_id}", response_model=DomainView, responses=responses(401, 404, 422))
def get_domain(domain_id: uuid.UUID, ctx: Ctx, caller: Caller, mask: Mask) -> DomainView:
    """The domain; with NICs, `interfaces` from their ports (MAC, address, network)."""
    record = ctx.visible_domain(caller, domain_id)
    view = DomainView.of(record, mask)
    if record.spec.nics:
        view.interfaces = domain_interfaces(ctx, domain_id)
    return view


def _refuse(record: DomainRecord, action: str, reason: str) -> Problem:
    return Problem(
        409,
        "conflict",
        reason,
        state=record.power.value,
        task=record.task.value,
        action=action,
    )


def _check(record: DomainRecord, action: Action) -> Verdict:
    decision = decide(record.power, record.task, action)
    if decision.verdict is Verdict.REFUSE:
        raise _refuse(record, action.value, decision.reason)
    return decision.verdict


@router.delete(
    "/{domain_id}",
    status_code=202,
    response_model=DomainView,
    responses={204: {"description": "removed at once"}, **responses(401, 404, 409, 503, 504)},
)
def delete_domain(
    domain_id: uuid.UUID, ctx: Ctx, caller: Caller, mask: Mask
) -> Response | DomainView:
    """Destroy the domain if active and undefine it on its host: 202 with task `deleting`;
    the record goes when the host's `domain.undefined` arrives. Calling it again while
    `deleting` retries. A domain not placed yet (its create still with the scheduler, or
    its outcome unknown) is deleted wherever it appears: 202 with task `deleting` and no
    host; the record goes once its host undefined it, or when it never reaches one."""
    record = ctx.visible_domain(caller, domain_id)
    if record.host is None:
        current = ctx.registry.domains.tombstone(domain_id)
        if current is None:
            return Response(status_code=204)  # removed meanwhile (its create was refused)
        if current.host is None:
            return DomainView.of(current, mask)
        record = current  # placed meanwhile: delete it on its host
    if record.task is not TaskState.DELETING:
        if record.power in ACTIVE_STATES:
            _check(record, Action.DESTROY)
        _check_gate(record, Action.UNDEFINE)
    host = record.host
    assert host is not None
    ctx.registry.domains.set_task(domain_id, TaskState.DELETING)
    snapshots.drop_states(ctx, domain_id)
    try:
        reaping.destroy_and_undefine(ctx, host, domain_id, record.power in ACTIVE_STATES)
    except Problem as problem:
        if problem.code != "not_found":
            raise  # the record stays `deleting`: DELETE again to retry (or the sweep does)
        ctx.registry.domains.remove(domain_id)  # already gone from the host
        reaping.release(ctx, record)
        return Response(status_code=204)
    # Undefined on its host: its ports and volumes are free.
    reaping.release(ctx, record)
    current = ctx.registry.domains.get(domain_id)
    if current is None:
        return Response(status_code=204)  # the undefined event beat us here
    return DomainView.of(current, mask)


def _check_gate(record: DomainRecord, action: Action) -> None:
    """Refuse `action` if the task under way forbids it (whatever the power state)."""
    decision = decide(PowerState.SHUTOFF, record.task, action)
    if decision.verdict is Verdict.REFUSE:
        raise _refuse(record, action.value, decision.reason)


def _action(request: ActionRequest) -> Action:
    """The transition table's action: a reboot in mode reset is a reset."""
    if request.action is ActionName.REBOOT and request.reboot_mode() is RebootMode.RESET:
        return Action.RESET
    return Action(request.action.value)


def _command(domain_id: uuid.UUID, request: ActionRequest) -> Command:
    match request.action:
        case ActionName.START:
            return StartDomain(domain_id=domain_id, paused=request.paused)
        case ActionName.SHUTDOWN:
            return ShutdownDomain(
                domain_id=domain_id,
                mode=request.shutdown_mode(),
                timeout_s=request.timeout_s,
                force=request.force,
                wait=request.wait,
            )
        case ActionName.DESTROY:
            return DestroyDomain(domain_id=domain_id)
        case ActionName.REBOOT:
            return RebootDomain(domain_id=domain_id, mode=request.reboot_mode())
        case ActionName.PAUSE:
            return PauseDomain(domain_id=domain_id)
        case ActionName.RESUME:
            return ResumeDomain(domain_id=domain_id)


@router.post(
    "/{domain_id}/actions",
    response_model=DomainView,
    responses=responses(401, 404, 409, 422, 503, 504),
)
def domain_action(
    domain_id: uuid.UUID, body: ActionRequest, ctx: Ctx, caller: Caller, mask: Mask
) -> DomainView:
    """Run a lifecycle action on the domain's host. 409 (with `state` and `task`) when the
    state forbids it; an action that is already done (pause a paused domain) succeeds."""
    record = ctx.visible_domain(caller, domain_id)
    verdict = _check(record, _action(body))
    if record.host is None:
        raise _refuse(record, body.action.value, "domain has no host yet")
    if verdict is Verdict.NOOP:
        return DomainView.of(record, mask)
    timeout = ctx.config.rpc_timeout_s
    if body.action is ActionName.SHUTDOWN and body.wait:
        timeout += body.timeout_s
    info = ctx.call_host(record.host, _command(domain_id, body), timeout)
    assert isinstance(info, DomainInfo)
    if body.action is ActionName.START:
        snapshots.forget_consumed_managed_save(ctx, info)
    updated = ctx.registry.domains.observe_info(info)
    return DomainView.of(updated or record, mask)


@router.get(
    "/{domain_id}/console",
    response_model=ConsoleLog,
    responses=responses(401, 404, 409, 503, 504),
)
def domain_console(
    domain_id: uuid.UUID,
    ctx: Ctx,
    caller: Caller,
    max_bytes: Annotated[int, Query(ge=1, le=4 * 1024 * 1024)] = 65536,
) -> ConsoleLog:
    """The newest console output (decoded as UTF-8 with replacement)."""
    record = ctx.visible_domain(caller, domain_id)
    if record.host is None:
        raise _refuse(record, "console", "domain has no host yet")
    output = ctx.call_host(record.host, GetConsole(domain_id=domain_id, max_bytes=max_bytes))
    assert isinstance(output, ConsoleOutput)
    return ConsoleLog(domain_id=domain_id, data=output.data, truncated=output.truncated)
