"""The migration endpoints without a broker: request bodies (422 naming the field), the state
table (409), the `migrating` task, the job from the source or the event log, the job's
controls routed to the source, and evacuation. The scheduler and the source's job are
answered here; the events that end a migration are the registry's (tests/unit/
test_registry.py), and the whole flow on a real broker is tests/integration/
test_api_migration.py."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from protos.base import Message
from protos.commands import Command
from protos.domain import DiskSpec, PowerState, TaskState
from protos.events import DomainEvent, DomainMigrationProgress, DomainStarted, StartedDetail
from protos.migration import (
    AbortMigration,
    GetMigrationJob,
    MigrateDomain,
    MigrationJob,
    MigrationParams,
    MigrationPhase,
    SetMigrationParams,
)
from protos.volumes import GetVolume, Volume
from services.api import create_app
from services.api.registry import Registry
from services.api.routes.disks import image_volume_id
from services.bus import RemoteError
from tests.unit.test_api import (
    ADMIN,
    ALICE,
    CONFIG,
    FakeCloud,
    alias,
    auth,
    beat,
    create,
    problem,
)


class MigratingCloud(FakeCloud):
    """The fake cloud, with the scheduler's MigrateDomain and the source's job answered
    here: a migration starts (or is refused as told) and its job stays in PRECOPY until a
    test ends it."""

    def __init__(self, base: Path, registry: Registry) -> None:
        super().__init__(base, registry, hosts=("h1",))
        self.refuse: RemoteError | None = None
        self.jobs: dict[uuid.UUID, MigrationJob] = {}
        self.done_after: int | None = None  # GetMigrationJob answers before a job is done
        self.volumes: dict[uuid.UUID, Volume] = {}  # what the storage catalog answers
        self.queued = 0  # a new job is answered `queued` at this place (0: running)
        # Answers GetMigrationJob in place of the one job kept per domain, if set.
        self.job_answers: Callable[..., Message] | None = None

    def call(self, queue: str, command: Command, *, timeout: float = 30.0, **kw: Any) -> Message:
        if isinstance(command, GetVolume):
            self.calls.append((queue, command))
            if command.volume_id not in self.volumes:
                raise RemoteError("not_found", f"no volume {command.volume_id}")
            return self.volumes[command.volume_id]
        if isinstance(command, MigrateDomain):
            self.calls.append((queue, command))
            if self.refuse is not None:
                raise self.refuse
            job = MigrationJob(
                domain_id=command.domain_id,
                source=command.source,
                target=command.target or "h2",
                live=command.params.live,
                phase=MigrationPhase.QUEUED if self.queued else MigrationPhase.PRECOPY,
                params=command.params,
                started_at=time.time(),
                elapsed_ms=12.0,
                memory_bytes=64 << 20,
                bytes_sent=8 << 20,
                remaining_bytes=56 << 20,
                queue_position=self.queued or None,
            )
            self.jobs[command.domain_id] = job
            return job
        if isinstance(command, GetMigrationJob) and self.job_answers is not None:
            return self.job_answers(queue, command)
        if isinstance(command, (GetMigrationJob, SetMigrationParams, AbortMigration)):
            self.calls.append((queue, command))
            held = self.jobs.get(command.domain_id)
            if held is None or queue != f"compute.{held.source}":
                raise RemoteError("not_found", "no migration job here")
            job = held
            if isinstance(command, SetMigrationParams):
                params = job.params.model_copy(
                    update={
                        k: v
                        for k, v in (
                            ("max_downtime_ms", command.max_downtime_ms),
                            ("bandwidth_mibps", command.bandwidth_mibps),
                        )
                        if v is not None
                    }
                )
                job = job.model_copy(update={"params": params})
            if isinstance(command, AbortMigration):
                job = job.model_copy(update={"phase": MigrationPhase.CANCELLED})
            if isinstance(command, GetMigrationJob) and self.done_after is not None:
                self.done_after -= 1
                if self.done_after <= 0:
                    job = job.model_copy(
                        update={
                            "phase": MigrationPhase.DONE,
                            "downtime_ms": 2.5,
                            "remaining_bytes": 0,
                        }
                    )
            self.jobs[command.domain_id] = job
            return job
        return super().call(queue, command, timeout=timeout, **kw)

    def sent(self, kind: type[Command]) -> list[tuple[str, Command]]:
        return [(q, c) for q, c in self.calls if isinstance(c, kind)]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = Registry.open(f"sqlite:///{tmp_path}/registry.db")
    yield reg
    reg.close()


@pytest.fixture
def cloud(tmp_path: Path, registry: Registry) -> Iterator[MigratingCloud]:
    fake = MigratingCloud(tmp_path, registry)
    yield fake
    fake.close()


@pytest.fixture
def client(registry: Registry, cloud: MigratingCloud) -> Iterator[TestClient]:
    app = create_app(CONFIG, registry=registry, bus=cloud)
    with TestClient(app) as c:
        yield c


def apply(registry: Registry, event: DomainEvent) -> None:
    registry.events.apply(uuid.uuid4().hex, event.routing_key(), event)


def domain(client: TestClient, domain_id: str) -> dict[str, Any]:
    data: dict[str, Any] = client.get(f"/v1/domains/{domain_id}", headers=auth(ADMIN)).json()
    return data


def arrive(registry: Registry, d: dict[str, Any], host: str = "h2") -> None:
    """The target's first event: the guest runs there, seq continuing."""
    record = registry.domains.get(uuid.UUID(d["id"]))
    assert record is not None
    apply(
        registry,
        DomainStarted(
            domain_id=record.id,
            name=record.name,
            host=host,
            seq=record.seq + 2,
            state=PowerState.RUNNING,
            detail=StartedDetail.MIGRATED,
        ),
    )


