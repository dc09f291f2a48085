"""Two API replicas on one PostgreSQL registry (tests/pg.py), a real broker, the scheduler and
a FakeDriver compute node: what one replica creates the other serves, with its events, on
GET and SSE; a project's quota holds across both under concurrent creates; a replica killed
with kill -9 in the middle of a create loses nothing (the other places the domain)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from compute_node.boot_sources import BootFiles
from compute_node.config import ComputeConfig
from compute_node.driver import NicTap, RuntimeInfo
from compute_node.fake import FakeDriver
from compute_node.node import ComputeNode
from protos.domain import DomainSpec
from services.api import ApiConfig, Quota, TokenEntry
from services.api.config import Role
from services.broker import free_port
from services.scheduler import Scheduler, SchedulerConfig
from tests.bootfiles import BOOT_DIR, KERNEL
from tests.brokers import API_EVENTS, purge_queues
from tests.integration.test_api import ApiServer, auth, sse_events
from tests.pg import fresh_database

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ADMIN, ALICE, BOB = "admin-token-1", "alice-token-1", "bob-token-12"
BOB_DOMAINS = 3
SCHEDULE_TIMEOUT_S = 4.0


class SlowSpawnDriver(FakeDriver):
    """The fake hypervisor; a spawn of a guest named `slow-*` takes 3 s (`spawning` is set
    when one begins)."""

    def __init__(self, vcpus: int, memory_mib: int) -> None:
        super().__init__(vcpus, memory_mib)
        self.spawning = threading.Event()

    def spawn(
        self,
        spec: DomainSpec,
        files: BootFiles,
        *,
        paused: bool = False,
        nics: Sequence[NicTap] = (),
    ) -> RuntimeInfo:
        if spec.name.startswith("slow-"):
            self.spawning.set()
            time.sleep(3)
        return super().spawn(spec, files, paused=paused, nics=nics)


def _config(amqp_url: str, database_url: str) -> ApiConfig:
    return ApiConfig(
        amqp_url=amqp_url,
        database_url=database_url,
        tokens=[
            TokenEntry(token=ADMIN, project="ops", role=Role.ADMIN),
            TokenEntry(token=ALICE, project="alice"),
            TokenEntry(token=BOB, project="bob"),
        ],
        quotas={"bob": Quota(domains=BOB_DOMAINS)},
        rpc_timeout_s=20,
        schedule_timeout_s=SCHEDULE_TIMEOUT_S,
        sse_poll_s=0.2,
    )


@dataclass
class Replicas:
    a: httpx.Client
    b: httpx.Client
    host: str
    amqp_url: str
    database_url: str
    driver: SlowSpawnDriver


@pytest.fixture
def replicas(amqp_url: str, pg_server: str, tmp_path: Path) -> Iterator[Replicas]:
    host = f"rep-{uuid.uuid4().hex[:6]}"
    node: ComputeNode | None = None
    scheduler: Scheduler | None = None
    servers: list[ApiServer] = []
    purge_queues(amqp_url, API_EVENTS)  # earlier tests' domain events are not this test's
    with fresh_database(pg_server) as database_url:
        try:
            config = ComputeConfig(
                host=host,
                state_dir=tmp_path / host,
                amqp_url=amqp_url,
                driver="fake",
                allowed_boot_dirs=[BOOT_DIR],
                heartbeat_interval_s=0.3,
            )
            driver = SlowSpawnDriver(16, 16384)
            node = ComputeNode(config, driver).start()
            scheduler = Scheduler(SchedulerConfig(amqp_url=amqp_url, replica=f"rep-{host}"))
            scheduler.start().wait_for_hosts(1)
            urls = []
            for _ in range(2):
                server = ApiServer(_config(amqp_url, database_url))
                servers.append(server)
                urls.append(server.start())
            with (
                httpx.Client(base_url=urls[0], timeout=30) as a,
                httpx.Client(base_url=urls[1], timeout=30) as b,
            ):
                yield Replicas(a, b, host, amqp_url, database_url, driver)
        finally:
            for server in servers:
                server.stop()
            if scheduler is not None:
                scheduler.stop()
            if node is not None:
                node.stop()


def _create(http: httpx.Client, token: str = ALICE, **kw: Any) -> httpx.Response:
    body = {"name": f"g-{uuid.uuid4().hex[:8]}", "boot": {"kernel": KERNEL}, **kw}
    return http.post("/v1/domains", json=body, headers=auth(token))


def test_a_create_on_one_replica_is_seen_with_its_events_on_the_other(
    replicas: Replicas,
) -> None:
    r = _create(replicas.a)
    assert r.status_code == 201, r.text
    d = r.json()
    seen = replicas.b.get(f"/v1/domains/{d['id']}", headers=auth(ALICE))
    assert seen.status_code == 200, seen.text
    assert (seen.json()["name"], seen.json()["state"]) == (d["name"], "running")
    # The events, from the other replica's SSE stream.
    url_b = str(replicas.b.base_url).rstrip("/")
    # The replicas compete for `api.events`: the two may be logged in either order (a
    # subscriber orders a domain's events by seq, docs/events.md).
    events = sse_events(
        url_b,
        ALICE,
        {"domain": d["id"], "since_seq": 0},
        lambda evs: {e["type"] for e in evs} >= {"domain.defined", "domain.started"},
    )
    events.sort(key=lambda e: e["seq"])
    assert [(e["type"], e["seq"]) for e in events] == [("domain.defined", 1), ("domain.started", 2)]
    # A live stream on A sees what an action through B causes.
    url_a = str(replicas.a.base_url).rstrip("/")
    got: list[dict[str, Any]] = []
    reader = threading.Thread(
        target=lambda: got.extend(
            sse_events(
                url_a,
                ALICE,
                {"pattern": f"domain.suspended.{d['id']}", "since": events[-1]["id"]},
                bool,
            )
        )
    )
    reader.start()
    paused = replicas.b.post(
        f"/v1/domains/{d['id']}/actions", json={"action": "pause"}, headers=auth(ALICE)
    )
    assert paused.json()["state"] == "paused", paused.text
    reader.join(20)
    assert [(e["type"], e["state"]) for e in got] == [("domain.suspended", "paused")]
    listed = replicas.a.get("/v1/domains", headers=auth(ALICE)).json()["domains"]
    assert [x["id"] for x in listed] == [d["id"]]


def test_the_quota_holds_across_replicas_under_concurrent_creates(replicas: Replicas) -> None:
    attempts = 10
    with ThreadPoolExecutor(attempts) as pool:
        answers = list(
            pool.map(
                lambda i: _create(replicas.a if i % 2 else replicas.b, BOB),
                range(attempts),
            )
        )
    codes = sorted(r.status_code for r in answers)
    assert codes == [201] * BOB_DOMAINS + [403] * (attempts - BOB_DOMAINS), [
        (r.status_code, r.text[:200]) for r in answers
    ]
    assert {r.json()["code"] for r in answers if r.status_code == 403} == {"over_quota"}
    for http in (replicas.a, replicas.b):
        held = http.get("/v1/domains", headers=auth(BOB)).json()["domains"]
        assert len(held) == BOB_DOMAINS


def _replica_process(replicas: Replicas, tmp_path: Path) -> tuple[subprocess.Popen[str], str]:
    """A third replica as a process of its own (to be killed with kill -9)."""
    config = _config(replicas.amqp_url, replicas.database_url)
    port = free_port()
    path = tmp_path / "api.json"
    path.write_text(json.dumps({"api": config.model_dump(mode="json") | {"listen_port": port}}))
    yaml_path = path.with_suffix(".yaml")  # JSON is YAML
    path.rename(yaml_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOTILLA_")}
    with (tmp_path / "api.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.api.main", "--config", str(yaml_path)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=env,
            text=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError((tmp_path / "api.log").read_text()[-3000:])
        time.sleep(0.2)


def test_a_replica_killed_in_the_middle_of_a_create_loses_nothing(
    replicas: Replicas, tmp_path: Path
) -> None:
    proc, url = _replica_process(replicas, tmp_path)
    name = f"slow-{uuid.uuid4().hex[:6]}"
    answer: list[BaseException | httpx.Response] = []

    def create() -> None:
        try:
            answer.append(
                httpx.post(
                    f"{url}/v1/domains",
                    json={"name": name, "boot": {"kernel": KERNEL}},
                    headers=auth(ALICE),
                    timeout=30,
                )
            )
        except httpx.HTTPError as exc:
            answer.append(exc)

    creating = threading.Thread(target=create)
    try:
        creating.start()
        # The record is stored, the scheduler placed it, the host is spawning it (3 s) and
        # the replica waits for the scheduler's answer: now it dies.
        assert replicas.driver.spawning.wait(30), "the create never reached the host"
        listed = replicas.b.get("/v1/domains", params={"name": name}, headers=auth(ALICE))
        assert listed.json()["domains"][0]["task"] == "scheduling"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    creating.join(30)
    assert answer
    assert isinstance(answer[0], httpx.HTTPError), answer  # the caller saw the replica die
    # Nothing lost: the other replica serves the domain, placed and running, not stuck.
    deadline = time.monotonic() + SCHEDULE_TIMEOUT_S * 4 + 20
    while True:
        d = replicas.b.get("/v1/domains", params={"name": name}, headers=auth(ALICE))
        found = d.json()["domains"]
        if found and (found[0]["task"], found[0]["state"]) == ("none", "running"):
            break
        assert time.monotonic() < deadline, f"stuck: {found}"
        time.sleep(0.2)
    assert found[0]["host"] is not None
    events = sse_events(
        str(replicas.b.base_url).rstrip("/"),
        ALICE,
        {"domain": found[0]["id"], "since_seq": 0},
        lambda evs: len(evs) >= 2,
    )
    assert [e["seq"] for e in events] == [1, 2]
