"""Migration through the HTTP API, the real broker, the scheduler and two compute nodes on
FakeDriver (whose machine streams between the nodes over loopback TCP): the domain's host
changes, its task comes back to none, seq has no gap, the job shows done with the measured
downtime; domjobabort leaves it where it was; evacuate empties a disabled host; the CLI's
verbs do the same against the same stack."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from protos.base import Message
from protos.codec import Envelope
from protos.events import DomainMigrationProgress
from services.api.registry import Registry
from services.bus import Bus
from services.cli.main import main as cli_main
from tests.integration.conftest import MakeBus
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


def test_evacuate_and_the_cli_verbs(
    cloud: Cloud, make_bus: MakeBus, capsys: pytest.CaptureFixture[str]
) -> None:
    progress = Progress(make_bus())
    migrations_wait_their_turn(cloud, progress)  # on this test's stack (it is the costly part)
    progress.subscription.close()
    r = cloud.create(memory_mib=64)
    assert r.status_code == 201, r.text
    running = r.json()
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


class Progress:
    """Every `domain.migration_progress` on the bus, in arrival order (one source's events
    leave its outbox in the order it wrote them)."""

    def __init__(self, bus: Bus) -> None:
        self.events: list[DomainMigrationProgress] = []
        self._cond = threading.Condition()
        self.subscription = bus.subscribe(["domain.migration_progress.#"], self._on)

    def _on(self, _envelope: Envelope, event: Message) -> None:
        if isinstance(event, DomainMigrationProgress):
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    def of(self, host: str) -> list[tuple[str, str]]:
        """(domain id, phase) of the jobs leaving `host`."""
        with self._cond:
            return self.of_locked(host)

    def wait_for(self, host: str, phase: str, count: int, timeout: float = 15) -> None:
        """Until `count` jobs leaving `host` reported `phase`: a job's final progress event
        may come after the registry has switched its domain's host."""

        def enough() -> bool:
            return [p for _, p in self.of_locked(host)].count(phase) >= count

        with self._cond:
            assert self._cond.wait_for(enough, timeout), self.of_locked(host)

    def of_locked(self, host: str) -> list[tuple[str, str]]:
        return [(str(e.domain_id), e.phase) for e in self.events if e.host == host]

    def most_at_once(self, host: str) -> int:
        """The most jobs leaving `host` that ran at one time: from the first event that is
        not `queued` to the final one."""
        running: set[str] = set()
        most = 0
        for domain_id, phase in self.of(host):
            if phase in ("done", "failed", "cancelled"):
                running.discard(domain_id)
            elif phase != "queued":
                running.add(domain_id)
                most = max(most, len(running))
        return most


