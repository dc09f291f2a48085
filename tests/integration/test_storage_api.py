"""/v1/pools and /v1/volumes over HTTP, end to end: the API (uvicorn on loopback) → the
storage service → the storage agent of a compute node, which makes real files in its pool;
bad input answered 4xx with nothing half-created; projects kept apart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from compute_node.config import ComputeConfig, PoolConfig
from compute_node.fake import FakeDriver
from compute_node.node import ComputeNode
from services.api import ApiConfig, TokenEntry
from services.api.config import Role, VolumeLimits
from services.scheduler import Scheduler, SchedulerConfig
from services.storage.config import StorageConfig
from services.storage.server import StorageServer
from tests.bootfiles import BOOT_DIR, KERNEL
from tests.brokers import API_EVENTS, STORAGE_EVENTS, purge_queues
from tests.integration.test_api import ApiServer, auth
from tests.unit.test_api import sse

pytestmark = pytest.mark.integration
ADMIN, ALICE, BOB = "admin-token-1", "alice-token-1", "bob-token-12"
MiB = 1 << 20
GiB = 1 << 30


@dataclass
class StorageCloud:
    http: httpx.Client
    node: ComputeNode
    pool: Path
    url: str

    def files(self) -> set[str]:
        return {p.name for p in (self.pool / "volumes").iterdir()}

    def post(self, path: str, body: Any = None, token: str = ALICE) -> httpx.Response:
        return self.http.post(path, json=body, headers=auth(token))

    def get(self, path: str, token: str = ALICE, **params: Any) -> httpx.Response:
        return self.http.get(path, headers=auth(token), params=params)

    def delete(self, path: str, token: str = ALICE) -> httpx.Response:
        return self.http.delete(path, headers=auth(token))

    def create(self, name: str, size: int = MiB, token: str = ALICE) -> dict[str, Any]:
        reply = self.post("/v1/volumes", {"name": name, "size": size}, token)
        assert reply.status_code == 201, reply.text
        body: dict[str, Any] = reply.json()
        return body


@pytest.fixture
def storage_cloud(amqp_url: str, tmp_path: Path) -> Iterator[StorageCloud]:
    host = f"sapi-{uuid.uuid4().hex[:6]}"
    pool = tmp_path / "pool"
    node = ComputeNode(
        ComputeConfig(
            host=host,
            state_dir=tmp_path / host,
            amqp_url=amqp_url,
            driver="fake",
            allowed_boot_dirs=[BOOT_DIR],
            heartbeat_interval_s=0.3,
            pools=[PoolConfig(name="local", path=pool)],
        ),
        FakeDriver(4, 2048),
    ).start()
    storage: StorageServer | None = None
    scheduler: Scheduler | None = None
    server: ApiServer | None = None
    try:
        purge_queues(amqp_url, API_EVENTS, STORAGE_EVENTS)  # earlier tests' are not this one's
        storage = StorageServer(
            StorageConfig(
                amqp_url=amqp_url,
                database_url=f"sqlite:///{tmp_path}/catalog.db",
                replica="api-test",
                agent_hosts=(host,),
                default_pool="local",
            )
        ).start()
        scheduler = Scheduler(SchedulerConfig(amqp_url=amqp_url, replica=f"sapi-{host}"))
        scheduler.start().wait_for_hosts(1)
        server = ApiServer(
            ApiConfig(
                amqp_url=amqp_url,
                database_url=f"sqlite:///{tmp_path}/registry.db",
                tokens=[
                    TokenEntry(token=ADMIN, project="ops", role=Role.ADMIN),
                    TokenEntry(token=ALICE, project="alice"),
                    TokenEntry(token=BOB, project="bob"),
                ],
                volume_quotas={"bob": VolumeLimits(volumes=2, gib=1)},
                rpc_timeout_s=20,
                schedule_timeout_s=30,
            )
        )
        url = server.start()
        http = httpx.Client(base_url=url, timeout=30)
        yield StorageCloud(http, node, pool, url)
        http.close()
    finally:
        if server is not None:
            server.stop()
        if scheduler is not None:
            scheduler.stop()
        if storage is not None:
            storage.stop()
        node.stop()


def test_volumes_through_the_api_to_the_agents_files(storage_cloud: StorageCloud) -> None:
    c = storage_cloud
    pools = c.get("/v1/pools").json()["pools"]
    assert [(p["name"], p["kind"]) for p in pools] == [("local", "dir")]
    assert pools[0]["host"] != c.node.config.host  # a member sees an alias
    assert c.get("/v1/pools", ADMIN).json()["pools"][0]["host"] == c.node.config.host
    assert c.get("/v1/pools/local").json()["capacity"] > 0
    assert c.get("/v1/pools/nope").status_code == 404

    data = c.create("data", 4 * MiB)
    assert (data["state"], data["size"], data["project"]) == ("available", 4 * MiB, "alice")
    assert c.files() == {data["id"]}
    with (c.pool / "volumes" / data["id"]).open("r+b") as f:
        f.write(b"hello")
    clone = c.post(f"/v1/volumes/{data['id']}/clone", {"name": "copy", "size": 8 * MiB})
    assert clone.status_code == 201, clone.text
    copy = clone.json()
    assert (copy["size"], copy["source_id"]) == (8 * MiB, data["id"])
    assert (c.pool / "volumes" / copy["id"]).read_bytes()[:5] == b"hello"
    grown = c.post(f"/v1/volumes/{data['id']}/resize", {"size": 16 * MiB})
    assert grown.json()["size"] == 16 * MiB
    shrink = c.post(f"/v1/volumes/{data['id']}/resize", {"size": MiB})
    assert (shrink.status_code, shrink.json()["code"]) == (409, "conflict")
    wiped = c.post(f"/v1/volumes/{data['id']}/wipe")
    assert wiped.status_code == 200, wiped.text
    assert (c.pool / "volumes" / data["id"]).read_bytes()[:5] == bytes(5)
    listed = c.get("/v1/volumes").json()
    assert [v["name"] for v in listed["volumes"]] == ["copy", "data"]
    assert "next" not in listed
    page = c.get("/v1/volumes", limit=1).json()
    assert [v["name"] for v in page["volumes"]] == ["copy"]
    rest = c.get("/v1/volumes", limit=1, after=page["next"]).json()
    assert [v["name"] for v in rest["volumes"]] == ["data"]
    assert c.get(f"/v1/volumes/{data['id']}").json()["name"] == "data"
    assert c.delete(f"/v1/volumes/{copy['id']}").status_code == 204
    assert c.files() == {data["id"]}
    assert c.get(f"/v1/volumes/{copy['id']}").status_code == 404


def test_volume_events_reach_the_event_stream_of_their_project(
    storage_cloud: StorageCloud,
) -> None:
    """What the storage service publishes comes through the broker into the API's event log:
    `/v1/events` with pattern `volume.#` shows a project its volumes' events."""
    c = storage_cloud
    data = c.create("evented", 2 * MiB)
    assert c.post(f"/v1/volumes/{data['id']}/resize", {"size": 4 * MiB}).status_code == 200
    assert c.delete(f"/v1/volumes/{data['id']}").status_code == 204
    params: dict[str, Any] = {"since": 0, "follow": "false", "pattern": "volume.#"}
    deadline = time.monotonic() + 15
    while True:
        mine = [e for e in sse(c.get("/v1/events", **params).text) if e["volume_id"] == data["id"]]
        if len(mine) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [(e["type"], e["seq"]) for e in mine] == [
        ("volume.created", 1),
        ("volume.resized", 2),
        ("volume.deleted", 3),
    ]
    assert {e["project"] for e in mine} == {"alice"}
    assert mine[0]["host"] != c.node.config.host  # a member sees an alias
    assert sse(c.get("/v1/events", BOB, **params).text) == []


