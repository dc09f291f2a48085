"""An API replica killed (-9) while the scheduler places the domain it asked for: the other
replica, on the same PostgreSQL registry, must end up with the domain placed (its host,
running, no task), as the compute node and the events say, as soon as the domain starts,
not only once the orphan sweep settles it after the schedule timeout; and when the start
never comes (the scheduler stopped between define and start), the sweep must finish the
create as asked: running, not shut off. Found by the chaos
suite (tests/chaos): the record stayed in task `scheduling`, and a DELETE of it then dropped
the record at once (no host known) while the guest kept running on its host.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from compute_node.boot_sources import BootFiles
from compute_node.config import ComputeConfig
from compute_node.driver import NicTap, RuntimeInfo
from compute_node.fake import FakeDriver
from compute_node.node import ComputeNode
from protos.base import Message
from protos.commands import Command, StartDomain
from protos.domain import DomainSpec, PowerState
from services.broker import free_port
from services.cli.stack import Child
from services.files import write_private
from services.scheduler import Scheduler, SchedulerConfig
from tests.bootfiles import BOOT_DIR, KERNEL
from tests.pg import fresh_database

pytestmark = pytest.mark.integration

TOKEN = "replica-death-admin"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


class SlowSpawn(FakeDriver):
    """Spawning takes 3 s, long enough to kill the API replica waiting for the placement."""

    def __init__(self) -> None:
        super().__init__()
        self.spawning = threading.Event()

    def spawn(
        self,
        spec: DomainSpec,
        files: BootFiles,
        *,
        paused: bool = False,
        nics: Sequence[NicTap] = (),
    ) -> RuntimeInfo:
        self.spawning.set()
        time.sleep(3)
        return super().spawn(spec, files, paused=paused, nics=nics)


class HeldSpawn(FakeDriver):
    """Spawning waits for `go`: the test kills the create's API replica and deletes the
    domain in between."""

    def __init__(self) -> None:
        super().__init__()
        self.spawning = threading.Event()
        self.go = threading.Event()

    def spawn(
        self,
        spec: DomainSpec,
        files: BootFiles,
        *,
        paused: bool = False,
        nics: Sequence[NicTap] = (),
    ) -> RuntimeInfo:
        self.spawning.set()
        assert self.go.wait(60)
        return super().spawn(spec, files, paused=paused, nics=nics)


class ReplicaStopped(Exception):
    """What the stalled scheduler's start raises once the test is over."""


