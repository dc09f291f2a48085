"""`flotilla migrate`, migrate-setmaxdowntime, migrate-setspeed, domjobinfo, domjobabort and
evacuate: arguments checked before any request, then each verb against the real API app
(its scheduler and the source's job answered as in tests/unit/test_api_migration.py)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from protos.migration import AbortMigration, MigrateDomain, SetMigrationParams
from services.api import create_app
from services.api.registry import Registry
from services.bus import RemoteError
from services.cli.client import Api, ApiError, Exit
from services.cli.domains import Session
from services.cli.main import build_parser
from services.cli.migration import JobBar, migrate_body
from tests.unit.test_api import ADMIN, CONFIG, auth, beat, create
from tests.unit.test_api_migration import MigratingCloud
from tests.unit.test_cli_args import NOWHERE, usage_error


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["migrate", "d", "--max-downtime", "0"], "argument --max-downtime: must be more than 0"),
        (["migrate", "d", "--bandwidth", "-1"], "argument --bandwidth: must be 0 (no cap)"),
        (["migrate", "d", "--timeout", "x"], "argument --timeout: not a number of seconds"),
        (["migrate", "d", "--timeout-action", "postcopy"], "argument --timeout-action: invalid"),
        (["migrate", "d", "--live", "--offline"], "not allowed with argument --live"),
        (["migrate-setmaxdowntime", "d", "-5"], "argument MS: must be more than 0"),
        (["migrate-setspeed", "d", "fast"], "argument MiBps: not a whole number"),
    ],
)
def test_bad_migration_arguments_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in usage_error([*NOWHERE, *argv], capsys)


def test_the_body_holds_what_was_given() -> None:
    parse = build_parser().parse_args
    assert migrate_body(parse(["migrate", "d"])) == {}
    args = parse(
        [
            "migrate",
            "d",
            "--offline",
            "--host",
            "h3",
            "--max-downtime",
            "40",
            "--bandwidth",
            "0",
            "--timeout",
            "30",
            "--timeout-action",
            "pause",
        ]
    )
    assert migrate_body(args) == {
        "live": False,
        "host": "h3",
        "max_downtime_ms": 40.0,
        "bandwidth_mibps": 0,
        "timeout_s": 30.0,
        "timeout_action": "pause",
    }
    # The migration's --timeout is its own: the global one still bounds --wait.
    both = parse(["--timeout", "300", "migrate", "d", "--timeout", "20", "--wait"])
    assert (both.timeout, both.migration_timeout, both.wait) == (300.0, 20.0, True)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Registry, MigratingCloud, TestClient]]:
    registry = Registry.open(f"sqlite:///{tmp_path}/registry.db")
    cloud = MigratingCloud(tmp_path, registry)
    with TestClient(create_app(CONFIG, registry=registry, bus=cloud)) as client:
        yield registry, cloud, client
    cloud.close()
    registry.close()


def run(client: TestClient, argv: list[str]) -> int:
    """One verb, its requests going to the in-process API as an admin."""
    args: argparse.Namespace = build_parser().parse_args(argv)
    api = Api("http://testserver", ADMIN)
    api.http.close()
    api.http = client
    client.headers.update(auth(ADMIN))
    session = Session(api=api, json=args.json, wait=False, timeout=getattr(args, "timeout", 5.0))
    result: int = args.func(session, args)
    return result


def test_migrate_and_the_job_verbs(
    stack: tuple[Registry, MigratingCloud, TestClient], capsys: pytest.CaptureFixture[str]
) -> None:
    _registry, cloud, client = stack
    d = create(client)
    capsys.readouterr()
    assert run(client, ["migrate", d["name"], "--host", "h3", "--max-downtime", "40"]) == 0
    assert f"Migration of '{d['name']}' to h3 started (live)" in capsys.readouterr().out
    [(_, sent)] = cloud.sent(MigrateDomain)
    assert isinstance(sent, MigrateDomain)
    assert (sent.target, sent.params.max_downtime_ms) == ("h3", 40.0)
    assert run(client, ["domjobinfo", d["name"]]) == 0
    info = capsys.readouterr().out
    for line in ("Job type:", "Unbounded", "Phase:", "precopy", "Target:", "h3", "Data total:"):
        assert line in info
    assert run(client, ["migrate-setmaxdowntime", d["name"], "25"]) == 0
    assert run(client, ["migrate-setspeed", d["name"], "64"]) == 0
    sets = [c for _, c in cloud.sent(SetMigrationParams) if isinstance(c, SetMigrationParams)]
    assert [(c.max_downtime_ms, c.bandwidth_mibps) for c in sets] == [(25.0, None), (None, 64)]
    assert "bandwidth cap 64 MiB/s" in capsys.readouterr().out
    assert run(client, ["--json", "domjobabort", d["name"]]) == 0
    assert '"phase": "cancelled"' in capsys.readouterr().out
    assert len(cloud.sent(AbortMigration)) == 1


def test_a_queued_migration_says_its_place(
    stack: tuple[Registry, MigratingCloud, TestClient], capsys: pytest.CaptureFixture[str]
) -> None:
    _registry, cloud, client = stack
    d = create(client)
    cloud.queued = 2
    capsys.readouterr()
    assert run(client, ["migrate", d["name"]]) == 0
    assert f"Migration of '{d['name']}' to h2 queued (live): place 2" in capsys.readouterr().out
    assert run(client, ["domjobinfo", d["name"]]) == 0
    info = capsys.readouterr().out
    assert "queued" in info
    assert [line.split()[-1] for line in info.splitlines() if "Queue position" in line] == ["2"]
    r = client.get(f"/v1/domains/{d['id']}/job", headers=auth(ADMIN))
    assert (r.json()["phase"], r.json()["queue_position"], r.json()["running"]) == (
        "queued",
        2,
        True,
    )


def test_migrate_wait_follows_the_job_to_its_end(
    stack: tuple[Registry, MigratingCloud, TestClient], capsys: pytest.CaptureFixture[str]
) -> None:
    _registry, cloud, client = stack
    d = create(client)
    cloud.done_after = 3
    assert run(client, ["migrate", d["name"], "--wait"]) == 0
    out = capsys.readouterr().out
    assert f"Migration of '{d['name']}' to h2 done (live)" in out
    assert "downtime 2.5 ms" in out
    # A job that ends otherwise is an error for the caller's script.
    other = create(client)
    cloud.refuse = RemoteError("conflict", "domain cannot migrate in this state")
    assert run_exit(client, ["migrate", other["name"], "--wait"]) == Exit.CONFLICT


def run_exit(client: TestClient, argv: list[str]) -> int:
    """`run`, with the exit code an API error makes (as `flotilla` exits)."""
    try:
        return run(client, argv)
    except ApiError as exc:
        return int(exc.exit_code)


def test_evacuate_prints_each_domains_outcome(
    stack: tuple[Registry, MigratingCloud, TestClient], capsys: pytest.CaptureFixture[str]
) -> None:
    registry, cloud, client = stack
    on = create(client)
    off = create(client, start=False)
    registry.hosts.record(beat(cloud, "h1"))
    assert run_exit(client, ["evacuate", "h1"]) == Exit.CONFLICT  # enabled: disable it first
    registry.hosts.set_enabled("h1", False, registry.hosts.next_generation("h1"))
    capsys.readouterr()
    assert run(client, ["evacuate", "h1"]) == 0
    out = capsys.readouterr().out
    assert on["name"] in out
    assert off["name"] in out
    assert "migrating live to h2" in out
    assert "migrating offline to h2" in out
    assert "h1: 2 migration(s) started, 0 refused" in out
    # Run again: both are `migrating` now, so both stay, and the exit says so.
    assert run(client, ["evacuate", "h1"]) == Exit.CONFLICT
    assert "stays: conflict" in capsys.readouterr().out


def test_the_progress_bar_shows_the_jobs_figures(capsys: pytest.CaptureFixture[str]) -> None:
    bar = JobBar("migrating web to h2")
    bar.enabled = True  # as on a terminal
    job = {
        "phase": "precopy",
        "memory_bytes": 256 << 20,
        "remaining_bytes": 64 << 20,
        "bytes_sent": 300 << 20,
        "iteration": 3,
        "bandwidth": 80 << 20,
    }
    bar.show(job)
    bar.finish()
    err = capsys.readouterr().err
    assert (
        "migrating web to h2: precopy 75% 300.00 MiB of 256.00 MiB, iteration 3, 80.00 MiB/s"
    ) in err
    assert err.endswith("\r\x1b[K")
