"""/v1/domains/{id}/console/attach: the guest's interactive console over a WebSocket.

The API asks the domain's compute node for a one-time ticket (`OpenConsole`), connects to that
node's console relay over TCP and copies bytes both ways: binary (or text) frames from the
client are keystrokes, console output comes back as binary frames. Authentication is the
usual bearer token, in the `Authorization` header or, for browsers that cannot set headers,
the `token` query parameter. A refusal closes the socket with code 4000 + the HTTP status
(4401, 4404, 4409, 4503) and the problem's detail as the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import structlog
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.concurrency import run_in_threadpool

from protos.commands import OpenConsole
from protos.replies import ConsoleTicket
from services.api.context import ApiContext
from services.api.problems import Problem

log = structlog.get_logger("flotilla.api.console")
router = APIRouter(tags=["domains"])
CHUNK = 65536


def _open(
    ctx: ApiContext, authorization: str | None, domain_id: uuid.UUID
) -> tuple[str, ConsoleTicket]:
    """Check the caller and the domain, and get a relay ticket from its host (or a Problem)."""
    caller = ctx.auth.principal(authorization)
    record = ctx.visible_domain(caller, domain_id)
    if record.host is None:
        raise Problem(409, "conflict", "domain has no host yet", state=record.power.value)
    ticket = ctx.call_host(record.host, OpenConsole(domain_id=domain_id))
    assert isinstance(ticket, ConsoleTicket)
    return record.host, ticket


@router.websocket("/v1/domains/{domain_id}/console/attach")
async def console_attach(
    websocket: WebSocket, domain_id: uuid.UUID, token: str | None = None
) -> None:
    ctx: ApiContext = websocket.app.state.ctx
    authorization = websocket.headers.get("authorization") or (f"Bearer {token}" if token else None)
    try:
        host, ticket = await run_in_threadpool(_open, ctx, authorization, domain_id)
        reader, writer = await asyncio.open_connection(ticket.address, ticket.port)
    except Problem as problem:
        await websocket.close(code=4000 + problem.status, reason=problem.detail[:120])
        return
    except OSError as exc:
        await websocket.close(code=4503, reason=f"console relay unreachable: {exc}"[:120])
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
        writer.close()
        with contextlib.suppress(Exception):
            await websocket.close()
        log.info("console detached", domain_id=str(domain_id))
