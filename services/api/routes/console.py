"""/v1/domains/{id}/console/attach: the guest's interactive console over a WebSocket.

The API asks the domain's compute node for a one-time ticket (`OpenConsole`), connects to that
node's console relay over TCP and copies bytes both ways: binary (or text) frames from the
client are keystrokes, console output comes back as binary frames. Authentication is the
usual bearer token in the `Authorization` header (never in the URL, which servers log). A
refusal answers the handshake with the HTTP status and a problem+json body (401, 404 for a
domain the caller may not see, 409 when it is not running, 503 when its host or relay cannot
be reached).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import structlog
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from protos.commands import OpenConsole
from protos.replies import ConsoleTicket
from services.api.context import ApiContext
from services.api.problems import PROBLEM_JSON, Problem
from services.api.visibility import HostMask

log = structlog.get_logger("flotilla.api.console")
router = APIRouter(tags=["domains"])
CHUNK = 65536
RELAY_CONNECT_S = 5.0


def _open(ctx: ApiContext, websocket: WebSocket, domain_id: uuid.UUID) -> tuple[str, ConsoleTicket]:
    """Check the caller and the domain, and get a relay ticket from its host (or a Problem)."""
    caller = ctx.auth.principal(websocket.headers.get("authorization"))
    websocket.state.host_mask = ctx.host_mask(caller)
    record = ctx.visible_domain(caller, domain_id)
    if record.host is None:
        raise Problem(409, "conflict", "domain has no host yet", state=record.power.value)
    ticket = ctx.call_host(record.host, OpenConsole(domain_id=domain_id))
    assert isinstance(ticket, ConsoleTicket)
    return record.host, ticket


async def _refuse(websocket: WebSocket, problem: Problem) -> None:
    """Answer the handshake with the problem's HTTP status and body where the server supports
    denial responses; else close before accepting (clients then see a bare 403)."""
    mask: HostMask | None = getattr(websocket.state, "host_mask", None)
    body = await run_in_threadpool(mask.body, problem.body()) if mask else problem.body()
    response = JSONResponse(body, status_code=problem.status, media_type=PROBLEM_JSON)
    try:
        await websocket.send_denial_response(response)
    except RuntimeError:
        await websocket.close(code=4000 + problem.status, reason=str(body["detail"])[:120])


@router.websocket("/v1/domains/{domain_id}/console/attach")
async def console_attach(websocket: WebSocket, domain_id: uuid.UUID) -> None:
    ctx: ApiContext = websocket.app.state.ctx
    try:
        host, ticket = await run_in_threadpool(_open, ctx, websocket, domain_id)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(ticket.address, ticket.port), RELAY_CONNECT_S
        )
    except Problem as problem:
        await _refuse(websocket, problem)
        return
    except (OSError, TimeoutError) as exc:
        # Where the relay listens is the operator's business: logged, not told.
        log.warning("console relay unreachable", domain_id=str(domain_id), error=str(exc))
        await _refuse(websocket, Problem(503, "unavailable", "the console relay is unreachable"))
        return
    await websocket.accept()
    writer.write(ticket.ticket.encode() + b"\n")
    await writer.drain()
    log.info("console attached", domain_id=str(domain_id), host=host)

    async def keystrokes() -> None:
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("bytes") or (message.get("text") or "").encode()
                if data:
                    writer.write(data)
                    await writer.drain()

    async def output() -> None:
        while data := await reader.read(CHUNK):
            await websocket.send_bytes(data)

    tasks = [asyncio.create_task(keystrokes()), asyncio.create_task(output())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        # Read every outcome: a side that failed (the client gone mid-send) is not an error.
        await asyncio.gather(*tasks, return_exceptions=True)
        writer.close()
        with contextlib.suppress(Exception):
            await websocket.close()
        log.info("console detached", domain_id=str(domain_id))
