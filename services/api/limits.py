"""The request body limit: larger bodies are refused with 413 before they are parsed.

`BodyLimit` is plain ASGI middleware. A `Content-Length` over the limit is answered at once;
a body without one (chunked) is counted as it arrives and refused as soon as it passes the
limit, so neither is ever held in memory whole. The limit keeps every request far below what
one bus message carries (protos.codec.MAX_MESSAGE_BYTES): a command built from a request
cannot be refused by the broker or the service it is for.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.problems import Problem

DEFAULT_MAX_BODY_BYTES = 1024 * 1024


def too_large(limit: int) -> str:
    return f"the request body exceeds {limit} bytes"


# Bodies streamed to a pool's host as they arrive, never held (services/api/transfer.py):
# bounded by the image and volume size limits instead.
STREAMED = {("POST", "/v1/images"), ("POST", "/v1/volumes/upload")}


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope.get("method"), scope.get("path")) in STREAMED:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            problem = Problem(413, "too_large", too_large(self.max_bytes))
            await problem.response()(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the app's body read: FastAPI lets an HTTPException through
                    # (problems.py turns it into the same 413 document).
                    raise HTTPException(413, too_large(self.max_bytes))
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            # A malformed length is the server's (uvicorn's) to refuse; count the bytes.
            return int(text) if text.isdigit() else None
    return None
