"""Save, restore, managed save and snapshot trees through the HTTP API, the real broker, the
scheduler and compute nodes on FakeDriver (whose machine state is a file in the node's state
directory): events, seq, refusals, quotas, a compute node restart."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest

from compute_node.node import ComputeNode
from services.api.registry import Registry
from services.cli.main import main as cli_main
from tests.integration.test_api import (  # the API test's cloud: two fake nodes, alice, bob
    ADMIN,
    ALICE,
    BOB,
    Cloud,
    auth,
)
from tests.integration.test_api import cloud as cloud_fixture  # noqa: F401  (a fixture)

pytestmark = pytest.mark.integration


@pytest.fixture
def cloud(cloud_fixture: Cloud) -> Cloud:  # noqa: F811  (the imported fixture, by name)
    return cloud_fixture


def post(cloud: Cloud, path: str, token: str = ALICE, **body: Any) -> httpx.Response:
    return cloud.http.post(path, json=body or None, headers=auth(token))


def events(cloud: Cloud, domain_id: str, after_seq: int, count: int) -> list[tuple[str, int]]:
    """(type/detail, seq) of the domain's events past `after_seq`, once `count` are logged."""
    deadline = time.monotonic() + 15
    registry = Registry.open(cloud.database_url)
    try:
        while True:
            rows = registry.events.after(domain_id=uuid.UUID(domain_id), since_seq=after_seq)
            if len(rows) >= count or time.monotonic() > deadline:
                return [(f"{r.type}/{r.body.get('detail', '')}", r.seq) for r in rows]
            time.sleep(0.05)
    finally:
        registry.close()


def test_save_restore_and_managed_save_across_a_node_restart(cloud: Cloud) -> None:
    domain_id = cloud.create().json()["id"]
    seq = cloud.wait(domain_id, lambda r: r.json()["state"] == "running").json()["seq"]
    r = post(cloud, f"/v1/domains/{domain_id}/save", pool="nope")
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "pool"
    r = post(cloud, f"/v1/domains/{domain_id}/save")
    assert r.status_code == 200, r.text
    assert r.json()["domain"]["state"] == "shutoff"
    assert r.json()["bytes"] > 0
    assert post(cloud, f"/v1/domains/{domain_id}/save").status_code == 409  # not active
    r = post(cloud, f"/v1/domains/{domain_id}/restore")
    assert r.json()["state"] == "running", r.text
    assert events(cloud, domain_id, seq, 2) == [
        ("domain.stopped/saved", seq + 1),
        ("domain.started/restored", seq + 2),
    ]
    assert post(cloud, f"/v1/domains/{domain_id}/restore").status_code == 409  # running
    # Managed save, then the compute node restarts, then start restores it.
    r = post(cloud, f"/v1/domains/{domain_id}/managedsave")
    assert r.status_code == 200, r.text
    host = cloud.get(domain_id, token=ADMIN).json()["host"]
    old = cloud.nodes[host]
    old.stop()
    cloud.nodes[host] = ComputeNode(old.config, old.driver).start()
    assert cloud.act(domain_id, "start").json()["state"] == "running"
    assert events(cloud, domain_id, seq + 2, 2) == [
        ("domain.stopped/saved", seq + 3),
        ("domain.started/restored", seq + 4),
    ]
    state_dir = old.config.state_dir / "states"
    assert list(state_dir.iterdir()) == []  # restored, then deleted
    # managedsave-remove: the next start boots afresh.
    post(cloud, f"/v1/domains/{domain_id}/managedsave")
    r = cloud.http.delete(f"/v1/domains/{domain_id}/managedsave", headers=auth(ALICE))
    assert r.status_code == 200, r.text
    assert cloud.act(domain_id, "start").json()["state"] == "running"
    assert events(cloud, domain_id, seq + 5, 1) == [("domain.started/booted", seq + 6)]


