"""GET /v1/volumes with pages up to 10,000, end to end over a real broker: exactly what the
catalog holds, in order, each project seeing only its own; pages of the old size still walk
the same listing."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from services.db import Database
from services.storage.tables import volumes
from tests.integration.test_storage_api import ADMIN, ALICE, BOB, StorageCloud
from tests.integration.test_storage_api import storage_cloud as cloud_fixture  # noqa: F401  (a fixture)

pytestmark = pytest.mark.integration


@pytest.fixture
def cloud(cloud_fixture: StorageCloud) -> StorageCloud:  # noqa: F811  (the imported fixture, by name)
    return cloud_fixture


def _fill(catalog: Path, counts: dict[str, int], host: str) -> None:
    """Catalog rows only (a listing reads the catalog, never the pool), names shuffled so
    the order comes from the query; one attached volume and one clone per project."""
    now = time.time()
    rows = [
        {
            "id": str(uuid.uuid4()),
            "project": project,
            "name": f"v{i:05d}",
            "pool": "local",
            "host": host,
            "size": (i + 1) * 512,
            "state": "attached" if i == 1 else "available",
            "domain_id": str(uuid.uuid4()) if i == 1 else None,
            "target": "vdb" if i == 1 else None,
            "readonly": i == 1,
            "source_id": str(uuid.uuid4()) if i == 2 else None,
            "seq": i,
            "created_at": now + i,
            "updated_at": now,
        }
        for project, count in counts.items()
        for i in sorted(range(count), key=lambda i: (i * 7919) % count)
    ]
    db = Database(f"sqlite:///{catalog}")
    try:
        with db.transaction() as conn:
            conn.execute(sa.insert(volumes), rows)
    finally:
        db.close()


def _walk(c: StorageCloud, token: str, limit: int) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": limit}
    while True:
        reply = c.get("/v1/volumes", token, **params)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert len(body["volumes"]) <= limit
        seen += body["volumes"]
        if "next" not in body:
            return seen
        params["after"] = body["next"]


def test_pages_of_ten_thousand_list_the_catalog(cloud: StorageCloud, tmp_path: Path) -> None:
    c = cloud
    _fill(tmp_path / "catalog.db", {"alice": 2600, "bob": 1500}, c.node.config.host)

    alice = c.get("/v1/volumes", ALICE, limit=10_000).json()
    assert "next" not in alice
    names = [v["name"] for v in alice["volumes"]]
    assert names == [f"v{i:05d}" for i in range(2600)]
    assert {v["project"] for v in alice["volumes"]} == {"alice"}
    attached = alice["volumes"][1]
    assert attached["attachment"]["target"] == "vdb"
    assert attached["attachment"]["readonly"] is True
    assert alice["volumes"][2]["source_id"] is not None
    assert alice["volumes"][2]["attachment"] is None
    assert attached["host"] != c.node.config.host  # a member sees an alias
    assert _walk(c, ALICE, 1000) == alice["volumes"]  # the old page size walks the same
    assert _walk(c, ALICE, 999) == alice["volumes"]

    bob = c.get("/v1/volumes", BOB, limit=10_000).json()["volumes"]
    assert [v["name"] for v in bob] == [f"v{i:05d}" for i in range(1500)]
    assert {v["project"] for v in bob} == {"bob"}
    assert not {v["id"] for v in bob} & {v["id"] for v in alice["volumes"]}

    admin = _walk(c, ADMIN, 4000)
    assert [(v["project"], v["name"]) for v in admin] == [
        *(("alice", f"v{i:05d}") for i in range(2600)),
        *(("bob", f"v{i:05d}") for i in range(1500)),
    ]
    assert admin[1]["host"] == c.node.config.host
    assert c.get("/v1/volumes", ADMIN, limit=10_000, pool="nope").json() == {"volumes": []}

    too_many = c.get("/v1/volumes", ALICE, limit=10_001)
    assert too_many.status_code == 422
    assert too_many.json()["field"] == "limit"


def test_the_listing_shows_each_volume_as_its_own_view(cloud: StorageCloud, tmp_path: Path) -> None:
    """Rendered by the storage service and passed on by the API: every volume exactly as
    GET /v1/volumes/{id} shows it, names the API would refuse (quotes, backslashes,
    non-ASCII) included; a member sees only its project, and an alias even for a host the
    registry has never heard of, never its name."""
    c = cloud
    odd = ['quo"te', "back\\slash", "caf\u00e9-\u4e2d-\U0001f600", '","host":"x']
    _fill(tmp_path / "catalog.db", {"alice": 3, "bob": 2}, c.node.config.host)
    ghost = f"ghost-{uuid.uuid4().hex[:6]}"  # a host no heartbeat has named
    now = time.time()
    db = Database(f"sqlite:///{tmp_path / 'catalog.db'}")
    try:
        with db.transaction() as conn:
            conn.execute(
                sa.insert(volumes),
                [
                    {
                        "id": str(uuid.uuid4()),
                        "project": "alice",
                        "name": name,
                        "pool": "local",
                        "host": ghost if i == 0 else c.node.config.host,
                        "size": 512,
                        "state": "available",
                        "seq": 1,
                        "created_at": now + i / 3,
                        "updated_at": now,
                    }
                    for i, name in enumerate(odd)
                ],
            )
    finally:
        db.close()

    for token, project in ((ADMIN, None), (ALICE, "alice"), (BOB, "bob")):
        reply = c.get("/v1/volumes", token, limit=10_000)
        assert reply.status_code == 200, reply.text
        listed = reply.json()["volumes"]
        assert listed == [c.get(f"/v1/volumes/{v['id']}", token).json() for v in listed]
        if project is not None:
            assert {v["project"] for v in listed} == {project}
            assert ghost.encode() not in reply.content
            assert c.node.config.host.encode() not in reply.content
    alice = c.get("/v1/volumes", ALICE, limit=10_000).json()["volumes"]
    assert sorted(v["name"] for v in alice if v["name"] in odd) == sorted(odd)
    assert all(v["host"].startswith("host-") for v in alice)
    admin = c.get("/v1/volumes", ADMIN, limit=10_000).json()["volumes"]
    assert {v["host"] for v in admin} == {ghost, c.node.config.host}