BAD_BODIES: list[tuple[dict[str, Any], str, int]] = [
    ({"name": "a/b", "size": MiB}, "name", 422),
    ({"name": "..", "size": MiB}, "name", 422),
    ({"name": "a..b", "size": MiB}, "name", 422),
    ({"name": "a\u0000b", "size": MiB}, "name", 422),
    ({"name": "neg", "size": -512}, "size", 422),
    ({"name": "zero", "size": 0}, "size", 422),
    ({"name": "odd", "size": 1000}, "size", 422),
    ({"name": "huge", "size": (64 << 40) + 512}, "size", 422),
    ({"name": "huge", "size": 10**30}, "size", 422),
    ({"name": "beyond", "size": 60 << 40}, "size", 422),  # past the pool's free space
    ({"name": "nopool", "size": MiB, "pool": "nope"}, "pool", 404),
    ({"name": "x", "size": MiB, "extra": 1}, "extra", 422),
]


def test_bad_input_is_refused_with_its_field_and_nothing_is_made(
    storage_cloud: StorageCloud,
) -> None:
    c = storage_cloud
    for body, field, status in BAD_BODIES:
        reply = c.post("/v1/volumes", body)
        assert reply.status_code == status, (body, reply.text)
        assert reply.headers["content-type"] == "application/problem+json"
        assert reply.json()["field"] == field, (body, reply.json())
    data = c.create("data")
    for path, body, field in (
        (f"/v1/volumes/{data['id']}/resize", {"size": -512}, "size"),
        (f"/v1/volumes/{data['id']}/resize", {"size": 60 << 40}, "size"),
        (f"/v1/volumes/{data['id']}/clone", {"name": "../x"}, "name"),
        (f"/v1/volumes/{data['id']}/clone", {"name": "c", "size": 512}, "size"),
    ):
        reply = c.post(path, body)
        assert 400 <= reply.status_code < 500, (path, body, reply.text)
        assert reply.json()["field"] == field, (path, body, reply.json())
    assert c.files() == {data["id"]}
    assert [v["name"] for v in c.get("/v1/volumes").json()["volumes"]] == ["data"]
    assert c.get(f"/v1/volumes/{data['id']}").json()["size"] == MiB