def test_snapshot_tree_revert_to_each_node_and_delete_a_middle_one(cloud: Cloud) -> None:
    domain_id = cloud.create().json()["id"]
    cloud.wait(domain_id, lambda r: r.json()["state"] == "running")
    base = f"/v1/domains/{domain_id}/snapshots"
    for name in ("a", "b"):
        r = post(cloud, base, name=name, description=f"snapshot {name}")
        assert r.status_code == 201, r.text
    assert cloud.act(domain_id, "destroy").json()["state"] == "shutoff"
    r = post(cloud, f"{base}/a/revert")
    assert r.json()["state"] == "running", r.text
    assert post(cloud, base, name="c").status_code == 201  # a's child, beside b
    listing = cloud.http.get(base, headers=auth(ALICE)).json()
    assert listing["current"] == "c"
    tree = {s["name"]: (s["parent"], s["children"]) for s in listing["snapshots"]}
    assert tree == {"a": (None, ["b", "c"]), "b": ("a", []), "c": ("a", [])}
    for name in ("a", "b", "c"):
        assert cloud.act(domain_id, "destroy").json()["state"] == "shutoff"
        r = post(cloud, f"{base}/{name}/revert")
        assert r.json()["state"] == "running", r.text
        assert cloud.http.get(f"{base}/{name}", headers=auth(ALICE)).json()["current"]
    # Refusals: revert while running, a bad name, another project's snapshot, a taken name.
    r = post(cloud, f"{base}/a/revert")
    assert r.status_code == 409
    assert r.json()["state"] == "running"
    r = post(cloud, base, name="../x")
    assert r.status_code == 422
    assert "name" in r.text
    assert cloud.http.get(f"{base}/a", headers=auth(BOB)).status_code == 404
    assert post(cloud, f"{base}/a/revert", token=BOB).status_code == 404
    assert post(cloud, base, name="a").status_code == 409
    # Delete the middle node: its children take its parent; the others still revert.
    assert cloud.http.delete(f"{base}/a", headers=auth(ALICE)).status_code == 204
    tree = {
        s["name"]: (s["parent"], s["children"])
        for s in cloud.http.get(base, headers=auth(ALICE)).json()["snapshots"]
    }
    assert tree == {"b": (None, []), "c": (None, [])}
    cloud.act(domain_id, "destroy")
    assert post(cloud, f"{base}/b/revert").json()["state"] == "running"


def test_snapshot_space_quota(cloud: Cloud) -> None:
    domain_id = cloud.create().json()["id"]
    cloud.wait(domain_id, lambda r: r.json()["state"] == "running")
    r = cloud.http.put("/v1/projects/alice/quota", json={"snapshot_bytes": 1}, headers=auth(ADMIN))
    assert r.status_code == 200, r.text
    r = post(cloud, f"/v1/domains/{domain_id}/snapshots", name="big")
    assert r.status_code == 403, r.text
    assert r.json()["resource"] == "snapshot_bytes"
    assert (
        cloud.http.get(f"/v1/domains/{domain_id}/snapshots", headers=auth(ALICE)).json()[
            "snapshots"
        ]
        == []
    )
    # Nothing left on the host either.
    host = cloud.get(domain_id, token=ADMIN).json()["host"]
    states = cloud.nodes[host].config.state_dir / "states"
    assert list(states.iterdir()) == []
    assert cloud.get(domain_id).json()["state"] == "running"


def test_the_cli_verbs(cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    """The virsh-like verbs against the API, in-process."""
    name = cloud.create().json()["name"]
    domain_id = cloud.http.get("/v1/domains", headers=auth(ALICE)).json()["domains"][0]["id"]
    cloud.wait(domain_id, lambda r: r.json()["state"] == "running")
    url = str(cloud.http.base_url).rstrip("/")

    def flotilla(*argv: str) -> str:
        code = cli_main(["--api", url, "--token", ALICE, *argv])
        out = capsys.readouterr().out
        assert code == 0, out
        return out

    assert "saved" in flotilla("save", name)
    assert "restored (running)" in flotilla("restore", name)
    assert "state saved" in flotilla("managedsave", name)
    assert "Removed managedsave image" in flotilla("managedsave-remove", name)
    flotilla("start", name)
    assert "Domain snapshot s1 created (with memory)" in flotilla("snapshot-create", name, "s1")
    flotilla("snapshot-create", name, "s2", "--disk-only", "--description", "before upgrade")
    flotilla("destroy", name)
    assert "running" in flotilla("snapshot-revert", name, "s1")
    flotilla("snapshot-create", name, "s3")
    assert flotilla("snapshot-list", name, "--tree").splitlines() == ["s1", "+- s2", "`- s3"]
    listing = flotilla("snapshot-list", name)
    assert "s3 *" in listing
    info = flotilla("snapshot-info", name, "s2")
    assert "disks only" in info
    assert "before upgrade" in info
    assert "deleted" in flotilla("snapshot-delete", name, "s1")
    assert flotilla("snapshot-list", name, "--tree").splitlines() == ["s2", "s3"]
    code = cli_main(["--api", url, "--token", ALICE, "snapshot-revert", name, "s2"])
    assert code == 4  # conflict: the domain is running
    capsys.readouterr()