BAD_BODIES: list[tuple[dict[str, Any], str]] = [
    ({"max_downtime_ms": 0}, "max_downtime_ms"),
    ({"max_downtime_ms": 60_001}, "max_downtime_ms"),
    ({"bandwidth_mibps": -1}, "bandwidth_mibps"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"timeout_s": 5, "timeout_action": "postcopy"}, "timeout_action"),
    ({"timeout_action": "pause"}, "body"),
    ({"live": "yes"}, "live"),
    ({"host": "no such/host"}, "host"),
    ({"speed": 5}, "speed"),
]


def test_bad_migrate_bodies_are_422_naming_the_field_and_change_nothing(
    client: TestClient, cloud: MigratingCloud
) -> None:
    d = create(client)
    for body, field in BAD_BODIES:
        r = client.post(f"/v1/domains/{d['id']}/migrate", json=body, headers=auth(ADMIN))
        assert problem(r, 422)["field"] == field, body
    assert cloud.sent(MigrateDomain) == []
    assert domain(client, d["id"])["task"] == "none"


def volume(pool: str, host: str | None) -> Volume:
    return Volume(
        volume_id=uuid.uuid4(),
        project="alice",
        name=f"v-{pool}",
        pool=pool,
        host=host,
        size=1 << 30,
        state="attached",
        seq=1,
        created_at=time.time(),
    )


def test_migrate_names_the_host_local_pools_of_the_domains_volumes(
    client: TestClient, cloud: MigratingCloud, registry: Registry
) -> None:
    d = create(client)
    record = registry.domains.get(uuid.UUID(d["id"]))
    assert record is not None
    local, shared, image = volume("fast", "h1"), volume("nfs", None), volume("default", "h1")
    # The image disk's volume is the one the create made for it (a derived id).
    image = image.model_copy(update={"volume_id": image_volume_id(record.id, "vdc")})
    gone = uuid.uuid4()  # not in the catalog (any more): left to the storage service's checks
    cloud.volumes = {v.volume_id: v for v in (local, shared, image)}
    disks = [
        DiskSpec(target="vda", volume_id=local.volume_id),
        DiskSpec(target="vdb", volume_id=shared.volume_id),
        DiskSpec(target="vdc", image="debian"),
        DiskSpec(target="vdd", volume_id=gone),
    ]
    registry.domains.set_spec(record.id, record.spec.model_copy(update={"disks": disks}))
    r = client.post(f"/v1/domains/{d['id']}/migrate", headers=auth(ADMIN))
    assert r.status_code == 202, r.text
    [(_, sent)] = cloud.sent(MigrateDomain)
    assert isinstance(sent, MigrateDomain)
    assert sent.pools == ["default", "fast"]
    # A domain without volumes names none, and the catalog is not asked.
    e = create(client, name="plain")
    asked = len(cloud.sent(GetVolume))
    r = client.post(f"/v1/domains/{e['id']}/migrate", headers=auth(ADMIN))
    assert r.status_code == 202, r.text
    assert cloud.sent(MigrateDomain)[-1][1].pools == []  # type: ignore[attr-defined]
    assert len(cloud.sent(GetVolume)) == asked


