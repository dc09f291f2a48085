"""Live migration through the whole stack on KVM, as a user drives it over HTTP: the test guest
writes a memtest region, then counts (reading the region back every 50 lines), and moves
between the stack's two compute nodes and back (docs/migration.md, "Tests")."""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.e2e.harness import E2E, ok, sse_events, wait_console, wait_domain
from tests.guest_console import MEMTEST, Since, counters, since

LIFECYCLE = ("domain.defined", "domain.started", "domain.suspended", "domain.stopped")


def console(c: httpx.Client, domain_id: str) -> str:
    return str(ok(c.get(f"/v1/domains/{domain_id}/console"), 200)["data"])


def wait_job_done(c: httpx.Client, domain_id: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = ok(c.get(f"/v1/domains/{domain_id}/job"), 200)
        if not job["running"] and job["phase"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job of {domain_id} still running: {job}")


def wait_checks_after(c: httpx.Client, domain_id: str, last: int, timeout: float = 15.0) -> Since:
    """What the guest printed after COUNTER `last`, once it includes a memory check."""
    deadline = time.monotonic() + timeout
    while True:
        text = console(c, domain_id)
        after = since(text, last)
        if after.checks:
            return after
        assert time.monotonic() < deadline, f"no memory check after COUNTER {last}: {text[-600:]!r}"
        time.sleep(0.1)


def migrate_live(e2e: E2E, domain_id: str, checksum: str) -> tuple[str, dict[str, Any]]:
    """Migrate the guest to the other host through the API; checks everything a user sees
    and returns (the new host alias, the job)."""
    c = e2e.client()
    before = ok(c.get(f"/v1/domains/{domain_id}"), 200)
    last = counters(console(c, domain_id))[-1]
    job = ok(c.post(f"/v1/domains/{domain_id}/migrate", json={"max_downtime_ms": 300}), 202)
    assert job["source"] == before["host"], job
    assert job["target"] != before["host"], job
    job = wait_job_done(c, domain_id)
    assert job["phase"] == "done", job
    assert job["downtime_ms"] is not None, job
    assert 0 < job["downtime_ms"] < 300, job
    moved = wait_domain(c, domain_id, "running")
    assert moved["host"] == job["target"], moved
    assert moved["task"] == "none", moved
    # The console now comes from the target: the counter goes on one by one with no second
    # boot (a reboot would print READY and MEMTEST again and count from 0), and the memtest
    # region reads back intact there.
    after_switch = wait_checks_after(c, domain_id, last)
    assert all(c == f"ok checksum=0x{checksum}" for c in after_switch.checks), after_switch
    assert after_switch.consecutive(), after_switch.counters[:30]
    assert after_switch.boots == 0, after_switch
    return str(moved["host"]), job


def test_a_counting_guest_migrates_live_there_and_back_through_the_api(e2e: E2E) -> None:
    c = e2e.client()
    spec = e2e.spec("ready memtest=16 counter=50", memory_mib=64)
    d = ok(c.post("/v1/domains", json=spec), 201)
    domain_id, home = d["id"], d["host"]
    wait_domain(c, domain_id, "running")
    wait_console(c, domain_id, "MEMTEST mib=16")
    # Read once the counter runs: the MEMTEST line is whole by then (the console may be read
    # while the serial port is still sending it).
    checksum = MEMTEST.search(wait_console(c, domain_id, "COUNTER 5"))
    assert checksum is not None

    away, job = migrate_live(e2e, domain_id, checksum[1])
    assert away != home
    assert away in e2e.aliases()
    back, _ = migrate_live(e2e, domain_id, checksum[1])
    assert back == home

    # One event log: seq 1..N with no gap; each move is SUSPENDED and STOPPED (migrated) from
    # the source, then STARTED (migrated) from the target.
    events = [e for e in sse_events(c, domain=domain_id, since_seq=0) if e["type"] in LIFECYCLE]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), events
    assert [(e["type"], e["event"].get("detail"), e["host"]) for e in events] == [
        ("domain.defined", "added", home),
        ("domain.started", "booted", home),
        ("domain.suspended", "migrated", home),
        ("domain.stopped", "migrated", home),
        ("domain.started", "migrated", away),
        ("domain.suspended", "migrated", away),
        ("domain.stopped", "migrated", away),
        ("domain.started", "migrated", home),
    ]
    assert job["source"] == home
    assert job["target"] == away
    ok(c.post(f"/v1/domains/{domain_id}/actions", json={"action": "destroy"}), 200)
    wait_domain(c, domain_id, "shutoff")
    ok(c.delete(f"/v1/domains/{domain_id}"), (202, 204))
