"""The API's side of a transfer: an HTTP body streamed to the pool's host, or a volume's
bytes streamed back, over the host's one-time-ticket TCP port (compute_node/storage_transfer.py).

Never whole in memory: each chunk of the request body goes out as a frame as it arrives
(backpressure through `drain`), each chunk from the host goes to the client as it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import structlog
from starlette.concurrency import run_in_threadpool

from protos.images import TransferTicket
from services.api.problems import Problem

log = structlog.get_logger("flotilla.api.transfer")

FRAME = struct.Struct(">I")
MAX_FRAME = 1 << 20
CONNECT_S = 5.0
ANSWER_S = 900.0  # a qcow2 conversion after the last byte may take minutes
SETTLE_S = 10.0  # how long a cut stream may take the host to notice it
T = TypeVar("T")
# The OpenAPI request body of a streamed upload route (FastAPI cannot infer it from a raw body).
OCTET_STREAM_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


class ClientGone(Exception):
    """The HTTP client went away mid-upload: the host was told (the stream cut short)."""


async def connect(ticket: TransferTicket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(ticket.address, ticket.port), CONNECT_S
        )
    except (OSError, TimeoutError) as exc:
        log.warning("transfer port unreachable", error=str(exc))
        raise Problem(503, "unavailable", "the pool's host takes no transfers now") from None
    writer.write(ticket.ticket.encode() + b"\n")
    return reader, writer


async def upload(ticket: TransferTicket, body: AsyncIterator[bytes]) -> dict[str, Any]:
    """Stream `body` to the host; its answer (the outcome, a JSON object). Raises
    ClientGone if the body ended early (the connection to the host is cut without the end
    mark, so the host stores nothing), Problem 503 if the host went away."""
    reader, writer = await connect(ticket)
    try:
        try:
            async for chunk in body:
                for pos in range(0, len(chunk), MAX_FRAME):
                    part = chunk[pos : pos + MAX_FRAME]
                    writer.write(FRAME.pack(len(part)) + part)
                    await writer.drain()
        except (OSError, ConnectionError) as exc:
            raise Problem(503, "unavailable", f"the pool's host went away: {exc}") from None
        except Exception as exc:  # the client disconnected (starlette's ClientDisconnect)
            raise ClientGone(str(exc)) from exc
        try:
            writer.write(FRAME.pack(0))
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), ANSWER_S)
        except (OSError, TimeoutError) as exc:
            raise Problem(503, "unavailable", f"the pool's host went away: {exc}") from None
        if not line:
            raise Problem(503, "unavailable", "the pool's host closed without an answer")
        answer: dict[str, Any] = json.loads(line)
        return answer
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()


async def upload_then_end(
    body: AsyncIterator[bytes], ticket: TransferTicket, end: Callable[[], T]
) -> T:
    """Stream `body` to the host, then `end` (the storage service's End… command, which
    records the host's outcome and raises it as a Problem if it failed). A body cut short is
    400 `truncated`, and `end` then forgets what was begun; a host that stopped reading (it
    refused: no space, a bad image...) answers with its reason, which `end` raises."""
    try:
        await upload(ticket, body)
    except ClientGone:
        log.info("upload cut short", ticket=ticket.ticket[:8])
        with contextlib.suppress(Problem):
            await _settle(end)
        raise Problem(400, "truncated", "the upload ended early: nothing was stored") from None
    except Problem as problem:
        try:
            await _settle(end)
        except Problem as outcome:
            raise outcome from None
        raise problem from None
    return await _settle(end)


async def _settle(end: Callable[[], T]) -> T:
    """`end`, again while the host says the stream still runs (a cut the API saw first
    reaches the host a moment later): never a record left `creating` for reconcile."""
    deadline = asyncio.get_running_loop().time() + SETTLE_S
    while True:
        try:
            return await run_in_threadpool(end)
        except Problem as problem:
            busy = problem.status == 409 and problem.extras.get("reason") == "busy"
            if not busy or asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(0.05)


async def download(ticket: TransferTicket) -> tuple[int, AsyncIterator[bytes]]:
    """The volume's size and its bytes from the host (its refusal as a Problem before any
    byte). The iterator checks the host's closing line: a stream cut short raises."""
    reader, writer = await connect(ticket)
    await writer.drain()
    first = json.loads(await asyncio.wait_for(reader.readline(), 60.0) or b"{}")
    if "size" not in first:
        writer.close()
        code = str(first.get("code") or "internal")
        status = {"busy": 409, "not_found": 404}.get(code, 503)
        raise Problem(status, "conflict" if status == 409 else code, str(first.get("message")))
    size = int(first["size"])

    async def chunks() -> AsyncIterator[bytes]:
        left = size
        try:
            while left > 0:
                data = await reader.read(min(left, MAX_FRAME))
                if not data:
                    raise ConnectionError(f"the host's stream ended {left} bytes short")
                left -= len(data)
                yield data
            end = json.loads(await asyncio.wait_for(reader.readline(), 60.0) or b"{}")
            log.info("volume downloaded", size=size, sha256=end.get("sha256"))
        finally:
            writer.close()

    return size, chunks()
