"""/v1/domains/{id}/save, restore, managedsave and snapshots (docs/snapshots.md).

The API checks the transition table (409 with the state and task), the project's
`snapshot_bytes` quota (403 over_quota) and snapshot names (422, 409 when taken), asks the
domain's compute node to do the work with a StateRef it chose, and records what was taken in
the registry (services.api.saved_states). Another project's domain or snapshot is 404.
"""

from __future__ import annotations

import uuid
from typing import Annotated

import structlog
from fastapi import APIRouter, Body, Path, Response

from protos.bindings import StateRef
from protos.commands import (
    Command,
    CreateSnapshot,
    DeleteState,
    RemoveManagedSave,
    RestoreDomain,
    RevertSnapshot,
    SaveDomain,
)
from protos.domain import NAME_PATTERN
from protos.replies import DomainInfo, SavedState
from protos.states import Action, Verdict, decide
from services.api.context import ApiContext
from services.api.models import DomainView
from services.api.problems import Problem, not_found, responses
from services.api.registry.domains import DomainRecord
from services.api.routes.deps import Caller, Ctx, Mask
from services.api.saved_states import (
    Kind,
    SnapshotNameInUse,
    StateQuotaExceeded,
    StateRecord,
)
from services.api.snapshot_models import (
    RestoreRequest,
    SavedView,
    SaveRequest,
    SnapshotCreate,
    SnapshotList,
    SnapshotRevert,
    SnapshotView,
    snapshot_views,
)

log = structlog.get_logger("flotilla.api")
router = APIRouter(prefix="/v1/domains", tags=["snapshots"])
SnapshotName = Annotated[str, Path(min_length=1, max_length=63, pattern=NAME_PATTERN)]


def _placed(record: DomainRecord, action: Action) -> str:
    """The domain's host once the table allows `action`; 409 otherwise."""
    decision = decide(record.power, record.task, action)
    if decision.verdict is Verdict.REFUSE or record.host is None:
        raise Problem(
            409,
            "conflict",
            decision.reason or "domain has no host yet",
            state=record.power.value,
            task=record.task.value,
            action=action.value,
        )
    return record.host


def _limit(ctx: ApiContext, project: str) -> int | None:
    quota = ctx.registry.access.get_quota(project) or ctx.config.quota_for(project)
    return quota.snapshot_bytes


def _over_quota(exc: StateQuotaExceeded) -> Problem:
    return Problem(
        403,
        "over_quota",
        str(exc),
        resource=exc.resource,
        limit=exc.limit,
        used=exc.used,
        requested=exc.requested,
    )


def _take(
    ctx: ApiContext,
    record: DomainRecord,
    host: str,
    command: Command,
    *,
    kind: Kind,
    name: str | None = None,
    description: str = "",
) -> StateRecord:
    """Run `command` (a save or snapshot) on `host` and record what it took; a state that
    does not fit the quota afterwards is deleted again (403)."""
    limit = _limit(ctx, record.project)
    try:
        ctx.registry.states.check_room(record.project, limit)
    except StateQuotaExceeded as exc:
        raise _over_quota(exc) from None
    saved = ctx.call_host(host, command)
    assert isinstance(saved, SavedState)
    ctx.registry.domains.observe_info(saved.domain)
    try:
        return ctx.registry.states.add(
            saved,
            project=record.project,
            kind=kind,
            limit=limit,
            name=name,
            description=description,
        )
    except (StateQuotaExceeded, SnapshotNameInUse) as exc:
        _delete_files(ctx, record.id, saved.state)
        if isinstance(exc, StateQuotaExceeded):
            raise _over_quota(exc) from None
        raise Problem(409, "name_in_use", str(exc), name=name) from None


def _delete_files(ctx: ApiContext, domain_id: uuid.UUID, ref: StateRef) -> None:
    """Best effort: a state left behind costs space, never correctness."""
    if ref.host is None:
        return
    try:
        ctx.call_host(ref.host, DeleteState(domain_id=domain_id, state=ref))
    except Problem as problem:
        log.warning("state files not deleted", state=str(ref.state_id), error=problem.detail)


def _forget(ctx: ApiContext, record: StateRecord) -> None:
    _delete_files(ctx, record.domain_id, record.ref)
    ctx.registry.states.remove(record.id)


def _view(ctx: ApiContext, domain_id: uuid.UUID, mask: Mask) -> DomainView:
    record = ctx.registry.domains.get(domain_id)
    assert record is not None
    return DomainView.of(record, mask)


def _observed(ctx: ApiContext, info: object, record: DomainRecord, mask: Mask) -> DomainView:
    assert isinstance(info, DomainInfo)
    updated = ctx.registry.domains.observe_info(info)
    return DomainView.of(updated or record, mask)


# ---- save and restore -----------------------------------------------------------------------


