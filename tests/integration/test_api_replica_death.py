"""An API replica killed (-9) while the scheduler places the domain it asked for: the other
replica, on the same PostgreSQL registry, must end up with the domain placed (its host,
running, no task), as the compute node and the events say, as soon as the domain starts,
not only once the orphan sweep settles it after the schedule timeout; and when the start
never comes (the scheduler stopped between define and start), the sweep must finish the
create as asked: running, not shut off. Found by the chaos
suite (tests/chaos): the record stayed in task `scheduling`, and a DELETE of it then dropped
the record at once (no host known) while the guest kept running on its host.

The four tests share one compute node, one scheduler and one surviving API replica on one
PostgreSQL database (a replica on a database of its own would take a share of the events:
the API replicas compete for `api.events`); the first three each start a replica to kill.
The node's spawns and the scheduler's starts are held only while a test asks
(`Stack.spawns`, `Stack.starts`), and released when it ends.
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
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from compute_node.boot_sources import BootFiles
from compute_node.config import ComputeConfig
from compute_node.driver import NicTap, RuntimeInfo
from compute_node.fake import FakeDriver
from compute_node.node import ComputeNode
from protos.base import Message
from protos.commands import Command, DefineDomain, StartDomain
from protos.domain import DomainSpec, PowerState
from services.api.orphans import GRACE_S
from services.broker import free_port
from services.cli.children import Child
from services.files import write_private
from services.scheduler import Scheduler, SchedulerConfig
from tests.bootfiles import BOOT_DIR, KERNEL
from tests.pg import fresh_database

pytestmark = pytest.mark.integration

TOKEN = "replica-death-admin"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
# The replicas on PostgreSQL answer a create after 8 s at the latest; their orphan sweep
# settles a record GRACE_S later than that after it last changed. A test that must see the
# domain settled by its own events, not by the sweep, gives up before then.
SCHEDULE_TIMEOUT_S = 8.0
BEFORE_THE_SWEEP_S = SCHEDULE_TIMEOUT_S + GRACE_S - 1.0


class HeldSpawns(FakeDriver):
    """Spawning sets `spawning`, then takes `delay` seconds and waits for `go` (set unless a
    test holds it): long enough for the test to kill the API replica waiting for the
    placement, or to delete the domain in between."""

    def __init__(self) -> None:
        super().__init__()
        self.spawning = threading.Event()
        self.go = threading.Event()
        self.delay = 0.0
        self.reset()

    def reset(self) -> None:
        self.spawning.clear()
        self.go.set()
        self.delay = 0.0

    def spawn(
        self,
        spec: DomainSpec,
        files: BootFiles,
        *,
        paused: bool = False,
        nics: Sequence[NicTap] = (),
    ) -> RuntimeInfo:
        self.spawning.set()
        time.sleep(self.delay)
        assert self.go.wait(60)
        return super().spawn(spec, files, paused=paused, nics=nics)


class ReplicaStopped(Exception):
    """What the stalled scheduler's start raises once the test is over."""


