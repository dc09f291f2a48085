"""/v1/events: the registry's event log as Server-Sent Events, resumable."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from protos.routing import topic_matches
from services.api.auth import Principal
from services.api.context import ApiContext
from services.api.problems import Problem, responses
from services.api.registry.events import EventRecord
from services.api.routes.deps import Caller, Ctx, Mask
from services.api.visibility import HostMask

router = APIRouter(tags=["events"])
_PATTERN = re.compile(r"^[A-Za-z0-9_*#:-]+(\.[A-Za-z0-9_*#:-]+)*$")
_BATCH = 500


def frame(record: EventRecord, mask: HostMask) -> str:
    """One SSE message: `id` is the log row id (what Last-Event-ID resumes from); host names
    as `mask` lets the caller see them."""
    volume = record.state is None  # a volume event's row is keyed by its volume
    data: dict[str, Any] = {
        "id": record.id,
        "type": record.type,
        "routing_key": record.routing_key,
        "domain_id": None if volume else str(record.domain_id),
        **({"volume_id": str(record.domain_id)} if volume else {}),
        "host": record.host,
        "seq": record.seq,
        "state": None if record.state is None else record.state.value,
        "ts": record.ts,
        "project": record.project,
        "correlation_id": record.correlation_id,
        "causation_id": record.causation_id,
        "event": record.body,
    }
    data = mask.body(data)
    return f"id: {record.id}\nevent: {record.type}\ndata: {json.dumps(data)}\n\n"


@router.get(
    "/v1/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "an SSE stream"},
        **responses(401, 422),
    },
)
async def stream_events(
    *,
    request: Request,
    ctx: Ctx,
    caller: Caller,
    mask: Mask,
    pattern: Annotated[
        list[str], Query(description="routing-key patterns (`*` one word, `#` any)")
    ] = ["domain.#"],  # noqa: B006  (FastAPI copies query defaults)
    since: Annotated[int | None, Query(ge=0, description="resume after this event id")] = None,
    domain: Annotated[
        uuid.UUID | None, Query(description="only this domain's (or volume's) events")
    ] = None,
    since_seq: Annotated[
        int | None, Query(ge=0, description="with `domain`: events with a higher seq")
    ] = None,
    follow: Annotated[bool, Query(description="false: send what is logged, then end")] = True,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    """Domain events (and, with a `volume.*` pattern, volume events) of the caller's project
    (an admin's: all), oldest first. Without `since`, `Last-Event-ID` or `since_seq` the
    stream starts with events logged from now on."""
    for p in pattern:
        if not _PATTERN.match(p):
            raise Problem(
                422, "invalid", f"pattern: bad routing-key pattern {p!r}", field="pattern"
            )
    if since_seq is not None and domain is None:
        raise Problem(422, "invalid", "since_seq: needs `domain`", field="since_seq")
    if last_event_id is not None:
        if not last_event_id.strip().isdigit():
            raise Problem(422, "invalid", "Last-Event-ID: not an event id", field="Last-Event-ID")
        since = int(last_event_id)
    if since is None:
        since = 0 if since_seq is not None else await run_in_threadpool(ctx.registry.events.last_id)
    body = _events(
        request=request,
        ctx=ctx,
        caller=caller,
        mask=mask,
        patterns=pattern,
        cursor=since,
        domain=domain,
        since_seq=since_seq,
        follow=follow,
    )
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _events(
    *,
    request: Request,
    ctx: ApiContext,
    caller: Principal,
    mask: HostMask,
    patterns: list[str],
    cursor: int,
    domain: uuid.UUID | None,
    since_seq: int | None,
    follow: bool,
) -> AsyncIterator[str]:
    project = None if caller.is_admin else caller.project
    await run_in_threadpool(mask.load)  # the host names, read once, not on the event loop
    yield "retry: 1000\n\n"
    quiet_since = time.monotonic()
    while True:
        rows = await run_in_threadpool(
            ctx.registry.events.after,
            cursor,
            project=project,
            domain_id=domain,
            since_seq=since_seq,
            limit=_BATCH,
        )
        for row in rows:
            cursor = row.id
            if any(topic_matches(p, row.routing_key) for p in patterns):
                yield frame(row, mask)
                quiet_since = time.monotonic()
        if len(rows) == _BATCH:
            continue
        if not follow or await request.is_disconnected():
            return
        if time.monotonic() - quiet_since >= ctx.config.sse_keepalive_s:
            yield ": keepalive\n\n"
            quiet_since = time.monotonic()
        await ctx.wakeup.wait(ctx.config.sse_poll_s)
