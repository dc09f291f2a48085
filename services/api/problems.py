"""Errors as RFC 9457 problem details (`application/problem+json`).

Every error the API returns has `type` (`urn:flotilla:problem:<code>`), `title`, `status`,
`detail` and `code`, plus extras that let a caller act: `field` for 422, `state` for 409,
`resource`/`limit`/`used` for 403 over quota, `fault`/`attempts` for 503 `no_valid_host`.
"""

from __future__ import annotations

import re
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


def _malformed(detail: str) -> Problem:
    return Problem(400, "malformed_body", detail, title="Malformed request body", field="body")


def _allowed_methods(request: Request) -> str:
    """Every method the path takes, from the OpenAPI document (Starlette names only the
    methods of the first route whose path matched)."""
    index: list[tuple[re.Pattern[str], set[str], bool]] | None = getattr(
        request.app.state, "methods_by_path", None
    )
    if index is None:
        index = []
        for template, operations in request.app.openapi().get("paths", {}).items():
            pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
            literal = "{" not in template
            index.append((re.compile(pattern), {m.upper() for m in operations}, literal))
        request.app.state.methods_by_path = index
    path = request.scope.get("path", "")
    matches = [(m, literal) for rx, m, literal in index if rx.fullmatch(path)]
    # A path that is a route of its own (/v1/volumes/upload) is not also the template's
    # (/v1/volumes/{volume_id}): its literal route is what answers it.
    if any(literal for _, literal in matches):
        matches = [(m, literal) for m, literal in matches if literal]
    allowed = set().union(*(m for m, _ in matches))
    return ", ".join(sorted(allowed))


def install(app: FastAPI) -> None:
    """Make every error a problem document, FastAPI's own 400, 404, 405 and 422 included, and
    say so in the OpenAPI document."""

    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        # Masking may read the registry's host names: not on the event loop.
        return await run_in_threadpool(exc.response, request)

    async def on_validation(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        for err in exc.errors():
            if err.get("type") == "json_invalid":  # loc is ("body", offset): not a field
                offset = err["loc"][-1]
                reason = err.get("ctx", {}).get("error", "JSON decode error")
                return _malformed(f"the body is not JSON: {reason} at byte {offset}").response()
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

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        headers = dict(exc.headers or {})
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's "There was an error parsing the body" hides the reason: name it.
            cause = exc.__cause__
            return _malformed(
                f"the body cannot be read: {type(cause).__name__}: {cause}"
            ).response()
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        code = {
            401: "unauthorized",
            404: "not_found",
            405: "method_not_allowed",
            413: "too_large",
        }.get(exc.status_code, "http_error")
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return Problem(exc.status_code, code, detail, headers=headers).response()

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_problems(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def document_problems(schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document as the API answers: every 4xx/5xx is `application/problem+json`
    with a ProblemDetail (FastAPI declares its own 422 as `application/json` with its
    validation model), and an operation that reads a body also answers 400 (malformed) and
    413 (too large)."""
    ref = {"$ref": "#/components/schemas/ProblemDetail"}
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            answers = operation.setdefault("responses", {})
            statuses = ["422"] if operation.get("parameters") else []
            if "requestBody" in operation:
                statuses += ["400", "413", "422"]
            for status in statuses:
                answers.setdefault(status, {"description": HTTPStatus(int(status)).phrase})
            for status, answer in answers.items():
                if int(status) >= 400:
                    answer["content"] = {PROBLEM_JSON: {"schema": ref}}
                    if status == "422":
                        answer["description"] = "Invalid request"
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    components.setdefault("ProblemDetail", ProblemDetail.model_json_schema())
    return schema


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
