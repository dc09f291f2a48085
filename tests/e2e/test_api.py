"""The control plane end to end, through HTTP only: API → scheduler → compute node → the test
guest on KVM, and the events back to the registry and the SSE stream."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from services.cli.stack import ComputeSpec
from tests.e2e.harness import (
    E2E,
    domain_events,
    ok,
    sse_events,
    wait_console,
    wait_domain,
    wait_gone,
)


def test_create_runs_the_guest_and_its_console_says_ready(e2e: E2E) -> None:
    c = e2e.client()
    d = ok(c.post("/v1/domains", json=e2e.spec()), 201)
    assert d["project"] == "alice"
    assert d["host"] in e2e.aliases()
    running = wait_domain(c, d["id"], "running")
    assert running["host"] == d["host"]
    wait_console(c, d["id"], "READY vcpus=1 memory_mib=32")
    listed = ok(c.get("/v1/domains", params={"name": d["name"]}))["domains"]
    assert [x["id"] for x in listed] == [d["id"]]
    ok(c.delete(f"/v1/domains/{d['id']}"), (202, 204))
    wait_gone(c, d["id"])


def test_lifecycle_states_and_sse_events_in_order(e2e: E2E) -> None:
    c = e2e.client()
    d = ok(c.post("/v1/domains", json=e2e.spec()), 201)
    i = d["id"]
    wait_domain(c, i, "running")
    wait_console(c, i, "READY")

    def act(action: str, **extra: object) -> dict[str, object]:
        result: dict[str, object] = ok(
            c.post(f"/v1/domains/{i}/actions", json={"action": action, **extra}), 200
        )
        return result

    act("pause")
    assert wait_domain(c, i, "paused")["state"] == "paused"
    act("resume")
    wait_domain(c, i, "running")
    act("reboot")
    wait_console(c, i, "READY", count=2)
    wait_domain(c, i, "running")
    act("shutdown")
    wait_domain(c, i, "shutoff")
    act("start")
    wait_domain(c, i, "running")
    act("destroy")
    wait_domain(c, i, "shutoff")
    ok(c.delete(f"/v1/domains/{i}"), (202, 204))
    wait_gone(c, i)
    expected = [
        ("domain.defined", "added"),
        ("domain.started", "booted"),
        ("domain.suspended", "paused"),
        ("domain.resumed", "unpaused"),
        ("domain.rebooted", ""),
        ("domain.shutdown", "host"),
        ("domain.stopped", "shutdown"),
        ("domain.started", "booted"),
        ("domain.stopped", "destroyed"),
        ("domain.undefined", "removed"),
    ]
    assert domain_events(c, i, until=len(expected)) == expected


def test_sse_follow_delivers_a_start_as_it_happens_and_resumes_by_id(e2e: E2E) -> None:
    c = e2e.client()
    spec = e2e.spec()
    # A stream opened before the create sees the start; the log's own ids let it resume.
    with httpx.Client(
        base_url=e2e.api_url, headers=c.headers, timeout=httpx.Timeout(20)
    ) as watcher:
        before = sse_events(watcher, pattern="domain.#")
        last = str(before[-1]["id"]) if before else "0"
        d = ok(c.post("/v1/domains", json=spec), 201)
        wait_domain(c, d["id"], "running")
        got = sse_events(watcher, since=last, pattern="domain.started.*")
    mine = [e for e in got if e["domain_id"] == d["id"]]
    assert [e["type"] for e in mine] == ["domain.started"]
    assert mine[0]["state"] == "running"
    assert all(e["type"] == "domain.started" for e in got)
    ok(c.delete(f"/v1/domains/{d['id']}"), (202, 204))
    wait_gone(c, d["id"])


def test_anti_affinity_group_puts_two_guests_on_different_hosts(e2e: E2E) -> None:
    c = e2e.client()
    group = {"group": "pair", "policy": "anti-affinity"}
    made = []
    try:
        # One at a time into `made`, so a failure on the second still deletes the first.
        made.append(ok(c.post("/v1/domains", json=e2e.spec(placement=group)), 201))
        made.append(ok(c.post("/v1/domains", json=e2e.spec(placement=group)), 201))
        assert {d["host"] for d in made} == e2e.aliases()
        # A third member has nowhere to go.
        third = c.post("/v1/domains", json=e2e.spec(placement=group))
        assert third.status_code == 503, third.text
        assert third.json()["code"] == "no_valid_host"
        ok(c.get(f"/v1/domains/{third.json()['domain_id']}"), 404)  # nothing left of it
    finally:
        for d in made:
            ok(c.delete(f"/v1/domains/{d['id']}"), (202, 204))
        for d in made:
            wait_gone(c, d["id"])


def test_a_spec_no_host_can_fit_is_503_with_the_fault(e2e: E2E) -> None:
    c = e2e.client()
    r = c.post("/v1/domains", json=e2e.spec(memory_mib=1024 * 1024))
    assert r.status_code == 503, r.text
    problem = r.json()
    assert r.headers["content-type"].startswith("application/problem+json")
    assert problem["code"] == "no_valid_host"
    assert problem["fault"]["code"] == "no_valid_host"
    assert problem["fault"]["message"]
    # Placed nowhere: no record is left, nothing counts against the quota.
    ok(c.get(f"/v1/domains/{problem['domain_id']}"), 404)
    assert problem["domain_id"] not in [d["id"] for d in ok(c.get("/v1/domains"), 200)["domains"]]


def _mem_total_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no MemTotal")


def test_a_refusing_compute_node_is_retried_elsewhere(e2e: E2E) -> None:
    """A third node that overcommits RAM 4x in its heartbeat (so the RAM-spread weigher ranks
    it first) but reserves all but 4 MiB for itself (16 MiB of room): its own claim refuses a
    32 MiB guest with `no_capacity`, and the scheduler places the guest on another host."""
    host = f"refuser-{e2e.hosts[0].rsplit('-', 1)[1]}"
    spec = ComputeSpec(
        host,
        {"ram_allocation_ratio": 4.0, "reserved_host_memory_mib": _mem_total_mib() - 4},
    )
    child = e2e.stack.start_compute(spec)
    c = e2e.client()
    try:
        e2e.stack.wait_host_up(host, time.monotonic() + 30)
        d = ok(c.post("/v1/domains", json=e2e.spec()), 201)
        assert d["host"] in e2e.aliases()
        refused = (e2e.alias("alice", host), "no_capacity")
        assert [(a["host"], a["code"]) for a in d["attempts"]] == [refused]
        wait_domain(c, d["id"], "running")
        ok(c.delete(f"/v1/domains/{d['id']}"), (202, 204))
        wait_gone(c, d["id"])
    finally:
        child.stop()
    # Gone from placement before the next test: `down` after 3 missed heartbeats.
    deadline = time.monotonic() + 15
    while e2e.stack.host_state(host) != "down":
        assert time.monotonic() < deadline, "refusing host never went down"
        time.sleep(0.2)
    time.sleep(1.0)  # the scheduler's view uses the same threshold; allow its clock a beat


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"vcpus": 0}, "vcpus"),
        ({"name": "bad name!"}, "name"),
        ({"boot": {"cmdline": "ready"}}, "boot"),
        ({"memory_mib": "lots"}, "memory_mib"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_invalid_bodies_are_422_naming_the_field(
    e2e: E2E, change: dict[str, object], field: str
) -> None:
    r = e2e.client().post("/v1/domains", json={**e2e.spec(), **change})
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["field"].split(".")[0] == field, problem
    assert field in problem["detail"]


def test_an_invalid_action_is_422(e2e: E2E) -> None:
    c = e2e.client()
    d = ok(c.post("/v1/domains", json=e2e.spec(start=False)), 201)
    try:
        r = c.post(f"/v1/domains/{d['id']}/actions", json={"action": "explode"})
        assert r.status_code == 422, r.text
        assert r.json()["field"] == "action"
    finally:
        ok(c.delete(f"/v1/domains/{d['id']}"), (202, 204))
        wait_gone(c, d["id"])


def test_another_projects_token_gets_404(e2e: E2E) -> None:
    alice, bob = e2e.client("alice"), e2e.client("bob")
    d = ok(alice.post("/v1/domains", json=e2e.spec()), 201)
    i = d["id"]
    try:
        for method, path, body in [
            ("GET", f"/v1/domains/{i}", None),
            ("GET", f"/v1/domains/{i}/console", None),
            ("POST", f"/v1/domains/{i}/actions", {"action": "destroy"}),
            ("DELETE", f"/v1/domains/{i}", None),
        ]:
            r = bob.request(method, path, json=body)
            assert r.status_code == 404, (method, path, r.text)
        assert i not in [x["id"] for x in ok(bob.get("/v1/domains"))["domains"]]
        assert not [e for e in sse_events(bob, since=0) if e["domain_id"] == i]
        # Still running: bob's destroy did nothing.
        assert ok(alice.get(f"/v1/domains/{i}"))["state"] == "running"
        # A member does not see hosts.
        assert bob.get("/v1/hosts").status_code == 403
    finally:
        ok(alice.delete(f"/v1/domains/{i}"), (202, 204))
        wait_gone(alice, i)


def test_a_bad_token_is_401(e2e: E2E) -> None:
    r = httpx.get(
        f"{e2e.api_url}/v1/domains", headers={"Authorization": "Bearer not-a-token-at-all"}
    )
    assert r.status_code == 401, r.text


def test_over_quota_is_403(e2e: E2E) -> None:
    c = e2e.client("capped")
    first = ok(c.post("/v1/domains", json=e2e.spec(start=False)), 201)
    try:
        r = c.post("/v1/domains", json=e2e.spec(start=False))
        assert r.status_code == 403, r.text
        assert r.json()["code"] == "over_quota"
        assert r.json()["resource"] == "domains"
    finally:
        ok(c.delete(f"/v1/domains/{first['id']}"), (202, 204))
        wait_gone(c, first["id"])


def test_an_action_the_state_forbids_is_409_with_the_state(e2e: E2E) -> None:
    c = e2e.client()
    d = ok(c.post("/v1/domains", json=e2e.spec(start=False)), 201)
    i = d["id"]
    try:
        assert wait_domain(c, i, "shutoff")["host"] in e2e.aliases()
        for action in ("pause", "reboot", "shutdown"):
            r = c.post(f"/v1/domains/{i}/actions", json={"action": action})
            assert r.status_code == 409, r.text
            assert r.json()["state"] == "shutoff"
        ok(c.post(f"/v1/domains/{i}/actions", json={"action": "start"}))
        wait_domain(c, i, "running")
        r = c.post(f"/v1/domains/{i}/actions", json={"action": "start"})
        assert r.status_code == 409, r.text
        assert r.json()["state"] == "running"
    finally:
        ok(c.delete(f"/v1/domains/{i}"), (202, 204))
        wait_gone(c, i)


def test_host_files_a_member_may_not_boot_and_what_admins_may(e2e: E2E, tmp_path: Path) -> None:
    """Against `flotilla up`: a member's /etc/shadow as initrd is refused with the rule
    (nothing stored), a relative path is 422 at the API; an admin boots a kernel outside the
    allowed directories."""
    member, admin = e2e.client(), e2e.client("admin")
    api_config = e2e.stack.config.state_dir / "api" / "api.toml"  # holds the admin token
    assert api_config.exists()
    for initrd in ("/etc/shadow", str(api_config), "/nope"):
        boot = {"kernel": str(e2e.guest), "initrd": initrd}
        p = ok(member.post("/v1/domains", json=e2e.spec(boot=boot)), 403)
        assert (p["code"], p["field"]) == ("forbidden", "boot.initrd")
        assert "allowed_boot_dirs" in p["detail"]
        ok(member.get(f"/v1/domains/{p['domain_id']}"), 404)
    p = ok(member.post("/v1/domains", json=e2e.spec(boot={"kernel": "guest.elf"})), 422)
    assert p["field"] == "boot.kernel"
    kernel = tmp_path / "guest.elf"
    kernel.write_bytes(e2e.guest.read_bytes())
    d = ok(admin.post("/v1/domains", json=e2e.spec(boot={"kernel": str(kernel)})), 201)
    assert d["state"] == "running"
    ok(admin.delete(f"/v1/domains/{d['id']}"), (202, 204))
    wait_gone(admin, d["id"])