def test_no_cross_project_access_and_quotas(storage_cloud: StorageCloud) -> None:
    c = storage_cloud
    theirs = c.create("private", token=ALICE)
    vid = theirs["id"]
    for reply in (
        c.get(f"/v1/volumes/{vid}", BOB),
        c.delete(f"/v1/volumes/{vid}", BOB),
        c.post(f"/v1/volumes/{vid}/resize", {"size": 2 * MiB}, BOB),
        c.post(f"/v1/volumes/{vid}/wipe", None, BOB),
        c.post(f"/v1/volumes/{vid}/clone", {"name": "stolen"}, BOB),
    ):
        assert reply.status_code == 404, reply.text
        assert "private" not in reply.text
    assert c.get("/v1/volumes", BOB).json()["volumes"] == []
    assert c.files() == {vid}
    # An admin sees every project's.
    assert [v["project"] for v in c.get("/v1/volumes", ADMIN).json()["volumes"]] == ["alice"]
    # The same name in another project is another volume; bob's quota is 2 volumes, 1 GiB.
    c.create("private", token=BOB)
    over = c.post("/v1/volumes", {"name": "big", "size": GiB}, BOB)
    assert (over.status_code, over.json()["resource"]) == (403, "gib"), over.text
    c.create("second", token=BOB)
    over = c.post("/v1/volumes", {"name": "third", "size": MiB}, BOB)
    assert (over.status_code, over.json()["code"], over.json()["resource"]) == (
        403,
        "over_quota",
        "volumes",
    )
    assert len(c.files()) == 3
    taken = c.post("/v1/volumes", {"name": "private", "size": MiB}, BOB)
    assert (taken.status_code, taken.json()["field"]) == (409, "name")


def _domain(c: StorageCloud, disks: list[dict[str, Any]], token: str = ALICE) -> httpx.Response:
    body = {
        "name": f"g-{uuid.uuid4().hex[:8]}",
        "boot": {"kernel": KERNEL},
        "disks": disks,
        "start": False,
    }
    return c.post("/v1/domains", body, token)


def _state(c: StorageCloud, volume_id: str) -> tuple[str, Any]:
    volume = c.get(f"/v1/volumes/{volume_id}").json()
    return volume["state"], volume["attachment"]


