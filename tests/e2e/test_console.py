"""The interactive console: keystrokes in and output out over the API's WebSocket
(`/v1/domains/{id}/console/attach`), and `flotilla console --follow` on top of it. The test
guest's `echo` action echoes COM1 input back, prefixed, line by line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.e2e.harness import E2E, ok, wait_console, wait_domain, wait_gone


@pytest.fixture
def echo_guest(e2e: E2E) -> Iterator[dict[str, Any]]:
    c = e2e.client()
    d = ok(c.post("/v1/domains", json=e2e.spec("ready echo")), 201)
    wait_domain(c, d["id"], "running")
    wait_console(c, d["id"], "READY")
    yield d
    ok(c.delete(f"/v1/domains/{d['id']}"), (202, 204))
    wait_gone(c, d["id"])


def ws_url(e2e: E2E, domain_id: str) -> str:
    return e2e.api_url.replace("http://", "ws://") + f"/v1/domains/{domain_id}/console/attach"


def test_keystrokes_reach_the_guest_and_its_echo_comes_back(
    e2e: E2E, echo_guest: dict[str, Any]
) -> None:
    headers = {"Authorization": f"Bearer {e2e.tokens['alice']}"}
    with connect(ws_url(e2e, echo_guest["id"]), additional_headers=headers) as ws:
        ws.send(b"hello flotilla\r")
        seen = b""
        deadline = time.monotonic() + 10
        while b"flotilla-guest: hello flotilla" not in seen:
            assert time.monotonic() < deadline, seen[-300:]
            frame = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
            seen += frame if isinstance(frame, bytes) else frame.encode()
    # The echo is in the console log too.
    wait_console(e2e.client(), echo_guest["id"], "flotilla-guest: hello flotilla")


def test_another_projects_token_cannot_attach(e2e: E2E, echo_guest: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {e2e.tokens['bob']}"}
    with (
        pytest.raises(InvalidStatus) as refused,
        connect(ws_url(e2e, echo_guest["id"]), additional_headers=headers),
    ):
        pass
    assert refused.value.response.status_code == 404
    with pytest.raises(InvalidStatus) as anonymous, connect(ws_url(e2e, echo_guest["id"])):
        pass
    assert anonymous.value.response.status_code == 401


def test_cli_console_follow_sends_stdin_and_prints_the_echo(
    e2e: E2E, echo_guest: dict[str, Any]
) -> None:
    env = {**os.environ, "FLOTILLA_API_URL": e2e.api_url, "FLOTILLA_TOKEN": e2e.tokens["alice"]}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "console", echo_guest["name"], "--follow"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(b"ping from the cli\r")
        proc.stdin.flush()
        out = b""
        deadline = time.monotonic() + 15
        os.set_blocking(proc.stdout.fileno(), False)
        while b"flotilla-guest: ping from the cli" not in out:
            assert proc.poll() is None, (out, proc.stderr.read() if proc.stderr else b"")
            assert time.monotonic() < deadline, out[-300:]
            chunk = proc.stdout.read()
            if chunk:
                out += chunk
            else:
                time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)


def test_a_busy_console_is_refused_before_the_upgrade(e2e: E2E, echo_guest: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {e2e.tokens['alice']}"}
    env = {**os.environ, "FLOTILLA_API_URL": e2e.api_url, "FLOTILLA_TOKEN": e2e.tokens["alice"]}
    with connect(ws_url(e2e, echo_guest["id"]), additional_headers=headers) as first:
        with (
            pytest.raises(InvalidStatus) as refused,
            connect(ws_url(e2e, echo_guest["id"]), additional_headers=headers),
        ):
            pass
        response = refused.value.response
        assert response.status_code == 409
        assert response.headers["Content-Type"] == "application/problem+json"
        assert b"another client is attached" in response.body
        cli = subprocess.run(
            [sys.executable, "-m", "services.cli.main", "console", echo_guest["name"], "--follow"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env,
            timeout=30,
            check=False,
        )
        assert cli.returncode == 4, (cli.stdout, cli.stderr)  # Exit.CONFLICT
        assert b"console is busy: another client is attached" in cli.stderr
        # The first client still has the console.
        first.send(b"still mine\r")
        seen = b""
        deadline = time.monotonic() + 10
        while b"flotilla-guest: still mine" not in seen:
            assert time.monotonic() < deadline, seen[-300:]
            frame = first.recv(timeout=max(0.1, deadline - time.monotonic()))
            seen += frame if isinstance(frame, bytes) else frame.encode()
    # Detached: the console is free again.
    deadline = time.monotonic() + 10
    while True:
        try:
            with connect(ws_url(e2e, echo_guest["id"]), additional_headers=headers):
                break
        except InvalidStatus:
            assert time.monotonic() < deadline
            time.sleep(0.1)
