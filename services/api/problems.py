"""Errors as RFC 9457 problem details (`application/problem+json`).

Every error the API returns has `type` (`urn:flotilla:problem:<code>`), `title`, `status`,
`detail` and `code`, plus extras that let a caller act: `field` for 422, `state` for 409,
`resource`/`limit`/`used` for 403 over quota, `fault`/`attempts` for 503 `no_valid_host`.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_JSON = "application/problem+json"


def problem_type(code: str) -> str:
    return f"urn:flotilla:problem:{code}"


class ProblemDetail(BaseModel):
    """The body of every error response (documented in the OpenAPI schema)."""

    model_config = ConfigDict(extra="allow")
    type: str
    title: str
    status: int
    detail: str
    code: str


class Problem(Exception):
    """Raise from an endpoint to answer with a problem document."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extras: Any,
    ) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.headers = headers
        self.extras = extras

    def body(self) -> dict[str, Any]:
        return {
            "type": problem_type(self.code),
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
            **self.extras,
        }

    def response(self, request: Request | None = None) -> JSONResponse:
        """The problem document; for a `request` whose caller is a member, with host names
        masked (services.api.visibility)."""
        body = self.body()
        mask = getattr(request.state, "host_mask", None) if request is not None else None
        if mask is not None:
            body = mask.body(body)
        return JSONResponse(
            body, status_code=self.status, media_type=PROBLEM_JSON, headers=self.headers
        )


def not_found(what: str) -> Problem:
    return Problem(404, "not_found", f"{what} not found")


def _field(loc: tuple[int | str, ...]) -> str:
    # ("body", "boot", "kernel") → "boot.kernel"; ("query", "state") → "state".
    parts = (
        [str(p) for p in loc[1:]]
        if loc and loc[0] in ("body", "query", "path")
        else [str(p) for p in loc]
    )
    return ".".join(parts) or str(loc[0] if loc else "body")


def install(app: FastAPI) -> None:
    """Make every error a problem document, FastAPI's own 422 and 404 included."""

    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        # Masking may read the registry's host names: not on the event loop.
        return await run_in_threadpool(exc.response, request)

    async def on_validation(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {
                "field": _field(tuple(err.get("loc", ()))),
                "in": str(err.get("loc", ("body",))[0]),
                "message": str(err.get("msg", "")),
            }
            for err in exc.errors()
        ]
        first = errors[0] if errors else {"field": "body", "message": "invalid"}
        return Problem(
            422,
            "invalid",
            f"{first['field']}: {first['message']}",
            title="Invalid request",
            field=first["field"],
            errors=errors,
        ).response()

    async def on_http(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {
            401: "unauthorized",
            404: "not_found",
            405: "method_not_allowed",
            413: "too_large",
        }.get(exc.status_code, "http_error")
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return Problem(exc.status_code, code, detail, headers=dict(exc.headers or {})).response()

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the problem statuses an endpoint may return."""
    return {
        status: {
            "model": ProblemDetail,
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_JSON: {}},
        }
        for status in statuses
    }
