"""The same flows through `flotilla` (a subprocess per command, as a user or a script runs it):
output, --json, waits, and the exit codes docs/cli.md promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest

from tests.e2e.harness import E2E


class Cli:
    def __init__(self, e2e: E2E, project: str = "alice") -> None:
        self.env = {
            **os.environ,
            "FLOTILLA_API_URL": e2e.api_url,
            "FLOTILLA_TOKEN": e2e.tokens[project],
        }

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli.main", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ok(self, *args: str) -> str:
        r = self.run(*args)
        assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
        return r.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok("--json", *args))


@pytest.fixture
def cli(e2e: E2E) -> Cli:
    return Cli(e2e)


def test_cli_lifecycle_with_waits_tables_and_events(e2e: E2E, cli: Cli) -> None:
    name = f"cli-{uuid.uuid4().hex[:6]}"
    out = cli.ok(
        "create", "--name", name, "--kernel", str(e2e.guest), "--cmdline", "ready",
        "--memory", "32",
    )  # fmt: skip
    assert "State:   running" in out
    assert name in cli.ok("list")
    info = cli.json("dominfo", name)
    assert info["state"] == "running"
    assert info["host"] in e2e.aliases()
    # By uuid as well as by name.
    assert cli.json("dominfo", info["id"])["name"] == name
    assert "READY vcpus=1 memory_mib=32" in cli.ok("console", name)
    assert cli.json("suspend", name)["state"] == "paused"
    assert cli.json("resume", name)["state"] == "running"
    assert "rebooted" in cli.ok("reboot", name)
    assert cli.json("shutdown", name)["state"] == "shutoff"
    assert cli.json("start", name)["state"] == "running"
    assert cli.json("destroy", name)["state"] == "shutoff"
    events = cli.ok("events", "--domain", name).splitlines()
    kinds = [line.split()[1] for line in events]
    assert kinds == [
        "domain.defined",
        "domain.started",
        "domain.suspended",
        "domain.resumed",
        "domain.rebooted",
        "domain.shutdown",
        "domain.stopped",
        "domain.started",
        "domain.stopped",
    ]
    started = [json.loads(x) for x in cli.ok("--json", "events", "domain.started.*").splitlines()]
    assert [e["data"]["domain_id"] for e in started].count(info["id"]) == 2
    assert "deleted" in cli.ok("delete", name)
    r = cli.run("dominfo", name)
    assert r.returncode == 3, r.stderr
    assert "not found" in r.stderr
    # A deleted domain's history stays readable by uuid (and ends with its undefine).
    history = cli.ok("events", "--domain", info["id"]).splitlines()
    assert [line.split()[1] for line in history] == [*kinds, "domain.undefined"]


def test_cli_create_from_a_yaml_spec_with_anti_affinity(e2e: E2E, cli: Cli, tmp_path: Any) -> None:
    group = f"g-{uuid.uuid4().hex[:6]}"
    names = [f"aa-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"vcpus: 1\nmemory_mib: 32\nboot:\n  kernel: {e2e.guest}\n  cmdline: ready\n")
    try:
        hosts = {
            cli.json("create", "-f", str(spec), "--name", n, "--group", group, "--anti-affinity")[
                "host"
            ]
            for n in names
        }
        assert hosts == e2e.aliases()
        table = cli.ok("list")
        assert all(n in table for n in names)
        # No third host for the group: 503 → exit 5, the fault on stderr.
        r = cli.run(
            "create", "-f", str(spec), "--name", f"aa-{uuid.uuid4().hex[:6]}", "--group", group
        )
        assert r.returncode == 5, (r.stdout, r.stderr)
        assert "no" in r.stderr.lower()
    finally:
        for d in json.loads(cli.ok("--json", "list")):
            if d["name"].startswith("aa-"):
                cli.run("delete", d["id"])


def test_cli_exit_codes(e2e: E2E, cli: Cli) -> None:
    # 2: usage, and a body the API rejects as invalid (the field named).
    assert cli.run("create").returncode == 2
    r = cli.run("create", "--name", "x", "--kernel", str(e2e.guest), "--vcpus", "0")
    assert r.returncode == 2
    assert "vcpus" in r.stderr
    # 3: not found.
    assert cli.run("dominfo", "no-such-domain").returncode == 3
    assert cli.run("start", str(uuid.uuid4())).returncode == 3
    # 4: the state forbids the action.
    name = f"cli-{uuid.uuid4().hex[:6]}"
    assert (
        cli.json("create", "--name", name, "--kernel", str(e2e.guest), "--no-start")["state"]
        == "shutoff"
    )
    r = cli.run("suspend", name)
    assert r.returncode == 4, r.stderr
    assert "shutoff" in r.stderr
    # 5: nothing can fit it.
    r = cli.run("create", "--name", "huge", "--kernel", str(e2e.guest), "--memory", "1048576")
    assert r.returncode == 5, r.stderr
    assert "no host can take this domain: filters:" in r.stderr
    assert "memory removed" in r.stderr  # whatever other filters say about other hosts
    cli.run("delete", "huge")
    # 7: denied (member asking for hosts; a bad token).
    assert cli.run("hosts").returncode == 7
    assert cli.run("--token", "wrong-token-xyz", "list").returncode == 7
    # 5: no API there.
    assert cli.run("--api", "http://127.0.0.1:9", "list").returncode == 5
    # Another project's token: not found.
    assert Cli(e2e, "bob").run("dominfo", name).returncode == 3
    cli.ok("delete", name)


def test_cli_over_quota_is_7(e2e: E2E) -> None:
    capped = Cli(e2e, "capped")
    first = f"q-{uuid.uuid4().hex[:6]}"
    capped.ok("create", "--name", first, "--kernel", str(e2e.guest), "--no-start")
    try:
        r = capped.run("create", "--name", "q-second", "--kernel", str(e2e.guest), "--no-start")
        assert r.returncode == 7, r.stderr
        assert "quota" in r.stderr.lower()
    finally:
        capped.ok("delete", first)


def test_cli_hosts_for_an_admin(e2e: E2E) -> None:
    admin = Cli(e2e, "admin")
    hosts = admin.json("hosts")
    assert {h["name"] for h in hosts} >= set(e2e.hosts)
    table = admin.ok("hosts")
    assert all(h in table for h in e2e.hosts)
    host = e2e.hosts[1]
    admin.ok("hosts", "disable", host, "--reason", "e2e")
    try:
        assert any(h["name"] == host and not h["enabled"] for h in admin.json("hosts"))
    finally:
        admin.ok("hosts", "enable", host)
        deadline = time.monotonic() + 10
        while not any(h["name"] == host and h["enabled"] for h in admin.json("hosts")):
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_cli_the_default_network_and_a_project_network(e2e: E2E, cli: Cli) -> None:
    admin = Cli(e2e, "admin")
    (default,) = [n for n in admin.json("net-list") if n["name"] == "default"]
    assert (default["mode"], default["shared"], default["project"]) == ("nat", True, "admin")
    assert any(n["name"] == "default" for n in cli.json("net-list"))  # every project sees it
    r = cli.run("net-delete", "default")
    assert r.returncode == 7, r.stderr  # shared: only an admin deletes it
    name = f"n-{uuid.uuid4().hex[:6]}"
    cli.ok("net-create", name, "--subnet", "10.201.0.0/24")
    try:
        assert "10.201.0.1" in cli.ok("net-info", name)
        r = Cli(e2e, "bob").run("net-info", name)
        assert r.returncode == 3, r.stderr  # another project's: not found
    finally:
        cli.ok("net-delete", name)
