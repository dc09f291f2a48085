"""Every request gets an id: the `X-Request-Id` response header, and the correlation id of
every command the request sends and so of every event those commands cause (docs/api.md)."""

from __future__ import annotations

import uuid

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.bus import Cause, caused_by

HEADER = "X-Request-Id"


class RequestIdMiddleware:
    """Pure ASGI, so the cause it sets is the context every endpoint runs in (sync endpoints
    run in a thread that copies it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = f"req-{uuid.uuid4()}"
        header = (HEADER.lower().encode(), request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], header]
            await send(message)

        with (
            caused_by(Cause(correlation_id=request_id)),
            structlog.contextvars.bound_contextvars(request_id=request_id),
        ):
            await self.app(scope, receive, send_with_id)