def _api(tmp: Path, i: int, amqp_url: str, db_url: str, **settings: object) -> tuple[Child, str]:
    port = free_port()
    path = tmp / f"api{i}.toml"
    values = {"listen_port": port, "database_url": db_url, "amqp_url": amqp_url, **settings}
    text = "[api]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
    text += f'\n[[api.tokens]]\ntoken = "{TOKEN}"\nproject = "p"\nrole = "admin"\n'
    write_private(path, text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOTILLA_")}
    argv = [sys.executable, "-m", "services.api.main", "--config", str(path)]
    child = Child(f"api{i}", argv, env, tmp / f"api{i}.log")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return child, url
        if not child.alive() or time.monotonic() > deadline:
            raise child.died()
        time.sleep(0.2)


@pytest.fixture
def db_url(pg_server: str) -> Iterator[str]:
    with fresh_database(pg_server) as url:
        yield url


def test_a_create_whose_api_replica_dies_mid_placement_ends_placed_on_the_other(
    amqp_url: str, db_url: str, tmp_path: Path
) -> None:
    host = f"rd-{uuid.uuid4().hex[:6]}"
    driver = SlowSpawn()
    config = ComputeConfig(
        host=host,
        state_dir=tmp_path / host,
        amqp_url=amqp_url,
        driver="fake",
        allowed_boot_dirs=[BOOT_DIR],
        heartbeat_interval_s=0.5,
    )
    node = ComputeNode(config, driver).start()
    scheduler = Scheduler(SchedulerConfig(amqp_url=amqp_url, replica="rd-sched")).start()
    children: list[Child] = []
    try:
        scheduler.wait_for_hosts(1)
        doomed, doomed_url = _api(tmp_path, 0, amqp_url, db_url)
        children.append(doomed)  # stopped even if the other one fails to start
        other, other_url = _api(tmp_path, 1, amqp_url, db_url)
        children.append(other)
        name = f"rd-{uuid.uuid4().hex[:8]}"
        body = {"name": name, "memory_mib": 32, "boot": {"kernel": KERNEL}}

        def create() -> None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{doomed_url}/v1/domains", json=body, headers=HEADERS, timeout=30)

        client = threading.Thread(target=create)
        client.start()
        assert driver.spawning.wait(30), "the scheduler never asked the host to start it"
        os.kill(doomed.pid, signal.SIGKILL)
        client.join(30)

        d: dict[str, object] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = httpx.get(f"{other_url}/v1/domains", params={"name": name}, headers=HEADERS)
            found = r.json()["domains"]
            d = found[0] if found else {}
            if d.get("task") == "none":
                break
            time.sleep(0.2)
        assert (d.get("host"), d.get("state"), d.get("task")) == (host, "running", "none"), d
    finally:
        for child in children:
            child.stop()
        scheduler.stop()
        node.stop()


@pytest.mark.slow  # two API replicas on PostgreSQL: ~80 s on a loaded 2-core machine
def test_a_delete_before_the_dead_replicas_create_is_placed_removes_the_guest(
    amqp_url: str, db_url: str, tmp_path: Path
) -> None:
    """The create's replica dies while the host starts the domain; a DELETE on the other
    replica finds no host yet. It must still win: the guest that then starts is destroyed
    and undefined there, and the record goes once the host confirms (it counts until then)."""
    host = f"rd-{uuid.uuid4().hex[:6]}"
    driver = HeldSpawn()
    config = ComputeConfig(
        host=host,
        state_dir=tmp_path / host,
        amqp_url=amqp_url,
        driver="fake",
        allowed_boot_dirs=[BOOT_DIR],
        heartbeat_interval_s=0.5,
    )
    node = ComputeNode(config, driver).start()
    scheduler = Scheduler(SchedulerConfig(amqp_url=amqp_url, replica="rd-sched")).start()
    children: list[Child] = []
    try:
        scheduler.wait_for_hosts(1)
        doomed, doomed_url = _api(tmp_path, 0, amqp_url, db_url)
        children.append(doomed)  # stopped even if the other one fails to start
        other, other_url = _api(tmp_path, 1, amqp_url, db_url)
        children.append(other)
        name = f"rd-{uuid.uuid4().hex[:8]}"
        body = {"name": name, "memory_mib": 32, "boot": {"kernel": KERNEL}}

        def create() -> None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{doomed_url}/v1/domains", json=body, headers=HEADERS, timeout=30)

        client = threading.Thread(target=create)
        client.start()
        assert driver.spawning.wait(30), "the scheduler never asked the host to start it"
        os.kill(doomed.pid, signal.SIGKILL)
        client.join(30)

        r = httpx.get(f"{other_url}/v1/domains", params={"name": name}, headers=HEADERS)
        (d,) = r.json()["domains"]
        assert (d["host"], d["task"]) == (None, "scheduling"), d
        r = httpx.delete(f"{other_url}/v1/domains/{d['id']}", headers=HEADERS, timeout=30)
        assert r.status_code == 202, r.text
        assert (r.json()["host"], r.json()["task"]) == (None, "deleting")
        driver.go.set()  # the host starts it now

        domain_id = uuid.UUID(d["id"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = httpx.get(f"{other_url}/v1/domains/{domain_id}", headers=HEADERS)
            if r.status_code == 404 and node.store.get(domain_id) is None:
                break
            time.sleep(0.2)
        assert node.store.get(domain_id) is None, "the guest was left on its host"
        assert r.status_code == 404, r.text
    finally:
        driver.go.set()
        for child in children:
            child.stop()
        scheduler.stop()
        node.stop()


@pytest.mark.slow  # the sweep settles it schedule_timeout_s + 10 s after the create: ~35 s
def test_a_create_cut_off_between_define_and_start_ends_running_not_shut_off(
    amqp_url: str, db_url: str, tmp_path: Path
) -> None:
    """The scheduler defines the domain and stops before its start goes out (as a replica
    killed there, with no peer to take the request over); the create's API replica is
    killed too. The other replica's orphan sweep settles the record on the host, and, as
    the host kept the create's `start` with the definition, starts it there. Before, it was
    settled shut off although the user had asked for a running guest."""
    host = f"rd-{uuid.uuid4().hex[:6]}"
    config = ComputeConfig(
        host=host,
        state_dir=tmp_path / host,
        amqp_url=amqp_url,
        driver="fake",
        allowed_boot_dirs=[BOOT_DIR],
        heartbeat_interval_s=0.5,
    )
    node = ComputeNode(config, FakeDriver()).start()
    scheduler = Scheduler(SchedulerConfig(amqp_url=amqp_url, replica="rd-stall")).start()
    stalled, release = threading.Event(), threading.Event()
    real_call = scheduler.service.call

    def call(
        queue: str,
        command: Command,
        *,
        timeout: float,
        message_id: str | None,
        expires: bool = False,
    ) -> Message:
        if isinstance(command, StartDomain):
            stalled.set()
            release.wait(120)
            raise ReplicaStopped("the scheduler replica stopped before its start went out")
        return real_call(queue, command, timeout=timeout, message_id=message_id, expires=expires)

    scheduler.service.call = call  # type: ignore[method-assign]
    children: list[Child] = []
    try:
        scheduler.wait_for_hosts(1)
        doomed, doomed_url = _api(tmp_path, 0, amqp_url, db_url, schedule_timeout_s=8.0)
        children.append(doomed)
        other, other_url = _api(tmp_path, 1, amqp_url, db_url, schedule_timeout_s=8.0)
        children.append(other)
        name = f"rd-{uuid.uuid4().hex[:8]}"
        body = {"name": name, "memory_mib": 32, "boot": {"kernel": KERNEL}}

        def create() -> None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{doomed_url}/v1/domains", json=body, headers=HEADERS, timeout=30)

        client = threading.Thread(target=create)
        client.start()
        assert stalled.wait(30), "the scheduler never got as far as the start"
        os.kill(doomed.pid, signal.SIGKILL)
        client.join(30)

        d: dict[str, object] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = httpx.get(f"{other_url}/v1/domains", params={"name": name}, headers=HEADERS)
            found = r.json()["domains"]
            d = found[0] if found else {}
            if d.get("task") != "scheduling" and d.get("state") != "shutoff":
                break
            time.sleep(0.5)
        assert (d.get("host"), d.get("state"), d.get("task")) == (host, "running", "none"), d
        record = node.store.get(uuid.UUID(str(d["id"])))
        assert record is not None
        assert record.state is PowerState.RUNNING
    finally:
        release.set()
        for child in children:
            child.stop()
        scheduler.stop()
        node.stop()


@pytest.mark.slow  # the 504 after 3 s, the sweep schedule_timeout_s + 10 s later: ~20 s
def test_a_create_answered_504_whose_start_never_came_ends_running(
    amqp_url: str, tmp_path: Path
) -> None:
    """The scheduler defines the domain and stops before its start goes out; the create's
    API replica stays alive, waits its schedule timeout and answers 504 (fault
    `schedule_timeout`: the outcome unknown). The create asked for a running guest: the
    replica's orphan sweep settles the record on the host that defined it and starts it
    there. Before, it stayed in `error` with no host while the host kept it shut off."""
    host = f"rt-{uuid.uuid4().hex[:6]}"
    config = ComputeConfig(
        host=host,
        state_dir=tmp_path / host,
        amqp_url=amqp_url,
        driver="fake",
        allowed_boot_dirs=[BOOT_DIR],
        heartbeat_interval_s=0.5,
    )
    node = ComputeNode(config, FakeDriver()).start()
    scheduler = Scheduler(SchedulerConfig(amqp_url=amqp_url, replica="rt-stall")).start()
    release = threading.Event()
    real_call = scheduler.service.call

    def call(
        queue: str,
        command: Command,
        *,
        timeout: float,
        message_id: str | None,
        expires: bool = False,
    ) -> Message:
        if isinstance(command, StartDomain):
            release.wait(120)
            raise ReplicaStopped("the scheduler replica stopped before its start went out")
        return real_call(queue, command, timeout=timeout, message_id=message_id, expires=expires)

    scheduler.service.call = call  # type: ignore[method-assign]
    api: Child | None = None
    try:
        scheduler.wait_for_hosts(1)
        db_url = f"sqlite:///{tmp_path}/registry.db"
        api, url = _api(tmp_path, 0, amqp_url, db_url, schedule_timeout_s=3.0)
        name = f"rt-{uuid.uuid4().hex[:8]}"
        body = {"name": name, "memory_mib": 32, "boot": {"kernel": KERNEL}}
        r = httpx.post(f"{url}/v1/domains", json=body, headers=HEADERS, timeout=30)
        assert r.status_code == 504, r.text
        assert r.json()["fault"]["code"] == "schedule_timeout"
        domain_id = r.json()["domain_id"]
        d: dict[str, object] = {}
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            d = httpx.get(f"{url}/v1/domains/{domain_id}", headers=HEADERS, timeout=10).json()
            if d.get("state") == "running":
                break
            time.sleep(0.5)
        assert (d.get("host"), d.get("state"), d.get("task"), d.get("fault")) == (
            host,
            "running",
            "none",
            None,
        ), d
        record = node.store.get(uuid.UUID(domain_id))
        assert record is not None
        assert record.state is PowerState.RUNNING
    finally:
        release.set()
        if api is not None:
            api.stop()
        scheduler.stop()
        node.stop()
