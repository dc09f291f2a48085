"""`flotilla up --broker-nodes 3`: the all-in-one stack on a private three-node RabbitMQ
cluster, every child given every node's URL; a guest can be created after kill -9 of the node
the services first connected to, and SIGTERM ends every process it started, the brokers too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.broker import _alive
from services.broker import available as broker_available
from tests.bootfiles import BOOT_DIR, KERNEL

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.cluster]


def _up(state_dir: Path, host: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    assert broker_available(), "flotilla up needs rabbitmq-server: apt-get install rabbitmq-server"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOTILLA_")}
    env["FLOTILLA_ALLOWED_BOOT_DIRS"] = str(BOOT_DIR)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "services.cli.main", "up", "--json", "--driver", "fake",
            "--broker-nodes", "3", "--state-dir", str(state_dir), "--listen", "127.0.0.1:0",
            "--host", host, "--timeout", "280",
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


def _beam_pid(state_dir: Path, i: int) -> int:
    return int((state_dir / "rabbitmq" / f"node{i}" / "rabbit.pid").read_text())


def test_up_on_a_three_node_cluster_survives_a_node_and_stops_everything(tmp_path: Path) -> None:
    host = f"upc-{uuid.uuid4().hex[:6]}"
    proc, up = _up(tmp_path, host)
    beams: list[int] = []
    try:
        urls = up["amqp_url"].split(",")
        assert len(set(urls)) == 3
        # Every child got the whole list.
        compute = tomllib.loads((tmp_path / "compute" / host / "compute.toml").read_text())
        assert compute["compute"]["amqp_url"] == up["amqp_url"]
        beams = [_beam_pid(tmp_path, i) for i in range(3)]
        assert all(_alive(pid) for pid in beams)
        headers = {"Authorization": f"Bearer {up['token']}"}
        with httpx.Client(base_url=up["api_url"], headers=headers, timeout=60) as c:
            first = c.post("/v1/domains", json={"name": "before", "boot": {"kernel": KERNEL}})
            assert first.status_code == 201, first.text
            # The node every service connected to first dies; they carry on the others.
            os.kill(beams[0], signal.SIGKILL)
            t0 = time.monotonic()
            after = c.post("/v1/domains", json={"name": "after", "boot": {"kernel": KERNEL}})
            assert after.status_code == 201, after.text
            assert after.json()["state"] == "running"
            print(f"\na guest created {time.monotonic() - t0:.2f} s after kill -9 of node 0")
            deadline = time.monotonic() + 30
            while c.get("/healthz").status_code != 200:
                assert time.monotonic() < deadline, c.get("/healthz").text
                time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(120) == 0
    for pid in [*up["pids"].values(), *beams]:
        assert not _alive(pid), pid
    assert not (tmp_path / "cli.json").exists()
