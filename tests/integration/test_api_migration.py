"""Migration through the HTTP API, the real broker, the scheduler and two compute nodes on
FakeDriver (whose machine streams between the nodes over loopback TCP): the domain's host
changes, its task comes back to none, seq has no gap, the job shows done with the measured
downtime; domjobabort leaves it where it was; evacuate empties a disabled host; the CLI's
verbs do the same against the same stack."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest

from services.api.registry import Registry
from services.cli.main import main as cli_main
from tests.integration.test_api import ADMIN, ALICE, Cloud, auth
from tests.integration.test_api import cloud as cloud_fixture  # noqa: F401  (a fixture)

pytestmark = pytest.mark.integration

LIFECYCLE = ("started", "stopped", "suspended", "resumed", "defined", "undefined")


@pytest.fixture
def cloud(cloud_fixture: Cloud) -> Cloud:  # noqa: F811  (the imported fixture, by name)
    return cloud_fixture


def migrate(cloud: Cloud, domain_id: str, token: str = ALICE, **body: Any) -> httpx.Response:
    return cloud.http.post(
        f"/v1/domains/{domain_id}/migrate", json=body or None, headers=auth(token)
    )


def job(cloud: Cloud, domain_id: str, token: str = ADMIN) -> httpx.Response:
    return cloud.http.get(f"/v1/domains/{domain_id}/job", headers=auth(token))


def settled(cloud: Cloud, domain_id: str, source: str) -> dict[str, Any]:
    """The domain once its migration ended: task none, and (when it moved) off `source`."""
    r = cloud.wait(domain_id, lambda r: r.json()["task"] == "none")
    view: dict[str, Any] = cloud.get(domain_id, token=ADMIN).json()
    assert r.json()["task"] == "none"
    assert view["host"] != source, view
    return view


def lifecycle_seqs(cloud: Cloud, domain_id: str) -> list[tuple[str, str, int]]:
    """(host, type/detail, seq) of the domain's lifecycle events, in seq order."""
    registry = Registry.open(cloud.database_url)
    try:
        rows = registry.events.after(domain_id=uuid.UUID(domain_id), limit=1000)
    finally:
        registry.close()
    kept = [
        (r.host, f"{r.type.removeprefix('domain.')}/{r.body.get('detail', '')}", r.seq)
        for r in rows
        if r.type.removeprefix("domain.") in LIFECYCLE
    ]
    return sorted(kept, key=lambda e: e[2])


def test_a_running_domain_migrates_live_through_the_api(cloud: Cloud) -> None:
    domain_id = cloud.create(memory_mib=64).json()["id"]
    source = cloud.wait(domain_id, lambda r: r.json()["state"] == "running")
    src_host = cloud.get(domain_id, token=ADMIN).json()["host"]
    r = migrate(cloud, domain_id, max_downtime_ms=100)
    assert r.status_code == 202, r.text
    started = r.json()
    assert started["live"] is True
    assert started["source"] == cloud.alias("alice", src_host)  # a member sees aliases
    assert started["target"] in cloud.aliases() - {started["source"]}
    view = settled(cloud, domain_id, src_host)
    assert view["state"] == "running"
    assert view["seq"] > source.json()["seq"]
    # The job: done, with the pause the target measured.
    deadline = time.monotonic() + 15
    while (done := job(cloud, domain_id).json()).get("phase") != "done":
        assert time.monotonic() < deadline, done
        time.sleep(0.1)
    assert (done["running"], done["source"], done["target"]) == (False, src_host, view["host"])
    assert done["downtime_ms"] is not None
    assert done["downtime_ms"] >= 0
    # Seq continues across the hosts with no gap, and the target's arrival is there.
    events = lifecycle_seqs(cloud, domain_id)
    seqs = [seq for _, _, seq in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), events
    assert (view["host"], "started/migrated") in [(h, t) for h, t, _ in events]
    assert (src_host, "stopped/migrated") in [(h, t) for h, t, _ in events]
    # It runs on the target: actions go there.
    assert cloud.act(domain_id, "pause").json()["state"] == "paused"