def admin_wait(
    cloud: Cloud, domain_id: str, check: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The domain as an admin sees it, once `check` holds (15 s at most)."""
    deadline = time.monotonic() + 15
    while True:
        view: dict[str, Any] = cloud.get(domain_id, token=ADMIN).json()
        if check(view):
            return view
        assert time.monotonic() < deadline, view
        time.sleep(0.05)


def on_host(cloud: Cloud, host: str, n: int) -> list[str]:
    """`n` running domains that an admin placed on `host`."""
    ids = [
        cloud.create(token=ADMIN, memory_mib=64, placement={"host": host}).json()["id"]
        for _ in range(n)
    ]
    for domain_id in ids:
        admin_wait(cloud, domain_id, lambda v: v.get("state") == "running")
    return ids


def moved(cloud: Cloud, domain_id: str, to: str) -> None:
    admin_wait(cloud, domain_id, lambda v: v["task"] == "none" and v["host"] == to)


def migrations_wait_their_turn(cloud: Cloud, progress: Progress) -> None:
    """The nodes' max_concurrent_migrations is 1 (the default): a second migration from a
    host waits `queued` and runs once the first ended; a queued one is cancelled at once; an
    evacuation of three domains runs them one at a time. Its domains go at the end, and
    both hosts are enabled again."""
    here, there = sorted(cloud.nodes)
    a, b, c = on_host(cloud, here, 3)
    # 32 MiB/s: the fake's 64 MiB stream takes seconds, time enough for the others to queue.
    first = migrate(cloud, a, ADMIN, host=there, bandwidth_mibps=32)
    assert first.status_code == 202, first.text
    assert first.json()["phase"] != "queued"
    second = migrate(cloud, b, ADMIN, host=there)
    third = migrate(cloud, c, ADMIN, host=there)
    assert (second.status_code, third.status_code) == (202, 202), (second.text, third.text)
    assert (second.json()["phase"], second.json()["queue_position"]) == ("queued", 1)
    assert (third.json()["phase"], third.json()["queue_position"]) == ("queued", 2)
    waiting = job(cloud, c).json()
    assert (waiting["running"], waiting["phase"], waiting["queue_position"]) == (True, "queued", 2)
    # domjobabort of a queued one: cancelled at once, the domain where it was, its task none.
    r = cloud.http.delete(f"/v1/domains/{c}/job", headers=auth(ADMIN))
    assert r.status_code == 200, r.text
    assert (r.json()["phase"], r.json()["running"]) == ("cancelled", False)
    view = admin_wait(cloud, c, lambda v: v["task"] == "none")
    assert (view["state"], view["host"]) == ("running", here)
    # The two others run one after the other.
    for domain_id in (a, b):
        moved(cloud, domain_id, there)
    progress.wait_for(here, "done", 2)
    phases = progress.of(here)
    assert (b, "queued") in phases
    assert phases.index((a, "done")) < phases.index((b, "preparing")), phases
    assert (c, "preparing") not in phases  # the cancelled one never ran
    assert progress.most_at_once(here) == 1

    # Evacuate three domains off `there` (a, b and one more): one at a time.
    d = on_host(cloud, there, 1)[0]
    assert cloud.http.post(f"/v1/hosts/{there}/disable", headers=auth(ADMIN)).status_code == 200
    r = cloud.http.post(f"/v1/hosts/{there}/evacuate", headers=auth(ADMIN))
    assert (r.status_code, r.json()["started"]) == (202, 3), r.text
    assert [e["job"]["phase"] for e in r.json()["domains"]].count("queued") == 2
    for domain_id in (a, b, d):
        moved(cloud, domain_id, here)
    progress.wait_for(there, "done", 3)
    assert progress.most_at_once(there) == 1
    assert cloud.http.post(f"/v1/hosts/{there}/enable", headers=auth(ADMIN)).status_code == 200
    for domain_id in (a, b, c, d):
        r = cloud.http.delete(f"/v1/domains/{domain_id}", headers=auth(ADMIN))
        assert r.status_code in (202, 204), r.text
    for domain_id in (a, b, c, d):
        admin_wait(cloud, domain_id, lambda v: v.get("status") == 404 or "id" not in v)


def test_the_job_of_a_cold_migration_back_is_found_once_it_is_over(cloud: Cloud) -> None:
    """A shut-off domain migrated away and back: once the second migration is over (the
    domain on its first host again), GET /job answers that migration's job, which the host
    it came back from holds. (The window where the target shows the domain before the job's
    end is logged is tests/unit/test_api_migration.py's, where it can be held open.)"""
    off = cloud.create(memory_mib=64, start=False).json()
    first = cloud.get(off["id"], token=ADMIN).json()["host"]
    assert migrate(cloud, off["id"], token=ADMIN, live=False).status_code == 202
    other = settled(cloud, off["id"], first)["host"]
    assert other != first
    r = migrate(cloud, off["id"], token=ADMIN, live=False, host=first)
    assert r.status_code == 202, r.text
    assert settled(cloud, off["id"], other)["host"] == first
    done = job(cloud, off["id"])
    assert done.status_code == 200, done.text
    body = done.json()
    assert (body["phase"], body["live"], body["source"], body["target"]) == (
        "done",
        False,
        other,
        first,
    )