class StalledStarts:
    """The scheduler's calls to the compute node, where a test can have every StartDomain
    stall until it ends and then fail, as if the scheduler replica had stopped before its
    start went out (`hold`). While held, the scheduler defines as one older than
    DefineDomain 1.7 did (no `and_start`: the start a command of its own), the only way a
    create can be cut off between its define and its start."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.real = scheduler.service.call
        self.stalled = threading.Event()
        self.released = threading.Event()
        self.released.set()
        scheduler.service.call = self.call  # type: ignore[method-assign]

    def hold(self) -> None:
        self.stalled, self.released = threading.Event(), threading.Event()

    def release(self) -> None:
        self.released.set()

    def call(
        self,
        queue: str,
        command: Command,
        *,
        timeout: float,
        message_id: str | None,
        expires: bool = False,
    ) -> Message:
        released = self.released
        if isinstance(command, DefineDomain) and not released.is_set():
            command = command.model_copy(update={"and_start": False})
        if isinstance(command, StartDomain) and not released.is_set():
            self.stalled.set()
            released.wait(120)
            raise ReplicaStopped("the scheduler replica stopped before its start went out")
        return self.real(queue, command, timeout=timeout, message_id=message_id, expires=expires)


@dataclass
class Stack:
    host: str
    node: ComputeNode
    spawns: HeldSpawns
    starts: StalledStarts
    tmp: Path


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


@pytest.fixture(scope="module")
def shared(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("replica-death")
    host = f"rd-{uuid.uuid4().hex[:6]}"
    config = ComputeConfig(
        host=host,
        state_dir=tmp / host,
        amqp_url=amqp_url,
        driver="fake",
        allowed_boot_dirs=[BOOT_DIR],
        heartbeat_interval_s=0.5,
    )
    spawns = HeldSpawns()
    node = ComputeNode(config, spawns).start()
    scheduler = Scheduler(SchedulerConfig(amqp_url=amqp_url, replica="rd-sched")).start()
    starts = StalledStarts(scheduler)
    try:
        scheduler.wait_for_hosts(1)
        yield Stack(host, node, spawns, starts, tmp)
    finally:
        starts.release()
        spawns.go.set()
        scheduler.stop()
        node.stop()


@pytest.fixture
def stack(shared: Stack, tmp_path: Path) -> Iterator[Stack]:
    """The shared stack, nothing held, with this test's own temp dir."""
    shared.spawns.reset()
    shared.starts.release()
    yield Stack(shared.host, shared.node, shared.spawns, shared.starts, tmp_path)
    shared.starts.release()
    shared.spawns.go.set()


@pytest.fixture(scope="module")
def db_url(pg_server: str) -> Iterator[str]:
    with fresh_database(pg_server) as url:
        yield url


