"""The storage service's handlers on a real SQLite catalog and a real shared pool in a temp
dir (the pool the service serves itself; no broker): states, events with seq in the outbox,
refusals that leave nothing behind, projects kept apart, idempotent commands, reconcile."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import msgpack
import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from protos.base import Message
from protos.codec import decode, envelope_for, pack, parse_body
from protos.replies import ErrorReply
from protos.storage import VolumeEvent
from protos.volumes import (
    Attachment,
    AttachVolume,
    CreateVolume,
    DeleteVolume,
    DetachVolume,
    GetVolume,
    ListPools,
    ListVolumes,
    Pools,
    ResizeVolume,
    Volume,
    VolumePage,
    VolumeQuota,
    WipeVolume,
)
from services.bus import Context
from services.bus.service import dispatch
from services.db import current_revision, schema_drift
from services.storage.backends import LocalBackend
from services.storage.catalog import Catalog
from services.storage.config import StorageConfig
from services.storage.service import StorageService
from services.storage.tables import CATALOG, outbox, volumes

MiB = 1 << 20
GiB = 1 << 30


class Storage:
    def __init__(self, path: Path, replica: str = "r1", lease_s: float = 30.0) -> None:
        self.pool_dir = path / "shared"
        self.pool_dir.mkdir(exist_ok=True)
        self.config = StorageConfig(
            database_url=f"sqlite:///{path / 'catalog.db'}",
            replica=replica,
            shared_pools={"shared": self.pool_dir},
            default_pool="shared",
            lease_s=lease_s,
        )
        self.catalog = Catalog.open(self.config.database_url, replica)
        self.local = LocalBackend({"shared": self.pool_dir})
        self.service = StorageService(self.config, self.catalog, None, self.local)
        self.service.refresh_local_pools()

    def do(self, command: Message, message_id: str | None = None) -> Message:
        """The reply as its caller receives it: through the codec, validated."""
        envelope = envelope_for(command, source="test", message_id=message_id)
        reply = dispatch(self.service, command, Context(envelope))
        return parse_body(decode(pack(envelope_for(reply, source="storage"))))

    def ok(self, command: Message) -> Volume:
        reply = self.do(command)
        assert isinstance(reply, Volume), reply
        return reply

    def error(self, command: Message) -> ErrorReply:
        reply = self.do(command)
        assert isinstance(reply, ErrorReply), reply
        return reply

    def create(self, name: str, size: int = MiB, project: str = "p1") -> Volume:
        return self.ok(CreateVolume(volume_id=uuid.uuid4(), project=project, name=name, size=size))

    def files(self) -> set[str]:
        return {p.name for p in (self.pool_dir / "volumes").iterdir()}

    def events(self) -> list[VolumeEvent]:
        with self.catalog.db.transaction() as conn:
            rows = conn.execute(sa.select(outbox).order_by(outbox.c.id)).all()
        found = []
        for row in rows:
            event = parse_body(decode(bytes(row.body)))
            assert isinstance(event, VolumeEvent)
            assert row.routing_key == f"volume.{event.EVENT}.{event.volume_id}"
            found.append(event)
        return found

    def rows(self) -> int:
        with self.catalog.db.transaction() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(volumes)).scalar_one())


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(tmp_path)


def test_a_fresh_catalog_migrates_to_head_and_matches_its_tables(storage: Storage) -> None:
    with storage.catalog.db.transaction() as conn:
        assert current_revision(conn, CATALOG) == CATALOG.head()
        assert schema_drift(conn, CATALOG) == []


def test_create_is_available_with_an_event_and_a_file(storage: Storage) -> None:
    volume = storage.create("data", 4 * MiB)
    assert (volume.state, volume.size, volume.pool, volume.host) == (
        "available",
        4 * MiB,
        "shared",
        None,
    )
    assert storage.files() == {str(volume.volume_id)}
    assert (storage.pool_dir / "volumes" / str(volume.volume_id)).stat().st_size == 4 * MiB
    [event] = storage.events()
    assert (event.TYPE, event.seq, event.project, event.name, event.size) == (
        "volume.created",
        1,
        "p1",
        "data",
        4 * MiB,
    )
    pools = storage.do(ListPools())
    assert isinstance(pools, Pools)
    assert [(p.name, p.kind, p.volumes) for p in pools.pools] == [("shared", "shared", 1)]


def test_the_same_command_again_is_answered_not_run_again(storage: Storage) -> None:
    cmd = CreateVolume(volume_id=uuid.uuid4(), project="p1", name="once", size=MiB)
    first = storage.do(cmd, message_id="m-1")
    again = storage.do(cmd, message_id="m-2")  # the API's retry of the same volume id
    assert isinstance(first, Volume)
    assert isinstance(again, Volume)
    assert again.volume_id == first.volume_id
    assert again.state == "available"
    assert len(storage.events()) == 1
    assert storage.files() == {str(cmd.volume_id)}


@pytest.mark.parametrize(
    ("name", "reason"),
    [("a/b", "'/'"), ("..", "'..'"), ("a..b", "'..'"), ("a\0b", "NUL"), ("", "1-63")],
)
def test_bad_names_are_refused_by_the_model(name: str, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        CreateVolume(volume_id=uuid.uuid4(), project="p1", name=name, size=MiB)


@pytest.mark.parametrize("size", [-1, 0, 1000, (64 << 40) + 512])
def test_bad_sizes_are_refused_by_the_model(size: int) -> None:
    with pytest.raises(ValidationError):
        CreateVolume(volume_id=uuid.uuid4(), project="p1", name="v", size=size)


def test_refusals_leave_nothing_behind(storage: Storage) -> None:
    storage.create("taken")
    before = (storage.rows(), storage.files(), len(storage.events()))
    err = storage.error(CreateVolume(volume_id=uuid.uuid4(), project="p1", name="taken", size=MiB))
    assert (err.code, err.details["reason"]) == ("conflict", "name_in_use")
    err = storage.error(
        CreateVolume(volume_id=uuid.uuid4(), project="p1", name="huge", size=60 << 40)
    )
    assert (err.code, err.details["field"]) == ("no_space", "size")
    err = storage.error(
        CreateVolume(
            volume_id=uuid.uuid4(),
            project="p1",
            name="q",
            size=MiB,
            quota=VolumeQuota(volumes=1, gib=10),
        )
    )
    assert (err.code, err.details["resource"]) == ("over_quota", "volumes")
    err = storage.error(
        CreateVolume(
            volume_id=uuid.uuid4(),
            project="p1",
            name="q",
            size=2 * GiB,
            quota=VolumeQuota(volumes=10, gib=1),
        )
    )
    assert (err.code, err.details["resource"]) == ("over_quota", "gib")
    err = storage.error(CreateVolume(volume_id=uuid.uuid4(), project="p1", name="nosize"))
    assert (err.code, err.details["field"]) == ("invalid", "size")
    assert (storage.rows(), storage.files(), len(storage.events())) == before
    # The same name in another project is another volume.
    storage.create("taken", project="p2")


def test_another_projects_volume_is_not_found(storage: Storage) -> None:
    theirs = storage.create("theirs", project="p2")
    vid = theirs.volume_id
    for cmd in (
        GetVolume(volume_id=vid, project="p1"),
        DeleteVolume(volume_id=vid, project="p1"),
        ResizeVolume(volume_id=vid, project="p1", size=2 * MiB),
        WipeVolume(volume_id=vid, project="p1"),
        CreateVolume(volume_id=uuid.uuid4(), project="p1", name="copy", source_id=vid),
        AttachVolume(
            volume_id=vid,
            project="p1",
            attachment=Attachment(domain_id=uuid.uuid4(), target="vdb"),
        ),
    ):
        assert storage.error(cmd).code == "not_found", cmd
    page = storage.do(ListVolumes(project="p1"))
    assert isinstance(page, VolumePage)
    assert page.volumes == []
    assert storage.ok(GetVolume(volume_id=vid)).project == "p2"  # an admin sees it
    assert storage.ok(GetVolume(volume_id=vid, project="p2")).state == "available"


def test_attached_volumes_cannot_be_deleted_or_wiped_until_detached(storage: Storage) -> None:
    volume = storage.create("disk")
    domain = uuid.uuid4()
    attach = AttachVolume(
        volume_id=volume.volume_id,
        project="p1",
        attachment=Attachment(domain_id=domain, target="vdb"),
    )
    attached = storage.ok(attach)
    assert attached.state == "attached"
    assert attached.attachment == Attachment(domain_id=domain, target="vdb")
    assert storage.ok(attach).seq == attached.seq  # the same attach again: no new event
    other = AttachVolume(
        volume_id=volume.volume_id,
        project="p1",
        attachment=Attachment(domain_id=uuid.uuid4(), target="vdb"),
    )
    assert storage.error(other).details["reason"] == "attached"
    for cmd in (
        DeleteVolume(volume_id=volume.volume_id, project="p1"),
        WipeVolume(volume_id=volume.volume_id, project="p1"),
    ):
        err = storage.error(cmd)
        assert (err.code, err.details["reason"]) == ("conflict", "attached")
    assert storage.files() == {str(volume.volume_id)}
    detached = storage.ok(DetachVolume(volume_id=volume.volume_id, project="p1", domain_id=domain))
    assert (detached.state, detached.attachment) == ("available", None)
    storage.ok(DeleteVolume(volume_id=volume.volume_id, project="p1"))
    assert storage.files() == set()
    assert storage.rows() == 0
    types = [(e.TYPE, e.seq) for e in storage.events()]
    assert types == [
        ("volume.created", 1),
        ("volume.attached", 2),
        ("volume.detached", 3),
        ("volume.deleted", 4),
    ]


def test_resize_grows_and_refuses_to_shrink(storage: Storage) -> None:
    volume = storage.create("grow", 2 * MiB)
    grown = storage.ok(ResizeVolume(volume_id=volume.volume_id, project="p1", size=8 * MiB))
    assert grown.size == 8 * MiB
    assert (storage.pool_dir / "volumes" / str(volume.volume_id)).stat().st_size == 8 * MiB
    err = storage.error(ResizeVolume(volume_id=volume.volume_id, project="p1", size=MiB))
    assert (err.code, err.details["reason"]) == ("conflict", "shrink")
    resized = storage.events()[-1]
    assert (resized.TYPE, resized.size, getattr(resized, "previous_size", None)) == (
        "volume.resized",
        8 * MiB,
        2 * MiB,
    )


def test_a_clone_is_independent_and_wipe_zeroes(storage: Storage) -> None:
    source = storage.create("src", MiB)
    path = storage.pool_dir / "volumes" / str(source.volume_id)
    with path.open("r+b") as f:
        f.write(b"A" * 4096)
    clone = storage.ok(
        CreateVolume(
            volume_id=uuid.uuid4(),
            project="p1",
            name="copy",
            source_id=source.volume_id,
            size=2 * MiB,
        )
    )
    assert (clone.size, clone.source_id) == (2 * MiB, source.volume_id)
    clone_path = storage.pool_dir / "volumes" / str(clone.volume_id)
    with path.open("r+b") as f:
        f.write(b"B" * 4096)
    assert clone_path.read_bytes()[:4096] == b"A" * 4096
    storage.ok(WipeVolume(volume_id=source.volume_id, project="p1"))
    assert path.read_bytes()[:4096] == bytes(4096)
    assert clone_path.read_bytes()[:4096] == b"A" * 4096
    err = storage.error(
        CreateVolume(
            volume_id=uuid.uuid4(), project="p1", name="small", source_id=source.volume_id, size=512
        )
    )
    assert (err.code, err.details["field"]) == ("invalid", "size")


def test_pages_walk_every_volume_once(storage: Storage) -> None:
    for i in range(7):
        storage.create(f"v{i}")
    seen: list[str] = []
    after = None
    while True:
        page = storage.do(ListVolumes(project="p1", limit=3, after=after))
        assert isinstance(page, VolumePage)
        seen += [v.name for v in page.volumes]
        if page.next is None:
            break
        after = page.next
    assert seen == [f"v{i}" for i in range(7)]


def test_a_page_on_the_wire_is_each_volume_as_its_model_sends_it(storage: Storage) -> None:
    """The catalog builds a page's wire data from its rows without a model per volume: each
    must be exactly what Volume itself sends, attachment and clone source included."""
    source = storage.create("a-source")
    storage.ok(
        CreateVolume(
            volume_id=uuid.uuid4(), project="p1", name="b-clone", source_id=source.volume_id
        )
    )
    storage.ok(
        AttachVolume(
            volume_id=source.volume_id,
            project="p1",
            attachment=Attachment(domain_id=uuid.uuid4(), target="vdc", readonly=True),
        )
    )
    storage.create("c-other", project="p2")
    wire = storage.catalog.page_wire("p1", None, 10, None)
    expected = [
        storage.catalog.get(v.volume_id, "p1").model_dump(mode="json")
        for v in storage.catalog.page("p1", None, 10, None).volumes
    ]
    assert [v["name"] for v in expected] == ["a-source", "b-clone"]  # p2's is not listed
    assert expected[0]["attachment"]["readonly"] is True
    assert expected[1]["source_id"] == str(source.volume_id)
    body = msgpack.unpackb(pack(envelope_for(wire, source="storage")))["body"]
    assert body == {"volumes": expected, "next": None}
    assert [list(v) for v in body["volumes"]] == [list(v) for v in expected]  # keys in order


def test_reconcile_settles_what_a_dead_replica_left(tmp_path: Path) -> None:
    """A replica died mid-create (twice: before and after its file was made) and mid-delete;
    once their leases ran out, another replica settles each against the pool's files."""
    dead = Storage(tmp_path, replica="dead", lease_s=0.2)
    made = dead.create("made")
    gone = dead.create("gone")

    def stuck(name: str, state: str, volume_id: uuid.UUID) -> None:
        with dead.catalog.db.transaction() as conn:
            values = {"id": str(volume_id), "project": "p1", "name": name, "pool": "shared"}
            if state == "creating":
                conn.execute(
                    sa.insert(volumes).values(
                        **values,
                        size=MiB,
                        state=state,
                        lease_owner="dead",
                        lease_until=time.time() + 0.2,
                        created_at=time.time(),
                        updated_at=time.time(),
                    )
                )
            else:
                conn.execute(
                    sa.update(volumes)
                    .where(volumes.c.id == str(volume_id))
                    .values(state=state, lease_owner="dead", lease_until=time.time() + 0.2)
                )

    # Mid-create with its file made (the agent finished, the replica died before recording).
    finished = uuid.uuid4()
    dead.local.create("shared", finished, MiB, None)
    stuck("finished", "creating", finished)
    # Mid-create before any file, and mid-delete of a volume whose file is still there.
    never = uuid.uuid4()
    stuck("never", "creating", never)
    stuck("gone", "deleting", gone.volume_id)

    live = Storage(tmp_path, replica="live")
    assert live.service.reconcile() == {}  # the leases still hold
    time.sleep(0.3)
    settled = live.service.reconcile()
    assert settled == {finished: "created", never: "removed", gone.volume_id: "deleted"}
    assert live.files() == {str(made.volume_id), str(finished)}
    states = {v.name: v.state for v in live.catalog.page(None, None, 100, None).volumes}
    assert states == {"made": "available", "finished": "available"}
    assert live.catalog.stuck(time.time() + 3600) == []
    last = [(e.TYPE, e.volume_id) for e in live.events()[-2:]]
    assert sorted(last) == sorted(
        [("volume.created", finished), ("volume.deleted", gone.volume_id)]
    )


