"""Volume events in the API's event log: what the storage service publishes reaches
`/v1/events` for the volume's project (pattern `volume.#`), as domain events do, with host
names as the caller may see them; nothing of a volume is projected onto a domain."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from protos.codec import envelope_for
from protos.storage import VolumeAttached, VolumeCreated, VolumeEvent, VolumeMoved
from services.api import create_app
from services.api.registry import Registry
from services.api.registry.projection import Outcome
from services.bus import Context
from tests.unit.test_api import ADMIN, ALICE, BOB, CONFIG, FakeCloud, alias, auth, sse

VOLUME = uuid.uuid4()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = Registry.open(f"sqlite:///{tmp_path}/registry.db")
    yield reg
    reg.close()


@pytest.fixture
def cloud(tmp_path: Path, registry: Registry) -> Iterator[FakeCloud]:
    fake = FakeCloud(tmp_path, registry)
    yield fake
    fake.close()


@pytest.fixture
def client(registry: Registry, cloud: FakeCloud) -> Iterator[TestClient]:
    with TestClient(create_app(CONFIG, registry=registry, bus=cloud)) as c:
        yield c


def deliver(cloud: FakeCloud, event: VolumeEvent) -> Outcome:
    """As the consumer runtime hands the storage service's event to the API's projector."""
    envelope = envelope_for(event, source="storage:r1")
    outcome = cloud.projector.volume_event(
        event, Context(envelope, routing_key=event.routing_key())
    )
    assert outcome is not None
    return outcome


def test_a_volume_move_reaches_the_volumes_project(
    client: TestClient, cloud: FakeCloud, registry: Registry
) -> None:
    domain = uuid.uuid4()
    common = {"volume_id": VOLUME, "pool": "local", "size": 1 << 20, "project": "alice"}
    created = VolumeCreated.model_validate({**common, "host": "h1", "seq": 1, "name": "data"})
    attached = VolumeAttached.model_validate(
        {**common, "host": "h1", "seq": 2, "name": "data", "domain_id": domain, "target": "vdb"}
    )
    moved = VolumeMoved.model_validate(
        {**common, "host": "h2", "seq": 3, "name": "data", "from_host": "h1"}
    )
    for event in (created, attached):
        assert deliver(cloud, event) is Outcome.LOGGED
    # Delivered twice (at least once: the same message id), logged once.
    envelope = envelope_for(moved, source="storage:r1", correlation_id="req-7")
    ctx = Context(envelope, routing_key=moved.routing_key())
    assert cloud.projector.volume_event(moved, ctx) is Outcome.LOGGED
    assert cloud.projector.volume_event(moved, ctx) is Outcome.DUPLICATE

    url = "/v1/events?follow=false&pattern=volume.%23"
    admin = sse(client.get(f"{url}&since=0", headers=auth(ADMIN)).text)
    assert [(e["type"], e["seq"]) for e in admin] == [
        ("volume.created", 1),
        ("volume.attached", 2),
        ("volume.moved", 3),
    ]
    seen = admin[2]
    assert seen["routing_key"] == f"volume.moved.{VOLUME}"
    assert (seen["volume_id"], seen["domain_id"], seen["state"]) == (str(VOLUME), None, None)
    assert (seen["project"], seen["host"], seen["correlation_id"]) == ("alice", "h2", "req-7")
    assert (seen["event"]["from_host"], seen["event"]["host"]) == ("h1", "h2")

    # The volume's project sees it, with its aliases for the hosts; another project does not.
    mine = sse(client.get(f"{url}&since=0", headers=auth(ALICE)).text)
    assert [e["type"] for e in mine] == [e["type"] for e in admin]
    h1, h2 = alias(registry, "alice", "h1"), alias(registry, "alice", "h2")
    assert (mine[2]["host"], mine[2]["event"]["from_host"], mine[2]["event"]["host"]) == (
        h2,
        h1,
        h2,
    )
    assert sse(client.get(f"{url}&since=0", headers=auth(BOB)).text) == []
    # One volume's events from a seq on; the default pattern (domain.#) leaves them out.
    one = f"/v1/events?follow=false&domain={VOLUME}&since_seq=2&pattern=volume.%23"
    assert [e["type"] for e in sse(client.get(one, headers=auth(ALICE)).text)] == ["volume.moved"]
    assert sse(client.get("/v1/events?since=0&follow=false", headers=auth(ALICE)).text) == []
    # A shared pool's volume has no host: "" stays "" (no alias of nothing).
    shared = VolumeCreated.model_validate(
        {**common, "volume_id": uuid.uuid4(), "host": "", "seq": 1}
    )
    deliver(cloud, shared)
    (last,) = sse(client.get(f"{url}&since={mine[-1]['id']}", headers=auth(ALICE)).text)
    assert (last["volume_id"], last["host"], last["event"]["host"]) == (
        str(shared.volume_id),
        "",
        "",
    )
    # Nothing of it was projected onto the domain it is attached to.
    assert registry.domains.get(domain) is None