def cli(cloud: Cloud, *argv: str) -> int:
    """`flotilla` as an admin against the cloud's API."""
    return cli_main(["--api", str(cloud.http.base_url), "--token", ADMIN, "--timeout", "30", *argv])


def test_domjobabort_leaves_the_domain_where_it_was(
    cloud: Cloud, capsys: pytest.CaptureFixture[str]
) -> None:
    d = cloud.create(memory_mib=64).json()
    domain_id = d["id"]
    cloud.wait(domain_id, lambda r: r.json()["state"] == "running")
    src_host = cloud.get(domain_id, token=ADMIN).json()["host"]
    # 1 MiB/s: the 64 MiB stream takes a minute, time enough to abort it.
    r = migrate(cloud, domain_id, bandwidth_mibps=1)
    assert r.status_code == 202, r.text
    assert migrate(cloud, domain_id).status_code == 409  # one at a time
    running = job(cloud, domain_id, token=ALICE).json()
    assert running["running"] is True
    r = cloud.http.patch(
        f"/v1/domains/{domain_id}/job", json={"max_downtime_ms": 20}, headers=auth(ALICE)
    )
    assert r.status_code == 200, r.text
    assert r.json()["params"]["max_downtime_ms"] == 20
    assert cli(cloud, "migrate-setspeed", d["name"], "2") == 0
    assert job(cloud, domain_id).json()["params"]["bandwidth_mibps"] == 2
    assert cli(cloud, "domjobinfo", d["name"]) == 0
    assert "Unbounded" in capsys.readouterr().out
    assert cli(cloud, "domjobabort", d["name"]) == 0
    cloud.wait(domain_id, lambda r: r.json()["task"] == "none")
    view = cloud.get(domain_id, token=ADMIN).json()
    assert (view["host"], view["state"]) == (src_host, "running")
    deadline = time.monotonic() + 15
    while (ended := job(cloud, domain_id).json()).get("running"):
        assert time.monotonic() < deadline, ended
        time.sleep(0.1)
    assert ended["phase"] == "cancelled"
    # Nothing runs now: the job's controls are refused (exit 4).
    assert cli(cloud, "domjobabort", d["name"]) == 4


def test_evacuate_and_the_cli_verbs(cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    running = cloud.create(memory_mib=64).json()
    off = cloud.create(memory_mib=64, start=False).json()
    cloud.wait(running["id"], lambda r: r.json()["state"] == "running")
    start_host = cloud.get(running["id"], token=ADMIN).json()["host"]
    # The CLI migrates the running one live (the scheduler picks the other host) and waits.
    assert cli(cloud, "migrate", running["name"], "--live", "--wait") == 0
    assert "done (live)" in capsys.readouterr().out
    host = settled(cloud, running["id"], start_host)["host"]
    # The shut-off one offline onto the same host (away first if it is there already).
    if cloud.get(off["id"], token=ADMIN).json()["host"] == host:
        assert cli(cloud, "migrate", off["name"], "--offline", "--wait") == 0
    assert cli(cloud, "migrate", off["name"], "--offline", "--host", host, "--wait") == 0
    assert "done (offline)" in capsys.readouterr().out
    assert cloud.get(off["id"], token=ADMIN).json()["host"] == host
    # Evacuate: refused while the host is enabled, then both leave it.
    assert cli(cloud, "evacuate", host) == 4
    assert cloud.http.post(f"/v1/hosts/{host}/disable", headers=auth(ADMIN)).status_code == 200
    assert cli(cloud, "evacuate", host) == 0
    assert "2 migration(s) started, 0 refused" in capsys.readouterr().out
    for d, state in ((running, "running"), (off, "shutoff")):
        assert settled(cloud, d["id"], host)["state"] == state
    assert cli(cloud, "domjobinfo", running["name"]) == 0
    info = capsys.readouterr().out
    assert "Completed" in info
    assert "Downtime:" in info
    # Nothing is left to migrate off it.
    r = cloud.http.post(f"/v1/hosts/{host}/evacuate", headers=auth(ADMIN))
    assert (r.status_code, r.json()["started"], r.json()["domains"]) == (202, 0, [])