def test_a_working_replica_keeps_its_lease(tmp_path: Path) -> None:
    storage = Storage(tmp_path, lease_s=0.3)
    volume = storage.create("held")
    storage.catalog.guard(
        volume.volume_id,
        None,
        states=("available",),
        action="test",
        to_state="deleting",
        lease_s=0.3,
    )
    storage.service.leases.start()
    try:
        with storage.service.leases.hold(volume.volume_id):
            time.sleep(0.8)  # past the lease: renewed meanwhile
            assert storage.catalog.stuck() == []
    finally:
        storage.service.leases.stop()


def test_every_host_may_have_a_pool_of_the_same_name(storage: Storage) -> None:
    """Each compute node has its own `default` pool: the catalog keeps one per host, and a
    new volume goes to the one with the most free space."""
    from protos.storage import PoolCapabilities, PoolInfo

    caps = PoolCapabilities(reflink=False, punch_hole=True)
    for host, free in (("h1", 10 * GiB), ("h2", 20 * GiB)):
        info = PoolInfo(
            name="default",
            kind="dir",
            host=host,
            capacity=40 * GiB,
            allocation=0,
            available=free,
            capabilities=caps,
        )
        storage.catalog.put_pool(info, host, live_s=60)
    pools = storage.do(ListPools())
    assert isinstance(pools, Pools)
    assert [(p.name, p.host) for p in pools.pools] == [
        ("default", "h1"),
        ("default", "h2"),
        ("shared", None),
    ]
    assert storage.catalog.pool("default").host == "h2"
    assert storage.catalog.pool("shared").host is None