def test_migrate_starts_the_job_and_the_targets_arrival_ends_the_task(
    client: TestClient, cloud: MigratingCloud, registry: Registry
) -> None:
    d = create(client)
    r = client.post(
        f"/v1/domains/{d['id']}/migrate",
        json={"max_downtime_ms": 50, "bandwidth_mibps": 100, "timeout_s": 30},
        headers=auth(ADMIN),
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert (job["source"], job["target"], job["phase"], job["running"]) == (
        "h1",
        "h2",
        "precopy",
        True,
    )
    assert job["live"] is True  # a running domain migrates live unless told otherwise
    [(queue, command)] = cloud.sent(MigrateDomain)
    assert queue == "scheduler"
    assert isinstance(command, MigrateDomain)
    assert (command.source, command.target, command.project) == ("h1", None, "alice")
    assert (command.params.max_downtime_ms, command.params.bandwidth_mibps) == (50, 100)
    assert (command.params.timeout_s, command.params.timeout_action.value) == (30, "abort")
    assert command.spec is not None
    assert command.spec.name == d["name"]
    assert domain(client, d["id"])["task"] == "migrating"
    # One migration at a time: the table refuses a second while the task runs.
    again = problem(client.post(f"/v1/domains/{d['id']}/migrate", headers=auth(ADMIN)), 409)
    assert (again["task"], again["action"]) == ("migrating", "migrate")
    arrive(registry, d)
    after = domain(client, d["id"])
    assert (after["host"], after["task"], after["state"]) == ("h2", "none", "running")


def test_a_refused_migration_leaves_the_domain_as_it_was(
    client: TestClient, cloud: MigratingCloud
) -> None:
    d = create(client)
    cloud.refuse = RemoteError(
        "no_valid_host",
        "no host can take domain: filters: alive removed h3",
        {"attempts": [], "filtered": {"alive": ["h3"]}},
    )
    body = problem(client.post(f"/v1/domains/{d['id']}/migrate", headers=auth(ALICE)), 503)
    assert body["code"] == "no_valid_host"
    assert body["filtered"] == {"alive": [alias_of(client, "h3")]}  # a member sees aliases
    assert "h3" not in body["detail"]
    assert domain(client, d["id"])["task"] == "none"
    cloud.refuse = RemoteError("conflict", "domain cannot migrate in this state")
    problem(client.post(f"/v1/domains/{d['id']}/migrate", headers=auth(ADMIN)), 409)
    assert domain(client, d["id"])["task"] == "none"


def alias_of(client: TestClient, host: str) -> str:
    registry: Registry = client.app.state.ctx.registry  # type: ignore[attr-defined]
    return alias(registry, "alice", host)


def test_the_state_table_and_the_host_decide_what_may_migrate(
    client: TestClient, cloud: MigratingCloud
) -> None:
    off = create(client, start=False)
    url = f"/v1/domains/{off['id']}/migrate"
    assert problem(client.post(url, json={"live": True}, headers=auth(ADMIN)), 409)["state"] == (
        "shutoff"
    )
    # A member may not name the target: host names are admin-only.
    problem(client.post(url, json={"host": "h2"}, headers=auth(ALICE)), 403)
    # A shut-off domain migrates offline, to the host an admin names.
    r = client.post(url, json={"host": "h3"}, headers=auth(ADMIN))
    assert r.status_code == 202, r.text
    assert (r.json()["live"], r.json()["target"]) == (False, "h3")
    on = create(client)
    problem(
        client.post(f"/v1/domains/{on['id']}/migrate", json={"live": False}, headers=auth(ADMIN)),
        409,
    )
    # Another project's domain is not there at all.
    problem(client.post(f"/v1/domains/{on['id']}/migrate", headers=auth("bob-token-12")), 404)


def test_the_job_is_the_sources_then_the_logs_and_members_see_aliases(
    client: TestClient, cloud: MigratingCloud, registry: Registry
) -> None:
    d = create(client)
    url = f"/v1/domains/{d['id']}/job"
    assert problem(client.get(url, headers=auth(ALICE)), 404)["code"] == "not_found"
    problem(client.patch(url, json={"max_downtime_ms": 10}, headers=auth(ALICE)), 409)
    problem(client.delete(url, headers=auth(ALICE)), 409)
    assert client.post(f"/v1/domains/{d['id']}/migrate", headers=auth(ALICE)).status_code == 202
    running = client.get(url, headers=auth(ALICE)).json()
    assert running["running"] is True
    assert (running["source"], running["target"]) == (
        alias_of(client, "h1"),
        alias_of(client, "h2"),
    )
    assert running["params"]["max_downtime_ms"] == 300
    # migrate-setmaxdowntime, migrate-setspeed: to the source, from its next round.
    problem(client.patch(url, json={}, headers=auth(ALICE)), 422)
    problem(client.patch(url, json={"bandwidth_mibps": -5}, headers=auth(ALICE)), 422)
    r = client.patch(url, json={"max_downtime_ms": 20, "bandwidth_mibps": 64}, headers=auth(ALICE))
    assert r.status_code == 200, r.text
    assert (r.json()["params"]["max_downtime_ms"], r.json()["params"]["bandwidth_mibps"]) == (
        20,
        64,
    )
    [(queue, command)] = cloud.sent(SetMigrationParams)
    assert queue == "compute.h1"
    assert isinstance(command, SetMigrationParams)
    assert (command.max_downtime_ms, command.bandwidth_mibps) == (20, 64)
    # The source's final progress and the target's arrival: the job is the log's now.
    record = registry.domains.get(uuid.UUID(d["id"]))
    assert record is not None
    apply(
        registry,
        DomainMigrationProgress(
            domain_id=record.id,
            name=record.name,
            host="h1",
            seq=record.seq,
            state=PowerState.RUNNING,
            iteration=4,
            transferred_bytes=70 << 20,
            remaining_bytes=0,
            phase="done",
            target="h2",
            elapsed_ms=230.0,
            downtime_ms=3.25,
        ),
    )
    arrive(registry, d)
    cloud.jobs.clear()  # the source forgot the domain once it left
    done = client.get(url, headers=auth(ALICE)).json()
    assert (done["phase"], done["running"], done["downtime_ms"]) == ("done", False, 3.25)
    assert (done["source"], done["target"]) == (alias_of(client, "h1"), alias_of(client, "h2"))
    assert (done["bytes_sent"], done["iteration"], done["params"]) == (70 << 20, 4, None)
    admin_view = client.get(url, headers=auth(ADMIN)).json()
    assert (admin_view["source"], admin_view["target"]) == ("h1", "h2")
    # The progress event on the SSE stream hides the target's name from a member as well.
    pattern = "pattern=domain.migration_progress.*"
    text = client.get(f"/v1/events?since=0&follow=false&{pattern}", headers=auth(ALICE)).text
    assert '"target": "h2"' not in text
    assert f'"target": "{alias_of(client, "h2")}"' in text


def done_job(
    domain_id: uuid.UUID,
    source: str,
    target: str,
    *,
    started_at: float,
    live: bool = True,
    downtime_ms: float | None = None,
) -> MigrationJob:
    """A migration job that ended (`done`), as its source answers GetMigrationJob."""
    return MigrationJob(
        domain_id=domain_id,
        source=source,
        target=target,
        live=live,
        phase=MigrationPhase.DONE,
        params=MigrationParams(),
        started_at=started_at,
        elapsed_ms=200.0,
        downtime_ms=downtime_ms,
    )


def test_the_job_of_a_domain_back_on_its_first_host_is_the_newest_one(
    client: TestClient, cloud: MigratingCloud, registry: Registry
) -> None:
    """h1 → h2, then back h2 → h1: the registry has the domain on h1 again (the arrival came)
    while the second job's final event is not logged yet. h1's own last job is the first
    (done, to h2), and so is the last final event logged: the job shown is the second,
    from h2, the host it came back from, not the first."""
    d = create(client)
    url = f"/v1/domains/{d['id']}/job"
    record = registry.domains.get(uuid.UUID(d["id"]))
    assert record is not None
    first = done_job(record.id, "h1", "h2", started_at=time.time() - 10, downtime_ms=4.0)
    second = first.model_copy(
        update={"source": "h2", "target": "h1", "started_at": time.time() - 1, "downtime_ms": 2.0}
    )
    logged = DomainMigrationProgress(
        domain_id=record.id,
        name=record.name,
        host="h1",
        seq=record.seq,
        state=PowerState.RUNNING,
        iteration=3,
        transferred_bytes=1 << 20,
        remaining_bytes=0,
        phase="done",
        target="h2",
        elapsed_ms=200.0,
        downtime_ms=4.0,
    )
    ended = first.started_at + 0.2  # the first job's end, logged long before the second
    registry.events.apply(uuid.uuid4().hex, logged.routing_key(), logged, ended)
    arrive(registry, d, "h2")
    arrive(registry, d, "h1")  # back: the second job's `done` is still on its way
    assert domain(client, d["id"])["host"] == "h1"
    held = {"compute.h1": first, "compute.h2": second}

    def jobs(queue: str, command: Command, **_: Any) -> Message:
        assert isinstance(command, GetMigrationJob)
        return held[queue]

    cloud.job_answers = jobs
    shown = client.get(url, headers=auth(ADMIN)).json()
    assert (shown["source"], shown["target"], shown["downtime_ms"]) == ("h2", "h1", 2.0)
    # While h2 still finishes the second job (its commit under way), that one is shown.
    held["compute.h2"] = second.model_copy(update={"phase": MigrationPhase.PRECOPY})
    assert client.get(url, headers=auth(ADMIN)).json()["running"] is True


def test_the_job_of_a_domain_just_arrived_is_its_sources(
    client: TestClient, cloud: MigratingCloud, registry: Registry
) -> None:
    """h1 → h2, over: the registry has the domain on h2 (its arrival came) while the job's
    final event is not logged yet, and h2 holds no job for it (the source holds the job):
    the job shown is h1's, not a 404 (`migrate --wait` polled into that window)."""
    d = create(client)
    url = f"/v1/domains/{d['id']}/job"
    record = registry.domains.get(uuid.UUID(d["id"]))
    assert record is not None
    ran = done_job(record.id, "h1", "h2", live=False, started_at=time.time() - 1)
    arrive(registry, d, "h1")
    arrive(registry, d, "h2")
    assert domain(client, d["id"])["host"] == "h2"
    held: dict[str, Message] = {"compute.h1": ran}

    def jobs(queue: str, command: Command, **_: Any) -> Message:
        assert isinstance(command, GetMigrationJob)
        if queue not in held:
            raise RemoteError("not_found", f"no migration job of domain {command.domain_id}")
        return held[queue]

    cloud.job_answers = jobs
    shown = client.get(url, headers=auth(ADMIN))
    assert shown.status_code == 200, shown.text
    assert (shown.json()["source"], shown.json()["target"], shown.json()["phase"]) == (
        "h1",
        "h2",
        "done",
    )


def test_domjobabort_goes_to_the_source(client: TestClient, cloud: MigratingCloud) -> None:
    d = create(client)
    assert client.post(f"/v1/domains/{d['id']}/migrate", headers=auth(ALICE)).status_code == 202
    r = client.delete(f"/v1/domains/{d['id']}/job", headers=auth(ALICE))
    assert r.status_code == 200, r.text
    assert (r.json()["phase"], r.json()["running"]) == ("cancelled", False)
    [(queue, _)] = cloud.sent(AbortMigration)
    assert queue == "compute.h1"


def test_evacuate_migrates_every_domain_off_a_disabled_host(
    client: TestClient, cloud: MigratingCloud, registry: Registry
) -> None:
    running = create(client)
    off = create(client, start=False)
    paused = create(client)
    assert (
        client.post(
            f"/v1/domains/{paused['id']}/actions", json={"action": "pause"}, headers=auth(ALICE)
        ).status_code
        == 200
    )
    busy = create(client)
    registry.domains.set_task(uuid.UUID(busy["id"]), TaskState.DELETING)
    registry.hosts.record(beat(cloud, "h1"))
    url = "/v1/hosts/h1/evacuate"
    problem(client.post(url, headers=auth(ALICE)), 403)
    problem(client.post("/v1/hosts/h7/evacuate", headers=auth(ADMIN)), 404)
    assert "disable it first" in problem(client.post(url, headers=auth(ADMIN)), 409)["detail"]
    registry.hosts.set_enabled("h1", False, registry.hosts.next_generation("h1"))
    r = client.post(url, headers=auth(ADMIN))
    assert r.status_code == 202, r.text
    result = r.json()
    assert (result["host"], result["started"], result["refused"]) == ("h1", 3, 1)
    by_id = {o["domain_id"]: o for o in result["domains"]}
    assert by_id[running["id"]]["live"] is True
    assert by_id[paused["id"]]["live"] is True
    assert by_id[off["id"]]["live"] is False
    assert by_id[off["id"]]["job"]["target"] == "h2"
    assert (by_id[busy["id"]]["code"], by_id[busy["id"]]["job"]) == ("conflict", None)
    assert len(cloud.sent(MigrateDomain)) == 3


def test_a_migrating_task_no_job_will_end_is_settled_by_reading_the_job(
    tmp_path: Path, registry: Registry, cloud: MigratingCloud
) -> None:
    config = CONFIG.model_copy(update={"schedule_timeout_s": 1.0})
    with TestClient(create_app(config, registry=registry, bus=cloud)) as client:
        d = create(client)
        assert client.post(f"/v1/domains/{d['id']}/migrate", headers=auth(ADMIN)).status_code == 202
        url = f"/v1/domains/{d['id']}/job"
        # While the job runs, nothing changes however old the task.
        time.sleep(1.1)
        assert client.get(url, headers=auth(ADMIN)).json()["running"] is True
        assert domain(client, d["id"])["task"] == "migrating"
        # The source restarted and forgot the job: no event will end the task; reading the
        # job does (after the request's own wait, so a request in flight is left alone).
        cloud.jobs.clear()
        problem(client.get(url, headers=auth(ADMIN)), 404)
        assert domain(client, d["id"])["task"] == "none"
        assert client.post(f"/v1/domains/{d['id']}/migrate", headers=auth(ADMIN)).status_code == 202
        cloud.jobs.clear()
        problem(client.get(url, headers=auth(ADMIN)), 404)
        assert domain(client, d["id"])["task"] == "migrating"  # too young to settle


def test_the_job_update_schema_says_what_the_api_refuses() -> None:
    """`PATCH /job` refuses an empty body and an explicit null: its OpenAPI schema says so
    (at least one property; numbers, never null), so clients and Schemathesis agree with it."""
    from services.api.migration_models import JobUpdate

    schema = JobUpdate.model_json_schema()
    assert schema["minProperties"] == 1
    for name in ("max_downtime_ms", "bandwidth_mibps"):
        assert schema["properties"][name]["type"] in ("number", "integer")
        assert "anyOf" not in schema["properties"][name]
        with pytest.raises(ValueError, match=name):
            JobUpdate.model_validate({name: None})
    assert JobUpdate.model_validate({"bandwidth_mibps": 0}).bandwidth_mibps == 0
