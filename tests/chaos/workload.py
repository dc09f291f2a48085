"""Clients that cycle guests through the HTTP API (create, destroy, start, delete) from
threads of their own, recording every request and its answer for the checks at the end.

A request that cannot connect is sent to the other API replica (nothing was sent); one cut
off after it was sent (its replica died) has an unknown outcome, recorded as such, and the
client reads the domain back to go on from what really happened.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

# The answer of a request cut off after it was sent.
UNKNOWN = -1


@dataclass
class Outcome:
    """One mutating request and its answer."""

    client: int
    op: str  # create, start, destroy, delete
    name: str
    domain_id: str | None
    status: int  # HTTP status, or UNKNOWN
    code: str = ""  # the problem's code on a refusal
    state: str | None = None  # the domain's power state in the answer
    host: str | None = None
    seq: int | None = None
    at: float = 0.0


@dataclass
class Workload:
    api_urls: list[str]
    headers: dict[str, str]
    kernel: str
    clients: int
    # Client i forces its guests onto hosts[i] when set (admins may choose the host).
    hosts: dict[int, str] = field(default_factory=dict)
    cycles: int = 2  # destroy/start pairs per guest between its create and its delete
    outcomes: list[Outcome] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # name → domain id, every one made
    errors: list[str] = field(default_factory=list)  # a client's own failure (a violation)
    # A wait that ran out (a task under way for 60 s, a delete not done 30 s after its 202):
    # not a violation by itself, but where a slow run's time went.
    waits: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Workload:
        for i in range(self.clients):
            t = threading.Thread(target=self._client, args=(i,), name=f"chaos-client-{i}")
            t.start()
            self._threads.append(t)
        return self

    def join(self, timeout: float = 180.0) -> None:
        self.stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            self.errors.append(f"clients still running after {timeout:.0f} s: {alive}")

    def commands(self) -> int:
        with self._lock:
            return len(self.outcomes)

    # ---- one client -----------------------------------------------------------------------

    def _client(self, i: int) -> None:
        http = [httpx.Client(base_url=u, headers=self.headers, timeout=90) for u in self.api_urls]
        turn = itertools.count(i)
        try:
            for n in itertools.count():
                if self.stop.is_set():
                    return
                self._guest(i, n, http, turn)
        except Exception as exc:
            with self._lock:
                self.errors.append(f"client {i}: {type(exc).__name__}: {exc}")
        finally:
            for c in http:
                c.close()

    def _send(
        self,
        http: list[httpx.Client],
        turn: itertools.count[int],
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
    ) -> httpx.Response | None:
        """The answer of whichever replica takes it; None when it was cut off after it was
        sent. A replica that refuses the connection is skipped (nothing was sent)."""
        for _ in range(200):
            client = http[next(turn) % len(http)]
            try:
                return client.request(method, path, json=body)
            except httpx.ConnectError:
                time.sleep(0.05)  # that replica is down: the other one, or this one restarted
            except httpx.TransportError:
                return None
        raise RuntimeError(f"no API replica took {method} {path}")

    def _read(
        self, http: list[httpx.Client], turn: itertools.count[int], path: str
    ) -> httpx.Response:
        """A GET: safe to repeat, so repeated until a replica answers it."""
        for _ in range(600):
            r = self._send(http, turn, "GET", path)
            if r is not None and r.status_code != 503:
                return r
            time.sleep(0.1)
        raise RuntimeError(f"GET {path}: no answer")

    def _record(self, outcome: Outcome, r: httpx.Response | None) -> dict[str, Any] | None:
        body: dict[str, Any] | None = None
        if r is None:
            outcome.status = UNKNOWN
        else:
            outcome.status = r.status_code
            if r.content:
                try:
                    body = r.json()
                except ValueError:
                    body = None
            if isinstance(body, dict):
                outcome.code = str(body.get("code", ""))
                if r.status_code < 300:
                    outcome.state = body.get("state")
                    outcome.host = body.get("host")
                    outcome.seq = body.get("seq")
                    outcome.domain_id = outcome.domain_id or body.get("id")
                elif outcome.domain_id is None and body.get("domain_id"):
                    outcome.domain_id = str(body["domain_id"])
        outcome.at = time.monotonic()
        with self._lock:
            self.outcomes.append(outcome)
            if outcome.domain_id:
                self.names[outcome.name] = outcome.domain_id
        return body

    def _find(self, http: list[httpx.Client], turn: itertools.count[int], name: str) -> str | None:
        r = self._read(http, turn, f"/v1/domains?name={name}")
        found = r.json().get("domains", []) if r.status_code == 200 else []
        return str(found[0]["id"]) if found else None

    def _settled(
        self,
        http: list[httpx.Client],
        turn: itertools.count[int],
        domain_id: str,
        settled: tuple[str, ...] = ("none", "error"),
    ) -> dict[str, Any] | None:
        """The domain once its task is one of `settled` (None if gone); waits up to 60 s."""
        deadline = time.monotonic() + 60
        while True:
            r = self._read(http, turn, f"/v1/domains/{domain_id}")
            if r.status_code == 404:
                return None
            d: dict[str, Any] = r.json()
            if d["task"] in settled:
                return d
            if time.monotonic() > deadline:
                self._waited(f"{d['name']} ({domain_id}) still in task {d['task']} after 60 s", d)
                return d
            time.sleep(0.1)

    def _waited(self, what: str, d: dict[str, Any]) -> None:
        detail = f"state {d['state']}, host {d['host']}, seq {d['seq']}, fault {d['fault']}"
        with self._lock:
            self.waits.append(f"{time.strftime('%H:%M:%S')} {what}: {detail}")

    def _guest(self, i: int, n: int, http: list[httpx.Client], turn: itertools.count[int]) -> None:
        name = f"chaos-{i}-{n}"
        spec: dict[str, Any] = {
            "name": name,
            "vcpus": 1,
            "memory_mib": 32,
            "boot": {"kernel": self.kernel, "cmdline": "ready"},
        }
        if i in self.hosts:
            spec["placement"] = {"host": self.hosts[i]}
        r = self._send(http, turn, "POST", "/v1/domains", spec)
        self._record(created := Outcome(i, "create", name, None, 0), r)
        domain_id = created.domain_id or self._find(http, turn, name)
        if domain_id is None:
            return  # refused (or cut off before it was stored): nothing to clean up
        with self._lock:
            self.names[name] = domain_id
        for _ in range(self.cycles):
            if self.stop.is_set():
                break
            d = self._settled(http, turn, domain_id)
            if d is None or d["host"] is None:
                break
            op = "destroy" if d["state"] in ("running", "paused", "blocked") else "start"
            path = f"/v1/domains/{domain_id}/actions"
            r = self._send(http, turn, "POST", path, {"action": op})
            self._record(Outcome(i, op, name, domain_id, 0), r)
        self._delete(i, name, domain_id, http, turn)

    def _delete(
        self,
        i: int,
        name: str,
        domain_id: str,
        http: list[httpx.Client],
        turn: itertools.count[int],
    ) -> None:
        """DELETE until the domain is gone (a refusal or a cut-off request is retried).

        A domain left `deleting` by a DELETE that failed on the way (the API answers 503 or
        504 and keeps the task: "DELETE again to retry") or was cut off (its replica died) is
        deleted again at once; only an accepted DELETE (202) is waited for, its record going
        when the host's `domain.undefined` arrives."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            d = self._settled(http, turn, domain_id, settled=("none", "error", "deleting"))
            if d is None:
                return
            r = self._send(http, turn, "DELETE", f"/v1/domains/{domain_id}")
            self._record(Outcome(i, "delete", name, domain_id, 0), r)
            if r is not None and r.status_code in (204, 404):
                return
            if r is None or r.status_code != 202:
                time.sleep(0.5)  # refused or cut off: the fault behind it may be under way
                continue
            wait_until = time.monotonic() + 30
            while time.monotonic() < wait_until:
                if (left := self._read(http, turn, f"/v1/domains/{domain_id}")).status_code == 404:
                    return
                time.sleep(0.1)
            self._waited(f"{name} ({domain_id}) still there 30 s after its delete", left.json())
        with self._lock:
            self.errors.append(f"client {i}: {name} ({domain_id}) not deleted within 120 s")