@pytest.fixture(scope="module")
def other(amqp_url: str, db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The replica that survives: its URL."""
    child, url = _api(
        tmp_path_factory.mktemp("other"), 1, amqp_url, db_url, schedule_timeout_s=SCHEDULE_TIMEOUT_S
    )
    try:
        yield url
    finally:
        child.stop()


@contextlib.contextmanager
def doomed_replica(stack: Stack, amqp_url: str, db_url: str) -> Iterator[tuple[Child, str]]:
    """A replica for the test to kill (stopped after it if it is still alive)."""
    child, url = _api(stack.tmp, 0, amqp_url, db_url, schedule_timeout_s=SCHEDULE_TIMEOUT_S)
    try:
        yield child, url
    finally:
        child.stop()


def create_and_kill(url: str, child: Child, started: threading.Event, what: str) -> str:
    """POST a create to the replica at `url`, kill it (-9) once `started` is set while it
    waits for the placement; the domain's name."""
    name = f"rd-{uuid.uuid4().hex[:8]}"
    body = {"name": name, "memory_mib": 32, "boot": {"kernel": KERNEL}}

    def create() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{url}/v1/domains", json=body, headers=HEADERS, timeout=30)

    client = threading.Thread(target=create)
    client.start()
    assert started.wait(30), what
    os.kill(child.pid, signal.SIGKILL)
    client.join(30)
    return name


def domain_named(url: str, name: str) -> dict[str, object]:
    r = httpx.get(f"{url}/v1/domains", params={"name": name}, headers=HEADERS)
    found = r.json()["domains"]
    return found[0] if found else {}


def test_a_create_whose_api_replica_dies_mid_placement_ends_placed_on_the_other(
    stack: Stack, amqp_url: str, db_url: str, other: str
) -> None:
    stack.spawns.delay = 3.0
    created = time.monotonic()  # the record's last change is after this
    with doomed_replica(stack, amqp_url, db_url) as (doomed, doomed_url):
        name = create_and_kill(
            doomed_url, doomed, stack.spawns.spawning, "the scheduler never asked the host"
        )
    d: dict[str, object] = {}
    deadline = created + BEFORE_THE_SWEEP_S
    while time.monotonic() < deadline:
        d = domain_named(other, name)
        if d.get("task") == "none":
            break
        time.sleep(0.2)
    assert (d.get("host"), d.get("state"), d.get("task")) == (stack.host, "running", "none"), d


def test_a_delete_before_the_dead_replicas_create_is_placed_removes_the_guest(
    stack: Stack, amqp_url: str, db_url: str, other: str
) -> None:
    """The create's replica dies while the host starts the domain; a DELETE on the other
    replica finds no host yet. It must still win: the guest that then starts is destroyed
    and undefined there, and the record goes once the host confirms (it counts until then)."""
    stack.spawns.go.clear()
    with doomed_replica(stack, amqp_url, db_url) as (doomed, doomed_url):
        name = create_and_kill(
            doomed_url, doomed, stack.spawns.spawning, "the scheduler never asked the host"
        )
    d = domain_named(other, name)
    assert (d["host"], d["task"]) == (None, "scheduling"), d
    deleted = time.monotonic()  # the tombstone's last change is after this
    r = httpx.delete(f"{other}/v1/domains/{d['id']}", headers=HEADERS, timeout=30)
    assert r.status_code == 202, r.text
    assert (r.json()["host"], r.json()["task"]) == (None, "deleting")
    stack.spawns.go.set()  # the host starts it now

    domain_id = uuid.UUID(str(d["id"]))
    deadline = deleted + BEFORE_THE_SWEEP_S
    while time.monotonic() < deadline:
        r = httpx.get(f"{other}/v1/domains/{domain_id}", headers=HEADERS)
        if r.status_code == 404 and stack.node.store.get(domain_id) is None:
            break
        time.sleep(0.2)
    assert stack.node.store.get(domain_id) is None, "the guest was left on its host"
    assert r.status_code == 404, r.text


@pytest.mark.slow  # the sweep settles it schedule_timeout_s + 10 s after the create: ~25 s
def test_a_create_cut_off_between_define_and_start_ends_running_not_shut_off(
    stack: Stack, amqp_url: str, db_url: str, other: str
) -> None:
    """The scheduler defines the domain and stops before its start goes out (as a replica
    killed there, with no peer to take the request over); the create's API replica is
    killed too. The other replica's orphan sweep settles the record on the host, and, as
    the host kept the create's `start` with the definition, starts it there. Before, it was
    settled shut off although the user had asked for a running guest."""
    stack.starts.hold()
    with doomed_replica(stack, amqp_url, db_url) as (doomed, doomed_url):
        name = create_and_kill(
            doomed_url, doomed, stack.starts.stalled, "the scheduler never got to the start"
        )
    d: dict[str, object] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        d = domain_named(other, name)
        if d.get("task") != "scheduling" and d.get("state") != "shutoff":
            break
        time.sleep(0.5)
    assert (d.get("host"), d.get("state"), d.get("task")) == (stack.host, "running", "none"), d
    record = stack.node.store.get(uuid.UUID(str(d["id"])))
    assert record is not None
    assert record.state is PowerState.RUNNING


@pytest.mark.slow  # the 504 after schedule_timeout_s, the sweep 10 s after that: ~20 s
def test_a_create_answered_504_whose_start_never_came_ends_running(
    stack: Stack, other: str
) -> None:
    """The scheduler defines the domain and stops before its start goes out; the create's
    API replica stays alive, waits its schedule timeout and answers 504 (fault
    `schedule_timeout`: the outcome unknown). The create asked for a running guest: the
    replica's orphan sweep settles the record on the host that defined it and starts it
    there. Before, it stayed in `error` with no host while the host kept it shut off."""
    stack.starts.hold()
    name = f"rt-{uuid.uuid4().hex[:8]}"
    body = {"name": name, "memory_mib": 32, "boot": {"kernel": KERNEL}}
    r = httpx.post(f"{other}/v1/domains", json=body, headers=HEADERS, timeout=30)
    assert r.status_code == 504, r.text
    assert r.json()["fault"]["code"] == "schedule_timeout"
    domain_id = r.json()["domain_id"]
    d: dict[str, object] = {}
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        d = httpx.get(f"{other}/v1/domains/{domain_id}", headers=HEADERS, timeout=10).json()
        if d.get("state") == "running":
            break
        time.sleep(0.5)
    assert (d.get("host"), d.get("state"), d.get("task"), d.get("fault")) == (
        stack.host,
        "running",
        "none",
        None,
    ), d
    record = stack.node.store.get(uuid.UUID(domain_id))
    assert record is not None
    assert record.state is PowerState.RUNNING
