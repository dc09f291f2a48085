"""HTTP helpers for the end-to-end tests: every check goes through the API, as a user would."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from services.api.registry import Registry
from services.api.visibility import HOST_ALIAS_KEY_NAME, host_alias
from services.cli.stack import Stack


@dataclass
class E2E:
    """The running stack, its guest kernel and a client per token."""

    stack: Stack
    guest: Path
    tokens: dict[str, str]  # project → token; "admin" is the stack's admin token
    hosts: list[str]
    _clients: dict[str, httpx.Client] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return self.stack.api_url

    def client(self, project: str = "alice") -> httpx.Client:
        if project not in self._clients:
            self._clients[project] = httpx.Client(
                base_url=self.api_url,
                headers={"Authorization": f"Bearer {self.tokens[project]}"},
                timeout=60,
            )
        return self._clients[project]

    def alias(self, project: str, host: str) -> str:
        """What a member of `project` sees for `host` (host names are admin-only), with the
        key the stack's API keeps in its registry."""
        registry = Registry.open(f"sqlite:///{self.stack.state_dir / 'api' / 'registry.db'}")
        try:
            return host_alias(registry.access.secret(HOST_ALIAS_KEY_NAME), project, host)
        finally:
            registry.close()

    def aliases(self, project: str = "alice") -> set[str]:
        return {self.alias(project, h) for h in self.hosts}

    def close(self) -> None:
        for c in self._clients.values():
            c.close()

    def spec(self, cmdline: str = "ready", **kw: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": f"e2e-{uuid.uuid4().hex[:8]}",
            "vcpus": 1,
            "memory_mib": 32,
            "boot": {"kernel": str(self.guest), "cmdline": cmdline},
        }
        body.update(kw)
        return body


def ok(response: httpx.Response, status: int | tuple[int, ...] = (200, 201, 202)) -> Any:
    want = (status,) if isinstance(status, int) else status
    assert response.status_code in want, f"{response.status_code}: {response.text}"
    return response.json() if response.content else None


def wait_domain(
    client: httpx.Client,
    domain_id: str,
    state: str,
    timeout: float = 20.0,
    *,
    interval: float = 0.05,
) -> dict[str, Any]:
    """Poll until the domain is in `state` with no task under way (every `interval` s: a
    slower poll leaves the CPU to the guest where Python is emulated, in the hwvirt L1)."""
    deadline = time.monotonic() + timeout
    d: dict[str, Any] = {}
    while time.monotonic() < deadline:
        d = ok(client.get(f"/v1/domains/{domain_id}"), 200)
        if d["state"] == state and d["task"] == "none":
            return d
        time.sleep(interval)
    raise AssertionError(f"domain {domain_id} not {state}: {d}")


def wait_gone(client: httpx.Client, domain_id: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get(f"/v1/domains/{domain_id}").status_code == 404:
            return
        time.sleep(0.05)
    raise AssertionError(f"domain {domain_id} still listed")


def wait_console(
    client: httpx.Client,
    domain_id: str,
    text: str,
    count: int = 1,
    timeout: float = 15.0,
    *,
    interval: float = 0.05,
) -> str:
    deadline = time.monotonic() + timeout
    data = ""
    while time.monotonic() < deadline:
        data = ok(client.get(f"/v1/domains/{domain_id}/console"), 200)["data"]
        if data.count(text) >= count:
            return str(data)
        time.sleep(interval)
    raise AssertionError(f"{text!r} x{count} not on the console: {data[-500:]!r}")


def sse_events(
    client: httpx.Client, *, follow: bool = False, timeout: float = 10.0, **params: Any
) -> list[dict[str, Any]]:
    """Parsed `data` of the SSE frames /v1/events sends (the logged ones when not following)."""
    query = {"follow": "true" if follow else "false", **params}
    found: list[dict[str, Any]] = []
    with client.stream(
        "GET", "/v1/events", params=query, timeout=httpx.Timeout(timeout)
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        event_id = None
        for line in response.iter_lines():
            if line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:].strip())
                assert str(data["id"]) == event_id  # the SSE id is the log row id
                found.append(data)
    return found


def domain_events(
    client: httpx.Client, domain_id: str, until: int, timeout: float = 10.0
) -> list[tuple[str, str]]:
    """(type, detail) of the domain's logged events, once at least `until` are logged."""
    deadline = time.monotonic() + timeout
    got: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        got = sse_events(client, domain=domain_id, since_seq=0)
        if len(got) >= until:
            break
        time.sleep(0.1)
    seqs = [e["seq"] for e in got]
    assert seqs == sorted(seqs), seqs
    return [(e["type"], str(e["event"].get("detail", ""))) for e in got]