def test_a_silent_hosts_pool_takes_nothing_new(storage: Storage) -> None:
    """Of two hosts' `default` pools, the one whose host stopped answering is passed over even
    with more free space; with both silent the pool is `unavailable` (a 503), not a 30 s wait
    on an agent that is gone. A heartbeat makes the host's pools placeable again."""
    from protos.storage import PoolCapabilities, PoolInfo
    from services.bus import ServiceError

    caps = PoolCapabilities(reflink=False, punch_hole=True)
    for host, free, live_s in (("h1", 10 * GiB, 60.0), ("h2", 20 * GiB, 0.0)):
        info = PoolInfo(
            name="default",
            kind="dir",
            host=host,
            capacity=40 * GiB,
            allocation=0,
            available=free,
            capabilities=caps,
        )
        storage.catalog.put_pool(info, host, live_s=live_s)
    assert storage.catalog.pool("default").host == "h1"
    storage.catalog.host_live("h1", 0.0)
    with pytest.raises(ServiceError) as err:
        storage.catalog.pool("default")
    assert err.value.code == "unavailable", err.value
    storage.catalog.host_live("h2", 30.0)
    assert storage.catalog.pool("default").host == "h2"


def test_a_fast_heartbeat_keeps_its_pools_up_for_a_few_seconds(storage: Storage) -> None:
    """Three intervals of a 0.3 s heartbeat (0.9 s) are shorter than a busy host's stalls: a
    heartbeat keeps its host's pools up for at least POOL_LIVE_MIN_S."""
    from protos.host import HostHeartbeat, HostInventory, KvmKind, Resources
    from protos.storage import PoolCapabilities, PoolInfo
    from services.storage.service import POOL_LIVE_MIN_S

    caps = PoolCapabilities(reflink=False, punch_hole=True)
    info = PoolInfo(
        name="default",
        kind="dir",
        host="h1",
        capacity=40 * GiB,
        allocation=0,
        available=10 * GiB,
        capabilities=caps,
    )
    storage.catalog.put_pool(info, "h1", live_s=0.0)
    storage.service._refreshed["h1"] = time.monotonic()  # its pools were just learned
    beat = HostHeartbeat(
        host="h1",
        version="0.1.0",
        interval_s=0.3,
        enabled=True,
        inventory=HostInventory(capacity=Resources(vcpus=8, memory_mib=4096), kvm=KvmKind.NONE),
        usage=Resources(vcpus=0, memory_mib=0),
    )
    storage.service.heartbeat(beat, None)  # type: ignore[arg-type]
    time.sleep(1.0)  # past three of its intervals
    assert POOL_LIVE_MIN_S > 1.0
    assert storage.catalog.pool("default").host == "h1"