@router.post(
    "/{domain_id}/save",
    response_model=SavedView,
    responses=responses(401, 403, 404, 409, 422, 501, 503, 504, 507),
)
def save_domain(
    domain_id: uuid.UUID,
    ctx: Ctx,
    caller: Caller,
    mask: Mask,
    body: Annotated[SaveRequest | None, Body()] = None,
) -> SavedView:
    """Save the running or paused domain's whole machine and stop it (event
    `domain.stopped/saved`). A domain keeps one save: an older one is replaced. 409 while
    it is not active or while the control plane works on it (e.g. `migrating`); 422 for a
    `pool` the domain's host does not have."""
    record = ctx.visible_domain(caller, domain_id)
    host = _placed(record, Action.SAVE)
    pool = body.pool if body is not None else None
    ref = StateRef(state_id=uuid.uuid4(), pool=pool, host=host)
    older = ctx.registry.states.of_domain(domain_id, "save")
    try:
        taken = _take(ctx, record, host, SaveDomain(domain_id=domain_id, state=ref), kind="save")
    except Problem as problem:
        if problem.extras.get("field") != "pool":
            raise
        # A pool the domain's host lacks is the request's fault, not a conflict of views.
        raise Problem(422, "invalid", f"pool: {problem.detail}", field="pool") from None
    for old in older:
        _forget(ctx, old)
    return SavedView.of(taken, mask, _view(ctx, domain_id, mask))


@router.post(
    "/{domain_id}/restore",
    response_model=DomainView,
    responses=responses(401, 404, 409, 422, 501, 503, 504),
)
def restore_domain(
    domain_id: uuid.UUID,
    ctx: Ctx,
    caller: Caller,
    mask: Mask,
    body: Annotated[RestoreRequest | None, Body()] = None,
) -> DomainView:
    """Start the shut-off domain from its save (`domain.started/restored`, seq continuing),
    which is then deleted. 409 when it is active or has no save; 422 when the host finds
    the save corrupt or of another machine config (the domain stays shut off)."""
    record = ctx.visible_domain(caller, domain_id)
    host = _placed(record, Action.RESTORE)
    saves = ctx.registry.states.of_domain(domain_id, "save")
    if not saves:
        raise Problem(409, "no_save", f"domain {domain_id} has no save to restore")
    save = saves[-1]
    paused = body.paused if body is not None else False
    info = ctx.call_host(
        host, RestoreDomain(domain_id=domain_id, state=save.ref, paused=paused, consume=True)
    )
    assert isinstance(info, DomainInfo)
    forget_consumed_managed_save(ctx, info)  # the host drops a managed save a restore made stale
    ctx.registry.states.remove(save.id)  # the host deleted its files (`consume`)
    return _observed(ctx, info, record, mask)


@router.post(
    "/{domain_id}/managedsave",
    response_model=SavedView,
    responses=responses(401, 403, 404, 409, 501, 503, 504, 507),
)
def managed_save(domain_id: uuid.UUID, ctx: Ctx, caller: Caller, mask: Mask) -> SavedView:
    """Save the domain and stop it; its next start restores the save and deletes it (as
    libvirt's managedsave). Kept on the domain's host."""
    record = ctx.visible_domain(caller, domain_id)
    host = _placed(record, Action.SAVE)
    ref = StateRef(state_id=uuid.uuid4(), host=host)
    command = SaveDomain(domain_id=domain_id, state=ref, managed=True)
    taken = _take(ctx, record, host, command, kind="managed")
    return SavedView.of(taken, mask, _view(ctx, domain_id, mask))


@router.delete(
    "/{domain_id}/managedsave",
    response_model=DomainView,
    responses=responses(401, 404, 409, 503, 504),
)
def managed_save_remove(domain_id: uuid.UUID, ctx: Ctx, caller: Caller, mask: Mask) -> DomainView:
    """Drop the shut-off domain's managed save: the next start boots afresh."""
    record = ctx.visible_domain(caller, domain_id)
    host = _placed(record, Action.MANAGEDSAVE_REMOVE)
    info = ctx.call_host(host, RemoveManagedSave(domain_id=domain_id))
    for row in ctx.registry.states.of_domain(domain_id, "managed"):
        ctx.registry.states.remove(row.id)
    return _observed(ctx, info, record, mask)


def forget_consumed_managed_save(ctx: ApiContext, info: DomainInfo) -> None:
    """After a start: a managed save the host no longer has was restored and deleted."""
    if not info.managed_save:
        for row in ctx.registry.states.of_domain(info.domain_id, "managed"):
            ctx.registry.states.remove(row.id)


def drop_states(ctx: ApiContext, domain_id: uuid.UUID) -> None:
    """A domain being deleted: its saves and snapshots go with it (best effort on hosts)."""
    for row in ctx.registry.states.of_domain(domain_id):
        _forget(ctx, row)


# ---- snapshots --------------------------------------------------------------------------------


def _snapshot(ctx: ApiContext, domain_id: uuid.UUID, name: str) -> StateRecord:
    found = ctx.registry.states.snapshot(domain_id, name)
    if found is None:
        raise not_found(f"snapshot {name!r} of domain {domain_id}")
    return found


