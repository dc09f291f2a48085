"""cmd.catalog.volume_listing: the storage service renders the API's listing JSON, and the
API passes it on after a structural check. These tests hold it, byte for byte, to what the
API rendered before from the checked page (protos.volume_wire.read_volume_page and
volume_list_json), for odd names, every column, pages walked with `after`, each project
alone, a member's aliases, and an empty page; and hold the check to what it refuses.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from protos import routing
from protos.base import Message
from protos.codec import decode_head, envelope_for, pack
from protos.commands import Command
from protos.volume_wire import VolumeViewRow, read_volume_listing, read_volume_page
from protos.volumes import Attachment, ListVolumeListing, VolumeListing
from services.api import create_app
from services.api.registry import Registry
from services.api.visibility import HostMask, host_alias
from services.api.volume_models import VolumeView, volume_list_json, volume_listing_json
from services.bus import RemoteError, ServiceError
from services.storage.catalog import Catalog, PoolRow
from services.storage.tables import volumes
from tests.unit.test_api import ADMIN, ALICE, CONFIG, auth, problem

KEY = "k" * 32
# Names the API would refuse, put in the catalog directly: the rendering must not depend on
# the rules that normally keep them out.
ODD_NAMES = [
    'quote"d',
    "back\\slash",
    'tr\\"icky\\',
    "caf\u00e9-\u4e2d\u6587-\U0001f600",
    "ctl\x01\x1f\n\t",
    '","host":"node-1',
    "</script>",
]


def _row(project: str, name: str, **changes: Any) -> dict[str, Any]:
    now = time.time()
    row: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "project": project,
        "name": name,
        "pool": "default",
        "host": "node-1",
        "size": 1 << 30,
        "state": "available",
        "domain_id": None,
        "target": None,
        "readonly": False,
        "source_id": None,
        "image": None,
        "fault": None,
        "seq": 1,
        "created_at": now,
        "updated_at": now,
    }
    return {**row, **changes}  # every row every key: an executemany takes the first's


@pytest.fixture(params=["stored", "built"])
def catalog(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Catalog]:
    """The rows put in directly; `stored`: their listing JSON then filled, as the service does
    at start (the listing sends it); `built`: left without it (rows from before the column:
    the listing builds the page from the columns)."""
    catalog = Catalog.open(f"sqlite:///{tmp_path / 'catalog.db'}", "r1")
    rows = [
        _row("p1", name, created_at=1764500000.123456789 + i / 7)
        for i, name in enumerate(ODD_NAMES)
    ]
    rows += [
        _row(
            "p1",
            "attached",
            state="attached",
            domain_id=str(uuid.uuid4()),
            target="vdc",
            readonly=True,
            source_id=str(uuid.uuid4()),
            image="sha256:ab",
            fault="not shown",
            host="node-2",
            size=0,
            seq=2**40,
        ),
        _row("p1", "shared", host=None, pool="nfs", created_at=1764500001.0),
        _row("p2", "other", host="node-3"),
        _row("p2", "zz", created_at=0.1),
    ]
    with catalog.db.transaction() as conn:
        conn.execute(sa.insert(volumes), rows)
    if request.param == "stored":
        assert catalog.fill_listings() == len(rows)
    try:
        yield catalog
    finally:
        catalog.close()


def _sent(listing: VolumeListing) -> bytes:
    """The API's JSON for `listing`, after the trip over the wire and the API's check."""
    _head, body = decode_head(pack(envelope_for(listing, source="storage")))
    return volume_listing_json(read_volume_listing(body))


def _before(catalog: Catalog, mask: HostMask, *args: Any) -> bytes:
    """What the API rendered before: the page read and checked, then written again."""
    _head, body = decode_head(pack(envelope_for(catalog.page_wire(*args), source="storage")))
    return volume_list_json(read_volume_page(body), mask)


def _mask(project: str | None) -> HostMask:
    return HostMask(project, lambda: ["node-1", "node-2", "node-3"], KEY)


@pytest.mark.parametrize(
    ("project", "pool"), [(None, None), ("p1", None), ("p2", None), (None, "nfs"), ("p3", None)]
)
def test_the_listing_is_byte_for_byte_what_the_api_rendered(
    catalog: Catalog, project: str | None, pool: str | None
) -> None:
    mask = _mask(project)
    listing = catalog.listing(project, pool, 100, None, mask.aliases())
    rendered = _sent(listing)
    assert rendered == _before(catalog, mask, project, pool, 100, None)
    body = json.loads(rendered)
    assert listing.count == len(body["volumes"])
    if project is not None:
        assert {v["project"] for v in body["volumes"]} <= {project}
    if project == "p3":
        assert rendered == b'{"volumes":[]}'  # an empty page: no `next`


def test_odd_names_and_every_column_read_back_as_the_view_of_each_volume(
    catalog: Catalog,
) -> None:
    body = json.loads(_sent(catalog.listing("p1", None, 100, None, None)))
    mask = _mask(None)
    for item in body["volumes"]:
        model = catalog.get(uuid.UUID(item["id"]), "p1")
        assert item == VolumeView.json_of(model, mask)  # every field, and no other
        assert list(item) == list(VolumeView.model_fields)  # in the view's order
    names = [v["name"] for v in body["volumes"]]
    assert names == sorted([*ODD_NAMES, "attached", "shared"])
    attached = body["volumes"][names.index("attached")]
    assert attached["attachment"]["readonly"] is True
    assert attached["seq"] == 2**40
    assert "image" not in attached
    assert "fault" not in attached
    created = {v["name"]: v["created_at"] for v in body["volumes"]}
    assert created["shared"] == 1764500001.0
    assert created['quote"d'] == 1764500000.123456789  # every digit of the float kept


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_pages_walked_with_after_are_the_pages_before(catalog: Catalog, limit: int) -> None:
    after: str | None = None
    walked: list[str] = []
    while True:
        listing = catalog.listing(None, None, limit, after, None)
        assert _sent(listing) == _before(catalog, _mask(None), None, None, limit, after)
        assert listing.count <= limit
        walked += [v["name"] for v in json.loads(listing.volumes)]
        if listing.next is None:
            break
        after = listing.next
    assert walked == [*sorted([*ODD_NAMES, "attached", "shared"]), "other", "zz"]


def test_a_member_sees_its_aliases_and_never_a_host_name(catalog: Catalog) -> None:
    mask = _mask("p1")
    rendered = _sent(catalog.listing("p1", None, 100, None, mask.aliases()))
    hosts = {v["host"] for v in json.loads(rendered)["volumes"]}
    assert hosts == {host_alias(KEY, "p1", "node-1"), host_alias(KEY, "p1", "node-2"), None}
    # The name that looks like a host field is only a name: no host name is left anywhere
    # but inside it.
    assert rendered.replace(json.dumps(ODD_NAMES[5]).encode(), b"").count(b"node-") == 0


def test_a_host_the_aliases_lack_is_named_and_nothing_rendered(catalog: Catalog) -> None:
    with pytest.raises(ServiceError) as refused:
        catalog.listing("p1", None, 100, None, {"node-1": "host-a"})
    assert refused.value.code == "unmapped_host"
    assert refused.value.details == {"hosts": ["node-2"]}
    extended = _mask("p1").aliases(["node-2"])
    assert extended is not None
    assert catalog.listing("p1", None, 100, None, extended).count == len(ODD_NAMES) + 2


def _stored(catalog: Catalog) -> dict[str, str | None]:
    with catalog.db.transaction() as conn:
        return {r.id: r.listing for r in conn.execute(sa.select(volumes.c.id, volumes.c.listing))}


def test_every_change_of_a_volume_keeps_its_stored_listing_what_its_columns_show(
    catalog: Catalog,
) -> None:
    """Create, guard into another state, change, attach, detach, remove: after each, the
    listing sent from the stored JSON is the page built anew from the columns, for the admin
    and for a member, and no row is left without its JSON."""
    catalog.fill_listings()  # the `built` rows too
    pool = PoolRow("default", "dir", "node-1", 1 << 40)
    volume_id = uuid.uuid4()
    domain_id = uuid.uuid4()

    def same() -> None:
        assert None not in _stored(catalog).values()
        for project in (None, "p1"):
            mask = _mask(project)
            sent = _sent(catalog.listing(project, None, 100, None, mask.aliases()))
            assert sent == _before(catalog, mask, project, None, 100, None)

    _volume, created = catalog.begin_create(
        volume_id=volume_id,
        project="p1",
        name="fresh",
        pool=pool,
        size=1 << 20,
        source_id=None,
        quota=None,
        lease_s=30.0,
    )
    assert created
    same()
    catalog.change(volume_id, {"state": "available", "size": 2 << 20}, None, None)
    same()
    catalog.guard(volume_id, "p1", states=("available",), action="wipe", to_state="deleting")
    same()
    catalog.change(volume_id, {"state": "available", "host": "node-2"}, None, None)
    catalog.release(volume_id)
    same()
    catalog.attach(volume_id, "p1", Attachment(domain_id=domain_id, target="vdb"), None)
    same()
    catalog.detach(volume_id, "p1", domain_id, None)
    same()
    catalog.change(volume_id, {}, None, None, remove=True)
    same()
    assert str(volume_id) not in _stored(catalog)


def test_the_rows_are_the_views_fields_in_order() -> None:
    assert list(VolumeViewRow.__struct_fields__) == list(VolumeView.model_fields)


def _listing_body(volumes: bytes, count: int, cursor: str | None = None) -> bytes:
    """A listing whose `volumes` are these bytes as a msgpack str (UTF-8 or not)."""
    head: bytes = msgpack.packb({"count": count, "next": cursor, "volumes": ""})
    assert head.endswith(b"\xa0")  # the empty str last: replaced by a str of `volumes`
    return head[:-1] + b"\xdb" + len(volumes).to_bytes(4, "big") + volumes


@pytest.mark.parametrize(
    ("volumes", "count"),
    [
        (b'[{"id":1},{"id":2}]', 1),  # the count is not the items'
        (b'[{"id":1},{"id":2}]', 3),
        (b'[{"id":1},{"id":2}', 2),  # not closed
        (b'[{"id":1}] {"id":2}', 1),  # something after the array
        (b'{"id":1}', 1),  # not an array
        (b'[{"id":1},2]', 2),  # an item that is no object
        (b'[{"id":1},"x"]', 2),
        (b'[{"id":"\xff"}]', 1),  # not UTF-8
        (b'[{"id":1,}]', 1),  # not JSON
        (b"", 0),
    ],
)
def test_the_api_refuses_a_listing_of_the_wrong_shape(volumes: bytes, count: int) -> None:
    with pytest.raises(ValueError):  # noqa: PT011  (msgspec's errors are ValueErrors)
        read_volume_listing(_listing_body(volumes, count))


def test_the_api_refuses_a_listing_whose_fields_are_wrong() -> None:
    for body in (
        msgpack.packb({"volumes": b"[]", "count": 0}, use_bin_type=True),  # bytes, not text
        msgpack.packb({"volumes": "[]", "count": -1}),
        msgpack.packb({"count": 0}),
    ):
        with pytest.raises(msgspec.ValidationError):
            read_volume_listing(body)


def test_an_empty_last_page_has_no_next() -> None:
    listing = read_volume_listing(_listing_body(b"[]", 0))
    assert volume_listing_json(listing) == b'{"volumes":[]}'
    cursor = 'p1/a"b\\c'
    listing = read_volume_listing(_listing_body(b"[]", 0, cursor))
    assert json.loads(volume_listing_json(listing)) == {"volumes": [], "next": cursor}


class _StorageBus:
    """The storage service's listing answered in-process from a real catalog, as the bus
    would (a refusal as a RemoteError); `count_off` breaks the reply's count."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.commands: list[ListVolumeListing] = []
        self.count_off = 0

    def call(self, queue: str, command: Command, *, timeout: float = 30.0, **_: Any) -> Message:
        assert queue == routing.STORAGE_QUEUE
        assert isinstance(command, ListVolumeListing)
        self.commands.append(command)
        c = command
        try:
            listing = self.catalog.listing(c.project, c.pool, c.limit, c.after, c.hosts)
        except ServiceError as exc:
            raise RemoteError(exc.code, exc.message, exc.details) from None
        return VolumeListing.of_json(listing.volumes, listing.count + self.count_off, listing.next)


