"""`flotilla up` as a user runs it: ready, its token and URL written for the CLI, and on
SIGTERM every guest deleted and every child process gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path
from typing import Any

import httpx
import pika
import pika.exceptions
import pytest

from services.broker import _alive
from services.broker import available as broker_available
from tests.e2e.harness import E2E, ok, wait_console, wait_domain


def _up(state_dir: Path, host: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """`flotilla up --json` on its own private broker node, as on a fresh machine (on the
    session's broker its scheduler and API would compete with the other stack's for the same
    queues); returns the process and its ready line."""
    assert broker_available(), "flotilla up needs rabbitmq-server: apt-get install rabbitmq-server"
    env = {k: v for k, v in os.environ.items() if k != "FLOTILLA_AMQP_URL"}
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "services.cli.main", "up", "--json",
            "--state-dir", str(state_dir), "--listen", "127.0.0.1:0", "--host", host,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(proc.stderr.read() if proc.stderr else "flotilla up said nothing")
    up: dict[str, Any] = json.loads(line)
    return proc, up


def _vmm_pids(state_dir: Path, host: str) -> list[int]:
    return [int(p.read_text()) for p in state_dir.glob(f"compute/{host}/domains/*/vmm.pid")]


def test_flotilla_up_serves_then_stops_cleanly_deleting_guests(e2e: E2E, tmp_path: Path) -> None:
    host = f"up-{uuid.uuid4().hex[:6]}"
    proc, up = _up(tmp_path, host)
    try:
        assert up["hosts"] == [host]
        saved = json.loads((tmp_path / "cli.json").read_text())
        assert saved["api_url"] == up["api_url"]
        assert saved["token"] == up["token"]
        assert (tmp_path / "cli.json").stat().st_mode & 0o077 == 0
        with httpx.Client(
            base_url=up["api_url"], headers={"Authorization": f"Bearer {up['token']}"}
        ) as c:
            assert c.get("/healthz").status_code == 200
            d = ok(c.post("/v1/domains", json=e2e.spec()), 201)
            assert d["host"] == host
            wait_console(c, d["id"], "READY")
            # A guest that powered itself off with on_poweroff=preserve: its VMM stays.
            kept = ok(
                c.post("/v1/domains", json=e2e.spec("ready poweroff", on_poweroff="preserve")),
                201,
            )
            wait_domain(c, kept["id"], "shutoff")
            # The storage service runs, with the node's `dir` pool under the state dir.
            [pool] = ok(c.get("/v1/pools"), 200)["pools"]
            assert (pool["name"], pool["kind"], pool["host"]) == ("default", "dir", host)
            volume = ok(c.post("/v1/volumes", json={"name": "v", "size": 1 << 20}), 201)
            pool_dir = tmp_path / "compute" / host / "pools" / "default"
            assert (pool_dir / "volumes" / volume["id"]).stat().st_size == 1 << 20
        assert "storage" in up["pids"]
        vmm_pids = _vmm_pids(tmp_path, host)
        assert len(vmm_pids) == 2
        assert all(_alive(pid) for pid in vmm_pids)
        # The CLI finds the stack through the state dir alone.
        listed = subprocess.run(
            [sys.executable, "-m", "services.cli.main", "--state-dir", str(tmp_path), "list"],
            capture_output=True,
            text=True,
            check=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("FLOTILLA_")},
        )
        assert d["name"] in listed.stdout
        # The private broker has no guest user: another local user cannot log in with the
        # well-known guest:guest; the node's own user's password is readable by root only.
        amqp = pika.URLParameters(_amqp_url(tmp_path / "compute" / host / "compute.toml"))
        assert amqp.credentials.username == "flotilla"
        assert amqp.credentials.password != "guest"
        guest = pika.ConnectionParameters(
            "127.0.0.1", amqp.port, credentials=pika.PlainCredentials("guest", "guest")
        )
        with pytest.raises(pika.exceptions.ProbableAuthenticationError):
            pika.BlockingConnection(guest)
        pika.BlockingConnection(amqp).close()
        for secret in (
            tmp_path / "rabbitmq" / "amqp-password",
            tmp_path / "rabbitmq" / "rabbitmq.conf",
            tmp_path / "api" / "api.toml",
            tmp_path / "compute" / host / "compute.toml",
        ):
            assert secret.stat().st_mode & 0o077 == 0, secret
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
    for pid in [*up["pids"].values(), *vmm_pids]:
        assert not _alive(pid), pid
    assert not (tmp_path / "cli.json").exists()


def _amqp_url(compute_toml: Path) -> str:
    settings = tomllib.loads(compute_toml.read_text())
    url: str = settings["compute"]["amqp_url"]
    return url


def test_flotilla_up_ends_the_guests_of_a_compute_node_that_died(e2e: E2E, tmp_path: Path) -> None:
    host = f"up-{uuid.uuid4().hex[:6]}"
    proc, up = _up(tmp_path, host)
    try:
        with httpx.Client(
            base_url=up["api_url"], headers={"Authorization": f"Bearer {up['token']}"}
        ) as c:
            d = ok(c.post("/v1/domains", json=e2e.spec()), 201)
            wait_console(c, d["id"], "READY")
        vmm_pids = _vmm_pids(tmp_path, host)
        assert len(vmm_pids) == 1
        # The compute node dies first; its VMM runs on (its own session, reparented).
        os.kill(up["pids"][f"compute {host}"], signal.SIGKILL)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(60)
    for pid in [*up["pids"].values(), *vmm_pids]:
        assert not _alive(pid), pid