@router.post(
    "/{domain_id}/snapshots",
    status_code=201,
    response_model=SnapshotView,
    responses=responses(401, 403, 404, 409, 422, 501, 503, 504, 507),
)
def create_snapshot(
    domain_id: uuid.UUID, body: SnapshotCreate, ctx: Ctx, caller: Caller, response: Response
) -> SnapshotView:
    """Snapshot the domain: its disks (each volume copied, reflink where the pool can) and,
    for an active domain with `memory`, its running machine (paused meanwhile, then going
    on as it was). Its parent is the current snapshot; it becomes the current one. 409 for
    a taken name or a state the table refuses, 403 over the `snapshot_bytes` quota."""
    record = ctx.visible_domain(caller, domain_id)
    host = _placed(record, Action.SNAPSHOT_CREATE)
    if ctx.registry.states.snapshot(domain_id, body.name) is not None:
        raise Problem(409, "name_in_use", f"the domain has a snapshot named {body.name!r}")
    ref = StateRef(state_id=uuid.uuid4(), host=host)
    command = CreateSnapshot(domain_id=domain_id, state=ref, memory=body.memory)
    taken = _take(
        ctx,
        record,
        host,
        command,
        kind="snapshot",
        name=body.name,
        description=body.description,
    )
    response.headers["Location"] = f"/v1/domains/{domain_id}/snapshots/{body.name}"
    return _snapshot_view(ctx, domain_id, taken.id)


def _snapshot_view(ctx: ApiContext, domain_id: uuid.UUID, state_id: uuid.UUID) -> SnapshotView:
    rows = ctx.registry.states.of_domain(domain_id, "snapshot")
    views = snapshot_views(rows)
    by_id = {r.id: v for r, v in zip(rows, views, strict=True)}
    return by_id[state_id]


@router.get("/{domain_id}/snapshots", response_model=SnapshotList, responses=responses(401, 404))
def list_snapshots(domain_id: uuid.UUID, ctx: Ctx, caller: Caller) -> SnapshotList:
    """The domain's snapshots, oldest first, each with its parent and children (a tree),
    and the current one."""
    ctx.visible_domain(caller, domain_id)
    views = snapshot_views(ctx.registry.states.of_domain(domain_id, "snapshot"))
    current = next((v.name for v in views if v.current), None)
    return SnapshotList(domain_id=domain_id, current=current, snapshots=views)


@router.get(
    "/{domain_id}/snapshots/{name}",
    response_model=SnapshotView,
    responses=responses(401, 404),
)
def get_snapshot(
    domain_id: uuid.UUID, name: SnapshotName, ctx: Ctx, caller: Caller
) -> SnapshotView:
    ctx.visible_domain(caller, domain_id)
    return _snapshot_view(ctx, domain_id, _snapshot(ctx, domain_id, name).id)


@router.post(
    "/{domain_id}/snapshots/{name}/revert",
    response_model=DomainView,
    responses=responses(401, 404, 409, 422, 501, 503, 504),
)
def revert_snapshot(
    domain_id: uuid.UUID,
    name: SnapshotName,
    *,
    ctx: Ctx,
    caller: Caller,
    mask: Mask,
    body: Annotated[SnapshotRevert | None, Body()] = None,
) -> DomainView:
    """Return the shut-off domain to the snapshot: disks replaced by its copies, then the
    machine restored as taken (`domain.started/from_snapshot`) when it has memory. The
    snapshot becomes current; a managed save is dropped. 409 while the domain is active."""
    record = ctx.visible_domain(caller, domain_id)
    snapshot = _snapshot(ctx, domain_id, name)
    host = _placed(record, Action.SNAPSHOT_REVERT)
    start = body.start if body is not None else None
    info = ctx.call_host(host, RevertSnapshot(domain_id=domain_id, state=snapshot.ref, start=start))
    ctx.registry.states.set_current(domain_id, snapshot.id)
    for row in ctx.registry.states.of_domain(domain_id, "managed"):
        ctx.registry.states.remove(row.id)
    return _observed(ctx, info, record, mask)


@router.delete(
    "/{domain_id}/snapshots/{name}",
    status_code=204,
    responses=responses(401, 404, 409, 503, 504),
)
def delete_snapshot(domain_id: uuid.UUID, name: SnapshotName, ctx: Ctx, caller: Caller) -> Response:
    """Delete the snapshot's files and record; its children take its parent as theirs.
    Every snapshot is self-contained, so nothing another snapshot needs goes."""
    record = ctx.visible_domain(caller, domain_id)
    snapshot = _snapshot(ctx, domain_id, name)
    _placed(record, Action.SNAPSHOT_DELETE)
    ctx.call_host(snapshot.host, DeleteState(domain_id=domain_id, state=snapshot.ref))
    ctx.registry.states.remove(snapshot.id)
    return Response(status_code=204)
