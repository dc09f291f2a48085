"""/v1/pools and /v1/volumes: the storage service's catalog through the API.

Every request becomes one `cmd.catalog.*` RPC to the `storage` queue (any replica answers);
the caller's project travels in it (None for an admin), so a member never reaches another
project's volume: that answers 404 exactly as a volume that does not exist.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from http import HTTPStatus
from typing import Annotated, TypeVar, overload

from fastapi import APIRouter, Query, Response

from protos import routing
from protos.base import Message
from protos.commands import Command
from protos.domain import NAME_PATTERN
from protos.volume_wire import read_volume_listing
from protos.volumes import (
    MAX_PAGE,
    CreateVolume,
    DeleteVolume,
    GetPool,
    GetVolume,
    ListPools,
    ListVolumeListing,
    Pool,
    Pools,
    ResizeVolume,
    Volume,
    VolumeQuota,
    WipeVolume,
)
from services.api.auth import Principal
from services.api.context import ApiContext
from services.api.problems import Problem, not_found, responses
from services.api.routes.deps import Caller, Ctx, Mask
from services.api.visibility import HostMask
from services.api.volume_models import (
    PoolList,
    PoolView,
    VolumeClone,
    VolumeCreate,
    VolumeList,
    VolumeResize,
    VolumeView,
    volume_listing_json,
)

pools_router = APIRouter(prefix="/v1/pools", tags=["storage"])
router = APIRouter(prefix="/v1/volumes", tags=["storage"])

# The storage service's refusals → HTTP (the rest as ApiContext.call maps them).
_STATUS = {"not_found": 404, "no_space": 422, "over_quota": 403, "invalid": 422}
T = TypeVar("T")
# A member's listing asked again for hosts its aliases lacked (each try learns the hosts of
# the page; only volumes moving to unknown hosts meanwhile need another).
_LISTING_TRIES = 3


@overload
def call_storage(ctx: ApiContext, command: Command) -> Message: ...
@overload
def call_storage(ctx: ApiContext, command: Command, read: Callable[[bytes], T]) -> T: ...
def call_storage(
    ctx: ApiContext, command: Command, read: Callable[[bytes], T] | None = None
) -> Message | T:
    """RPC to the storage service; its refusals become problems with their `field`. With
    `read`, the reply is read from its bytes by it (ApiContext.call_read)."""
    try:
        if read is not None:
            return ctx.call_read(routing.STORAGE_QUEUE, command, read)
        return ctx.call(routing.STORAGE_QUEUE, command)
    except Problem as problem:
        status = _STATUS.get(problem.code)
        if status is not None:
            problem.status = status
            problem.title = "Invalid request" if status == 422 else HTTPStatus(status).phrase
        if problem.code == "no_space":  # from the catalog or the host: the size is the cause
            problem.extras.setdefault("field", "size")
        if problem.code == "not_found" and "field" not in problem.extras:
            problem.detail = problem.detail.replace("no volume", "volume") + " not found"
        raise


def _project(caller: Principal) -> str | None:
    return None if caller.is_admin else caller.project


def volume_quota(ctx: ApiContext, project: str) -> VolumeQuota | None:
    limits = ctx.config.volume_quota_for(project)
    if limits.volumes is None and limits.gib is None:
        return None
    return VolumeQuota(volumes=limits.volumes, gib=limits.gib)


def _get(ctx: ApiContext, caller: Principal, volume_id: uuid.UUID) -> Volume:
    volume = call_storage(ctx, GetVolume(volume_id=volume_id, project=_project(caller)))
    assert isinstance(volume, Volume)
    return volume


def _view(volume: Message, mask: HostMask) -> VolumeView:
    assert isinstance(volume, Volume), volume
    return VolumeView.of(volume, mask)


# ---- pools ---------------------------------------------------------------------------------


@pools_router.get("", response_model=PoolList, responses=responses(401, 503, 504))
def list_pools(ctx: Ctx, caller: Caller, mask: Mask) -> PoolList:
    """Every pool: kind, host (an alias for a member), capacity, allocation, available bytes."""
    reply = call_storage(ctx, ListPools(project=_project(caller)))
    assert isinstance(reply, Pools)
    return PoolList(pools=[PoolView.of(p, mask) for p in reply.pools])


@pools_router.get("/{name}", response_model=PoolView, responses=responses(401, 404, 503, 504))
def get_pool(name: str, ctx: Ctx, caller: Caller, mask: Mask) -> PoolView:
    if len(name) > 63:
        raise not_found(f"pool {name!r}")
    try:
        reply = call_storage(ctx, GetPool(project=_project(caller), pool=name))
    except Problem as problem:
        if problem.code == "not_found":
            raise not_found(f"pool {name!r}") from None
        raise
    assert isinstance(reply, Pool)
    return PoolView.of(reply, mask)


# ---- volumes -------------------------------------------------------------------------------


@router.post(
    "",
    status_code=201,
    response_model=VolumeView,
    responses=responses(401, 403, 404, 409, 422, 503),
)
def create_volume(
    body: VolumeCreate, ctx: Ctx, caller: Caller, mask: Mask, response: Response
) -> VolumeView:
    """A new empty volume of `size` bytes in `pool` (the default pool if none). 422 for a
    bad name or size (`field` says which), `no_space` beyond the pool's free space; 409
    `conflict` for a name in use in the project; 403 `over_quota`."""
    command = CreateVolume(
        volume_id=uuid.uuid4(),
        project=caller.project,
        name=body.name,
        pool=body.pool,
        size=body.size,
        quota=volume_quota(ctx, caller.project),
    )
    view = _view(call_storage(ctx, command), mask)
    response.headers["Location"] = f"/v1/volumes/{view.id}"
    return view


@router.get("", response_model=VolumeList, responses=responses(401, 422, 502, 503))
def list_volumes(
    *,
    ctx: Ctx,
    caller: Caller,
    mask: Mask,
    pool: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    after: Annotated[str | None, Query(max_length=200, description="the `next` cursor")] = None,
) -> Response:
    """A page of the caller's volumes (an admin's: every project's) by name; `next` is the
    cursor of the next page (absent after the last)."""
    # The storage service renders the page's JSON, hosts through the member's aliases; a
    # host the registry does not know (yet) is named back and aliased here, then asked again.
    hosts = mask.aliases()
    for _ in range(_LISTING_TRIES):
        command = ListVolumeListing(
            project=_project(caller), pool=pool, limit=limit, after=after, hosts=hosts
        )
        try:
            listing = call_storage(ctx, command, read_volume_listing)
        except Problem as problem:
            unmapped = problem.extras.get("hosts")
            if problem.code != "unmapped_host" or hosts is None or not isinstance(unmapped, list):
                raise
            hosts = mask.aliases([*hosts, *(str(h) for h in unmapped)])
            continue
        return Response(volume_listing_json(listing), media_type="application/json")
    raise Problem(503, "unavailable", "the volume listing's hosts kept changing: try again")


# `:uuid`: /v1/volumes/upload (a route of its own) is no volume id, so a GET or DELETE of it
# is 405, not a 422 about the id.
@router.get("/{volume_id:uuid}", response_model=VolumeView, responses=responses(401, 404, 422, 503))
def get_volume(volume_id: uuid.UUID, ctx: Ctx, caller: Caller, mask: Mask) -> VolumeView:
    return _view(_get(ctx, caller, volume_id), mask)


@router.delete(
    "/{volume_id:uuid}", status_code=204, responses=responses(401, 404, 409, 422, 503, 504)
)
def delete_volume(volume_id: uuid.UUID, ctx: Ctx, caller: Caller) -> Response:
    """Delete the volume and its file; 409 `conflict` (reason `attached`) while attached."""
    call_storage(ctx, DeleteVolume(volume_id=volume_id, project=_project(caller)))
    return Response(status_code=204)


@router.post(
    "/{volume_id}/resize",
    response_model=VolumeView,
    responses=responses(401, 403, 404, 409, 422, 503, 504),
)
def resize_volume(
    volume_id: uuid.UUID, body: VolumeResize, ctx: Ctx, caller: Caller, mask: Mask
) -> VolumeView:
    """Grow to `size` bytes; 409 (reason `shrink`) for a smaller size."""
    record = _view(
        call_storage(ctx, GetVolume(volume_id=volume_id, project=_project(caller))), mask
    )
    command = ResizeVolume(
        volume_id=volume_id,
        project=_project(caller),
        size=body.size,
        quota=volume_quota(ctx, record.project),
    )
    return _view(call_storage(ctx, command), mask)


@router.post(
    "/{volume_id}/clone",
    status_code=201,
    response_model=VolumeView,
    responses=responses(401, 403, 404, 409, 422, 503, 504),
)
def clone_volume(  # noqa: PLR0917  (FastAPI passes dependencies by keyword)
    volume_id: uuid.UUID,
    body: VolumeClone,
    ctx: Ctx,
    caller: Caller,
    mask: Mask,
    response: Response,
) -> VolumeView:
    """A new volume `name` with the content of this one (a reflink where the pool has them,
    else a sparse copy), in its pool; `size` (at least the source's) grows it."""
    source = _view(
        call_storage(ctx, GetVolume(volume_id=volume_id, project=_project(caller))), mask
    )
    command = CreateVolume(
        volume_id=uuid.uuid4(),
        project=source.project,
        name=body.name,
        size=body.size,
        source_id=volume_id,
        quota=volume_quota(ctx, source.project),
    )
    view = _view(call_storage(ctx, command), mask)
    response.headers["Location"] = f"/v1/volumes/{view.id}"
    return view


@router.post(
    "/{volume_id}/wipe",
    response_model=VolumeView,
    responses=responses(401, 404, 409, 422, 503, 504),
)
def wipe_volume(volume_id: uuid.UUID, ctx: Ctx, caller: Caller, mask: Mask) -> VolumeView:
    """Make every byte read as zero (size kept); 409 while attached."""
    return _view(call_storage(ctx, WipeVolume(volume_id=volume_id, project=_project(caller))), mask)
