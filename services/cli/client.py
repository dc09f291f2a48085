"""The CLI's HTTP client for the Flotilla API, and the exit codes its failures map to.

Every API failure becomes an `ApiError` carrying the HTTP status, the problem+json body and the
exit code a script can test; nothing else in the CLI looks at HTTP status codes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import httpx


class Exit(IntEnum):
    """`flotilla`'s exit codes (docs/cli.md)."""

    OK = 0
    ERROR = 1  # anything not below: a server error, a guest that went to `error`
    USAGE = 2  # bad arguments, or a request body the API rejected (422)
    NOT_FOUND = 3  # no such domain or host (404), or a name matching several domains
    CONFLICT = 4  # the action is not allowed in the domain's state (409)
    UNAVAILABLE = 5  # no host can take it (503), or the API cannot be reached
    TIMEOUT = 6  # the state waited for did not come in time
    DENIED = 7  # no or a wrong token (401), or not allowed / over quota (403)


_EXIT_FOR_STATUS = {
    400: Exit.USAGE,
    401: Exit.DENIED,
    403: Exit.DENIED,
    404: Exit.NOT_FOUND,
    409: Exit.CONFLICT,
    413: Exit.USAGE,
    422: Exit.USAGE,
    502: Exit.UNAVAILABLE,
    503: Exit.UNAVAILABLE,
    504: Exit.UNAVAILABLE,
}


@dataclass
class ApiError(Exception):
    """A request that failed: `status` 0 when the API could not be reached."""

    status: int
    message: str
    problem: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> Exit:
        if self.status == 0:
            return Exit.UNAVAILABLE
        return _EXIT_FOR_STATUS.get(self.status, Exit.ERROR)

    def __str__(self) -> str:
        return self.message


def _problem_message(response: httpx.Response) -> tuple[str, dict[str, Any]]:
    """A one-line reason from a problem+json body (`detail`, then what helps act on it)."""
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text.strip()[:200]}", {}
    if not isinstance(body, dict):
        return f"HTTP {response.status_code}: {body}", {}
    detail = body.get("detail")
    if not isinstance(detail, str) or not detail:
        detail = str(body.get("title") or f"HTTP {response.status_code}")
    parts = [detail]
    errors = body.get("errors")
    if isinstance(errors, list):
        parts += [
            f"{e.get('field')}: {e.get('message')}"
            for e in errors[1:5]
            if isinstance(e, dict) and e.get("field")
        ]
    attempts = body.get("attempts")
    if isinstance(attempts, list) and attempts:
        parts += [
            f"{a.get('host')} refused: {a.get('code')}: {a.get('message')}"
            for a in attempts
            if isinstance(a, dict)
        ]
    fault = body.get("fault")
    if isinstance(fault, dict) and fault.get("message") and fault["message"] not in detail:
        parts.append(f"fault {fault.get('code', '')}: {fault['message']}")
    return "; ".join(parts), body


def problem_text(status: int, body: bytes) -> str:
    """The one-line reason of a problem+json answer that did not come through httpx (the
    console WebSocket's refused handshake)."""
    return _problem_message(httpx.Response(status, content=body))[0]


class Api:
    """Blocking client for /v1. Raises ApiError for any non-2xx answer or transport failure."""

    def __init__(self, base_url: str, token: str | None, *, timeout: float = 60.0) -> None:
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ApiError(0, f"{self.base_url}: timed out ({exc})") from None
        except httpx.TransportError as exc:
            raise ApiError(0, f"cannot reach the API at {self.base_url}: {exc}") from None
        self.raise_for(response)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    @staticmethod
    def raise_for(response: httpx.Response) -> None:
        """ApiError for a non-2xx answer (its body read)."""
        if response.status_code >= 400:
            message, problem = _problem_message(response)
            raise ApiError(response.status_code, message, problem)

    # Domains
    def list_domains(self, **filters: str) -> list[dict[str, Any]]:
        params = {k: v for k, v in filters.items() if v}
        body = self.request("GET", "/v1/domains", params=params)
        items = body.get("items", body.get("domains")) if isinstance(body, dict) else body
        return list(items or [])

    def get_domain(self, domain_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/domains/{domain_id}")
        return result

    def create_domain(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", "/v1/domains", json=body)
        return result

    def action(self, domain_id: str, action: str, **extra: Any) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.request(
            "POST", f"/v1/domains/{domain_id}/actions", json={"action": action, **extra}
        )
        return result

    def delete_domain(self, domain_id: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.request("DELETE", f"/v1/domains/{domain_id}")
        return result

    def console(self, domain_id: str, *, max_bytes: int | None = None) -> dict[str, Any]:
        params = {"max_bytes": str(max_bytes)} if max_bytes else {}
        result: dict[str, Any] = self.request(
            "GET", f"/v1/domains/{domain_id}/console", params=params
        )
        return result

    # Hosts
    def list_hosts(self) -> list[dict[str, Any]]:
        body = self.request("GET", "/v1/hosts")
        items = body.get("items", body.get("hosts")) if isinstance(body, dict) else body
        return list(items or [])

    def set_host(self, host: str, enabled: bool, reason: str = "") -> dict[str, Any] | None:
        verb = "enable" if enabled else "disable"
        body = {"reason": reason} if reason else None
        result: dict[str, Any] | None = self.request("POST", f"/v1/hosts/{host}/{verb}", json=body)
        return result

    def health(self) -> Any:
        return self.request("GET", "/healthz")

    # Events
    def events(
        self,
        pattern: str | None = None,
        *,
        since: str | None = None,
        domain: str | None = None,
        follow: bool = True,
        read_timeout: float | None = None,
    ) -> Iterator[SseEvent]:
        """Server-Sent Events from /v1/events, parsed; ends when the server ends the stream."""
        params: dict[str, str] = {}
        if pattern:
            params["pattern"] = pattern
        if since:
            params["since"] = since
        if domain:
            params["domain"] = domain
        if not follow:
            params["follow"] = "false"
        timeout = httpx.Timeout(10.0, read=read_timeout)
        try:
            with self.http.stream(
                "GET",
                "/v1/events",
                params=params,
                headers={"Accept": "text/event-stream"},
                timeout=timeout,
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    message, problem = _problem_message(response)
                    raise ApiError(response.status_code, message, problem)
                yield from parse_sse(response.iter_lines())
        except httpx.ReadTimeout:
            return
        except httpx.TransportError as exc:
            raise ApiError(0, f"event stream from {self.base_url} failed: {exc}") from None


@dataclass
class SseEvent:
    """One Server-Sent Event; `data` parsed as JSON when it is JSON."""

    event: str
    id: str | None
    data: Any


def parse_sse(lines: Iterator[str]) -> Iterator[SseEvent]:
    """The SSE wire format: fields until a blank line; comments (`:`) are keep-alives."""
    event, event_id = "message", None
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    payload: Any = json.loads(text)
                except ValueError:
                    payload = text
                yield SseEvent(event, event_id, payload)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value
