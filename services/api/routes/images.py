"""/v1/images: images in the storage catalog, imported by streaming the request body.

`POST /v1/images?name=…` streams the body (raw or qcow2 bytes, `application/octet-stream`)
to the pool's host (services/api/transfer.py), which hashes it as it arrives, converts a
qcow2 to raw and stores the result by its sha256; the storage service then records what the
host says it stored. A member sees its project's images and the public ones; another
project's private image is 404, exactly as one that does not exist.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from protos.domain import NAME_PATTERN
from protos.images import (
    MAX_IMAGE_BYTES,
    BeginImageImport,
    DeleteImage,
    EndImageImport,
    GetImage,
    Image,
    ImageFormatName,
    ImageImport,
    ImageKindName,
    ImageQuota,
    ImportImageFromHost,
    ListImages,
    VisibilityName,
)
from protos.images import ImageList as ImageListReply
from services.api import boot_images, transfer
from services.api.auth import Principal, require_admin
from services.api.context import ApiContext
from services.api.image_models import IMAGE_NAME_PATTERN, ImageFromHost, ImageList, ImageView
from services.api.problems import Problem, responses
from services.api.routes.deps import Admin, Caller, Ctx, Mask
from services.api.routes.volumes import call_storage

router = APIRouter(prefix="/v1/images", tags=["storage"])


def _project(caller: Principal) -> str | None:
    return None if caller.is_admin else caller.project


def _check_public(caller: Principal, visibility: str) -> None:
    if visibility == "public" and not caller.is_admin:
        raise Problem(403, "forbidden", "only an admin makes an image public", field="visibility")


def image_quota(ctx: ApiContext, project: str) -> ImageQuota | None:
    """The project's image limits (the registry's quota, else the config's); None if
    unlimited. They travel on the import commands: the catalog checks them."""
    quota = ctx.registry.access.get_quota(project) or ctx.config.quota_for(project)
    if quota.images is None and quota.image_gib is None:
        return None
    return ImageQuota(images=quota.images, image_gib=quota.image_gib)


def _image(reply: Any) -> Image:
    assert isinstance(reply, Image), reply
    return reply


def _content_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    if not raw.isdigit():
        raise Problem(400, "bad_request", "Content-Length is not a number")
    size = int(raw)
    if size > MAX_IMAGE_BYTES:
        raise Problem(413, "too_large", f"an image is at most {MAX_IMAGE_BYTES} bytes")
    return size or None


@router.post(
    "",
    status_code=201,
    response_model=ImageView,
    responses=responses(400, 401, 403, 404, 409, 413, 422, 503, 504),
    openapi_extra=transfer.OCTET_STREAM_BODY,
)
async def import_image(  # noqa: PLR0917  (FastAPI passes parameters by keyword)
    request: Request,
    ctx: Ctx,
    caller: Caller,
    mask: Mask,
    response: Response,
    name: Annotated[str, Query(min_length=1, max_length=63, pattern=IMAGE_NAME_PATTERN)],
    kind: ImageKindName = "disk",
    visibility: VisibilityName = "private",
    format: ImageFormatName | None = None,  # noqa: A002 - the word every image tool uses
    pool: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
) -> ImageView:
    """Import the request body (raw or qcow2; a qcow2 is converted to raw, one with a
    backing or external data file is refused) as image `name` of the caller's project.
    `visibility=public` (admins only) lets every project use it. The same bytes imported
    again add a name, not a file (and count its size for the project again). 422 for an
    image that is not raw or qcow2, or not what `format` says; 409 for a name in use; 422
    `no_space` past the pool's free space; 403 `over_quota` (`resource` `images` or
    `image_gib`) past the project's limits, checked at the start (with Content-Length) and
    again with the stored size, when nothing of the refused import is left."""
    _check_public(caller, visibility)
    size = _content_length(request)
    quota = await run_in_threadpool(image_quota, ctx, caller.project)  # a registry read
    begin = BeginImageImport(
        image_id=uuid.uuid4(),
        project=caller.project,
        name=name,
        kind=kind,
        visibility=visibility,
        pool=pool,
        format=format,
        size=size,
        quota=quota,
    )
    started = await run_in_threadpool(call_storage, ctx, begin)
    assert isinstance(started, ImageImport)
    end = EndImageImport(image_id=begin.image_id, project=caller.project)
    image = _image(
        await transfer.upload_then_end(
            request.stream(), started.ticket, lambda: call_storage(ctx, end)
        )
    )
    response.headers["Location"] = f"/v1/images/{image.image_id}"
    return ImageView.of(image, mask)


@router.post(
    "/from-host",
    status_code=201,
    response_model=ImageView,
    responses=responses(401, 403, 404, 409, 422, 503, 504),
)
def import_from_host(
    body: ImageFromHost, ctx: Ctx, caller: Admin, mask: Mask, response: Response
) -> ImageView:
    """Admins: import a file on the pool's host (an absolute path)."""
    require_admin(caller)
    command = ImportImageFromHost(
        image_id=uuid.uuid4(),
        project=caller.project,
        name=body.name,
        kind=body.kind,
        visibility=body.visibility,
        pool=body.pool,
        format=body.format,
        path=body.path,
        quota=image_quota(ctx, caller.project),
    )
    image = _image(call_storage(ctx, command))
    response.headers["Location"] = f"/v1/images/{image.image_id}"
    return ImageView.of(image, mask)


@router.get("", response_model=ImageList, responses=responses(401, 503))
def list_images(ctx: Ctx, caller: Caller, mask: Mask) -> ImageList:
    """The caller's project's images and the public ones (an admin's: every image)."""
    reply = call_storage(ctx, ListImages(project=_project(caller)))
    assert isinstance(reply, ImageListReply)
    return ImageList(images=[ImageView.of(i, mask) for i in reply.images])


@router.get("/{image_id:uuid}", response_model=ImageView, responses=responses(401, 404, 422, 503))
def get_image(image_id: uuid.UUID, ctx: Ctx, caller: Caller, mask: Mask) -> ImageView:
    reply = call_storage(ctx, GetImage(image_id=image_id, project=_project(caller)))
    return ImageView.of(_image(reply), mask)


@router.delete("/{image_id:uuid}", status_code=204, responses=responses(401, 404, 409, 422, 503))
def delete_image(image_id: uuid.UUID, ctx: Ctx, caller: Caller) -> Response:
    """Remove the image's name (the caller's project's own); its file goes with the last
    name. 409 (reason `in_use`) while a domain definition boots from it."""
    image = _image(call_storage(ctx, GetImage(image_id=image_id, project=_project(caller))))
    if caller.is_admin or image.project == caller.project:
        users = boot_images.domains_booting(ctx, image)
        if users:
            raise Problem(
                409,
                "conflict",
                f"image {image.name!r} is the boot image of domain {users[0]!r}",
                reason="in_use",
                domains=users[:20],
            )
    call_storage(ctx, DeleteImage(image_id=image_id, project=_project(caller)))
    return Response(status_code=204)