def test_a_create_whose_undo_fails_is_kept_in_error_until_deleted(storage: Storage) -> None:
    """A clone made but not grown (the host refused the grow), whose removal then found the
    host away: the volume stays in the catalog in `error` (its file may be there), never
    forgotten with an orphan file; deleting it later removes the file."""
    from services.bus import ServiceError
    from services.storage.backends import Unreachable

    class Failing(LocalBackend):
        def resize(self, pool: str, volume_id: uuid.UUID, size: int, _key: str | None) -> int:
            raise ServiceError("no_space", "the pool filled up")

        def delete(self, pool: str, volume_id: uuid.UUID, _key: str | None) -> None:
            raise Unreachable("host away")

    source = storage.create("src")
    working = storage.service.local
    storage.service.local = Failing({"shared": storage.pool_dir})
    clone_id = uuid.uuid4()
    err = storage.error(
        CreateVolume(
            volume_id=clone_id, project="p1", name="copy", source_id=source.volume_id, size=2 * MiB
        )
    )
    assert err.code == "no_space"
    kept = storage.ok(GetVolume(volume_id=clone_id, project="p1"))
    assert (kept.state, kept.fault) == ("error", "the pool filled up")
    assert str(clone_id) in storage.files()
    storage.service.local = working
    storage.ok(DeleteVolume(volume_id=clone_id, project="p1"))
    assert storage.files() == {str(source.volume_id)}