def test_volumes_as_domain_disks_attach_and_detach(storage_cloud: StorageCloud) -> None:
    c = storage_cloud
    data = c.create("data")
    spare = c.create("spare")
    bobs = c.create("bobs", token=BOB)
    # Another project's volume, or one that does not exist: 422 naming the disk, no domain.
    for volume_id in (bobs["id"], str(uuid.uuid4())):
        refused = _domain(c, [{"target": "vdb", "volume_id": volume_id}])
        assert (refused.status_code, refused.json()["field"]) == (422, "disks.0.volume_id")
    assert c.get("/v1/domains").json()["domains"] == []
    assert _state(c, data["id"])[0] == "available"

    made = _domain(c, [{"target": "vdb", "volume_id": data["id"]}])
    assert made.status_code == 201, made.text
    domain = made.json()
    state, attachment = _state(c, data["id"])
    assert (state, attachment) == (
        "attached",
        {"domain_id": domain["id"], "target": "vdb", "readonly": False},
    )
    busy = c.delete(f"/v1/volumes/{data['id']}")
    assert (busy.status_code, busy.json()["reason"]) == (409, "attached")
    # A volume attached to one domain cannot be another's disk.
    twice = _domain(c, [{"target": "vdb", "volume_id": data["id"]}])
    assert (twice.status_code, twice.json()["field"]) == (409, "disks.0.volume_id")

    # Attach and detach on the stopped domain.
    added = c.post(f"/v1/domains/{domain['id']}/disks", {"target": "vdc", "volume_id": spare["id"]})
    assert added.status_code == 200, added.text
    assert [d["target"] for d in added.json()["spec"]["disks"]] == ["vdb", "vdc"]
    assert _state(c, spare["id"])[0] == "attached"
    taken = c.post(f"/v1/domains/{domain['id']}/disks", {"target": "vdc", "volume_id": spare["id"]})
    assert taken.status_code == 409
    removed = c.delete(f"/v1/domains/{domain['id']}/disks/vdc")
    assert removed.status_code == 200, removed.text
    assert [d["target"] for d in removed.json()["spec"]["disks"]] == ["vdb"]
    assert _state(c, spare["id"])[0] == "available"
    assert c.delete(f"/v1/domains/{domain['id']}/disks/vdz").status_code == 404

    # Deleting the domain frees its volumes.
    gone = c.delete(f"/v1/domains/{domain['id']}")
    assert gone.status_code in (202, 204), gone.text
    assert _state(c, data["id"]) == ("available", None)
    assert c.delete(f"/v1/volumes/{data['id']}").status_code == 204


@pytest.mark.slow
@pytest.mark.timeout(900)  # a CLI process per verb: seconds each on a loaded host
def test_the_cli_verbs(storage_cloud: StorageCloud) -> None:
    c = storage_cloud
    env = {**os.environ, "FLOTILLA_API_URL": c.url, "FLOTILLA_TOKEN": ALICE}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli.main", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def ok(*args: str) -> str:
        done = run(*args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    assert "local" in ok("pool-list")
    assert "Capacity: 4.00 MiB" in ok("vol-create", "data", "4M")
    assert "Capacity: 8.00 MiB" in ok("vol-resize", "data", "8M")
    assert "copy" in ok("vol-clone", "data", "copy")
    ok("vol-wipe", "copy")
    listed = {v["name"]: v for v in json.loads(ok("--json", "vol-list"))}
    assert (listed["data"]["size"], listed["copy"]["size"]) == (8 * MiB, 8 * MiB)
    refused = run("vol-create", "data", "1M")  # the name is taken
    assert refused.returncode == 4, refused.stderr
    refused = run("vol-create", "a..b", "1M")
    assert (refused.returncode, "name" in refused.stderr) == (2, True), refused.stderr
    domain = _domain(c, []).json()
    ok("attach-disk", domain["name"], "data", "vdb")
    assert c.get(f"/v1/volumes/{listed['data']['id']}").json()["state"] == "attached"
    assert run("vol-delete", "data").returncode == 4
    ok("detach-disk", domain["name"], "vdb")
    assert "deleted" in ok("vol-delete", "data")
    assert [v["name"] for v in json.loads(ok("--json", "vol-list"))] == ["copy"]