@pytest.fixture
def api(catalog: Catalog, tmp_path: Path) -> Iterator[tuple[TestClient, _StorageBus]]:
    with catalog.db.transaction() as conn:
        conn.execute(sa.insert(volumes), [_row("alice", f"a{i}") for i in range(3)])
    registry = Registry.open(f"sqlite:///{tmp_path}/registry.db")
    bus = _StorageBus(catalog)
    try:
        with TestClient(create_app(CONFIG, registry=registry, bus=bus)) as client:
            yield client, bus
    finally:
        registry.close()


def test_through_the_api_a_member_gets_aliases_for_hosts_it_had_to_learn(
    api: tuple[TestClient, _StorageBus],
) -> None:
    client, bus = api
    reply = client.get("/v1/volumes", headers=auth(ALICE), params={"limit": 2})
    assert reply.status_code == 200, reply.text
    # The registry knows no host: the first ask named the page's hosts, the second had them.
    assert len(bus.commands) == 2
    assert bus.commands[0].hosts == {}
    assert bus.commands[-1].hosts is not None
    assert set(bus.commands[-1].hosts) == {"node-1"}
    assert b"node-" not in reply.content
    assert reply.json()["next"] is not None
    admin = client.get("/v1/volumes", headers=auth(ADMIN), params={"limit": 10_000})
    assert bus.commands[-1].hosts is None
    assert {v["host"] for v in admin.json()["volumes"]} == {"node-1", "node-2", "node-3", None}


def test_a_listing_reply_of_the_wrong_shape_is_a_bad_gateway(
    api: tuple[TestClient, _StorageBus],
) -> None:
    client, bus = api
    bus.count_off = 1
    reply = client.get("/v1/volumes", headers=auth(ADMIN))
    assert problem(reply, 502)["code"] == "bad_reply"
