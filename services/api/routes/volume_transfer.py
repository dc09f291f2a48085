"""Volume upload and download through the API, streamed (never whole in memory).

`POST /v1/volumes/upload?name=…` makes a new volume from the request body (its
Content-Length is the volume's size: a multiple of 512), streamed to the pool's host
(services/api/transfer.py), which writes a temp file, checks the length and the `sha256`
if given, syncs, and only then names the volume: no partial volume is ever visible, and a
body cut short leaves nothing. `GET /v1/volumes/{id}/content` streams a volume's bytes back.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from protos.bindings import SHA256_PATTERN
from protos.domain import NAME_PATTERN
from protos.images import (
    BeginVolumeDownload,
    BeginVolumeUpload,
    EndVolumeUpload,
    UploadedVolume,
    VolumeDownload,
    VolumeUpload,
)
from protos.storage import MAX_VOLUME_BYTES, SECTOR
from services.api import transfer
from services.api.image_models import IMAGE_NAME_PATTERN
from services.api.problems import Problem, responses
from services.api.routes.deps import Caller, Ctx, Mask
from services.api.routes.volumes import call_storage, volume_quota
from services.api.volume_models import VolumeView

router = APIRouter(prefix="/v1/volumes", tags=["storage"])


def _size(request: Request) -> int:
    raw = request.headers.get("content-length")
    if raw is None:
        raise Problem(411, "length_required", "an upload names its size in Content-Length")
    if not raw.isdigit():
        raise Problem(400, "bad_request", "Content-Length is not a number")
    size = int(raw)
    if size > MAX_VOLUME_BYTES:
        raise Problem(413, "too_large", f"a volume is at most {MAX_VOLUME_BYTES} bytes")
    if size <= 0 or size % SECTOR:
        raise Problem(
            422,
            "invalid",
            f"size: a volume is a positive multiple of {SECTOR} bytes, not {size}",
            title="Invalid request",
            field="size",
        )
    return size


@router.post(
    "/upload",
    status_code=201,
    response_model=VolumeView,
    responses=responses(400, 401, 403, 404, 409, 411, 413, 422, 503, 504),
    openapi_extra=transfer.OCTET_STREAM_BODY,
)
async def upload_volume(  # noqa: PLR0917  (FastAPI passes parameters by keyword)
    request: Request,
    ctx: Ctx,
    caller: Caller,
    mask: Mask,
    response: Response,
    name: Annotated[str, Query(min_length=1, max_length=63, pattern=IMAGE_NAME_PATTERN)],
    pool: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    sha256: Annotated[str | None, Query(pattern=SHA256_PATTERN)] = None,
) -> VolumeView:
    """A new volume `name` holding the body (Content-Length bytes, a multiple of 512; 411
    without it). `sha256`, if given, must match (422 otherwise). The `X-Content-Sha256`
    header of the answer is the sha256 the host computed. 400 `truncated` when the body
    ends early; 422 `no_space` when the pool fills: nothing is left either way."""
    begin = BeginVolumeUpload(
        volume_id=uuid.uuid4(),
        project=caller.project,
        name=name,
        pool=pool,
        size=_size(request),
        sha256=sha256,
        quota=volume_quota(ctx, caller.project),
    )
    started = await run_in_threadpool(call_storage, ctx, begin)
    assert isinstance(started, VolumeUpload)
    end = EndVolumeUpload(volume_id=begin.volume_id, project=caller.project)
    done = await transfer.upload_then_end(
        request.stream(), started.ticket, lambda: call_storage(ctx, end)
    )
    assert isinstance(done, UploadedVolume)
    response.headers["Location"] = f"/v1/volumes/{done.volume.volume_id}"
    response.headers["X-Content-Sha256"] = done.sha256
    return VolumeView.of(done.volume, mask)


@router.get(
    "/{volume_id}/content",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {"schema": {"type": "string"}}}},
        **responses(401, 404, 409, 422, 503, 504),
    },
)
async def download_volume(volume_id: uuid.UUID, ctx: Ctx, caller: Caller) -> StreamingResponse:
    """The volume's bytes (holes read as zeros); 409 while a guest writes it."""
    project = None if caller.is_admin else caller.project
    started = await run_in_threadpool(
        call_storage, ctx, BeginVolumeDownload(volume_id=volume_id, project=project)
    )
    assert isinstance(started, VolumeDownload)
    size, chunks = await transfer.download(started.ticket)

    async def body() -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk

    return StreamingResponse(
        body(),
        media_type="application/octet-stream",
        headers={"Content-Length": str(size)},
    )
