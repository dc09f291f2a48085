"""Images in the storage catalog: the service's image handlers on a real SQLite catalog and a
real shared pool, with the bytes streamed over the pool's real transfer port on loopback
(compute_node/storage_transfer.py): raw and qcow2 imports, deduplication, refusals that
leave nothing, projects kept apart, events in the outbox, reconcile of an abandoned import."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from compute_node import storage_transfer
from compute_node.storage_transfer import TransferServer, read_line, send_frames
from protos.base import Message
from protos.codec import decode, envelope_for, parse_body
from protos.images import (
    BeginImageImport,
    BeginVolumeUpload,
    DeleteImage,
    EndImageImport,
    EndVolumeUpload,
    FindImage,
    GetImage,
    Image,
    ImageEvent,
    ImageImport,
    ImageList,
    ImageQuota,
    ImportImageFromHost,
    ListImages,
    UploadedVolume,
    VolumeUpload,
)
from protos.replies import ErrorReply
from services.bus import Context
from services.bus.service import dispatch
from services.storage.backends import LocalBackend
from services.storage.catalog import Catalog
from services.storage.config import StorageConfig
from services.storage.service import StorageService
from services.storage.tables import images, outbox, volumes
from tests.kvm.tinyguest import build_pvh_elf, code_print_and_exit
from tests.loopfs import small_tmpfs

MiB = 1 << 20


def kernel(tag: bytes) -> bytes:
    """A kernel image the VMM's loader accepts (a PVH ELF printing `tag`)."""
    return build_pvh_elf(code_print_and_exit(tag, 0))


class Images:
    def __init__(self, path: Path, pool_dir: Path | None = None) -> None:
        self.pool_dir = pool_dir or path / "shared"
        self.pool_dir.mkdir(exist_ok=True)
        self.config = StorageConfig(
            database_url=f"sqlite:///{path / 'catalog.db'}",
            replica="r1",
            shared_pools={"shared": self.pool_dir},
            default_pool="shared",
            lease_s=30.0,
        )
        self.catalog = Catalog.open(self.config.database_url, "r1")
        self.transfers = TransferServer().start()
        self.local = LocalBackend({"shared": self.pool_dir}, self.transfers)
        self.service = StorageService(self.config, self.catalog, None, self.local)
        self.service.refresh_local_pools()

    def do(self, command: Message) -> Message:
        return dispatch(self.service, command, Context(envelope_for(command, source="test")))

    def begin(self, name: str, project: str = "p1", **kw: object) -> ImageImport:
        reply = self.do(
            BeginImageImport(image_id=uuid.uuid4(), project=project, name=name, **kw)  # type: ignore[arg-type]
        )
        assert isinstance(reply, ImageImport), reply
        return reply

    def stream(self, started: ImageImport, data: bytes, *, end: bool = True) -> dict[str, object]:
        with socket.create_connection((started.ticket.address, started.ticket.port)) as conn:
            conn.sendall(started.ticket.ticket.encode() + b"\n")
            if not end:  # cut short: half the bytes, no end mark
                conn.sendall(storage_transfer.FRAME.pack(len(data)) + data[: len(data) // 2])
                conn.shutdown(socket.SHUT_WR)
            else:
                send_frames(conn, iter([data]))
            return read_line(conn)

    def upload(self, name: str, data: bytes, project: str = "p1", **kw: object) -> Message:
        started = self.begin(name, project, **kw)
        self.stream(started, data)
        return self.do(EndImageImport(image_id=started.image.image_id, project=project))

    def image(self, name: str, data: bytes, project: str = "p1", **kw: object) -> Image:
        reply = self.upload(name, data, project, **kw)
        assert isinstance(reply, Image), reply
        return reply

    def files(self) -> set[str]:
        return {p.name for p in (self.pool_dir / "images").iterdir()}

    def temps(self) -> list[str]:
        return [p.name for p in (self.pool_dir / ".tmp").iterdir()]

    def events(self) -> list[ImageEvent]:
        with self.catalog.db.transaction() as conn:
            rows = conn.execute(sa.select(outbox).order_by(outbox.c.id)).all()
        found = []
        for row in rows:
            event = parse_body(decode(bytes(row.body)))
            assert isinstance(event, ImageEvent)
            assert row.routing_key == f"image.{event.EVENT}.{event.image_id}"
            found.append(event)
        return found

    def rows(self) -> int:
        with self.catalog.db.transaction() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(images)).scalar_one())


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Images]:
    found = Images(tmp_path)
    yield found
    found.transfers.stop()


def _qcow2_of(raw: Path, out: Path, *extra: str) -> bytes:
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *extra, str(raw), str(out)],
        check=True,
        capture_output=True,
    )
    return out.read_bytes()


def test_a_raw_import_is_stored_by_its_sha256_with_an_event(store: Images) -> None:
    data = kernel(b"debian")
    image = store.image("debian", data, kind="kernel")
    sha = hashlib.sha256(data).hexdigest()
    assert (image.state, image.sha256, image.size, image.kind, image.source_format) == (
        "available",
        sha,
        len(data),
        "kernel",
        "raw",
    )
    path = store.pool_dir / "images" / sha
    assert path.read_bytes() == data
    assert path.stat().st_mode & 0o777 == 0o444
    (event,) = store.events()
    assert (event.TYPE, event.sha256, event.name, event.project) == (
        "image.imported",
        sha,
        "debian",
        "p1",
    )
    assert store.temps() == []


def test_the_same_bytes_again_add_a_name_not_a_file(store: Images, tmp_path: Path) -> None:
    data = bytes(range(256)) * 8192  # 2 MiB
    first = store.image("one", data)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(data)
    qcow2 = _qcow2_of(raw, tmp_path / "disk.qcow2")
    second = store.image("two", qcow2)  # the same content as qcow2: converted, then the same
    assert second.sha256 == first.sha256
    assert second.source_format == "qcow2"
    assert store.files() == {first.sha256}
    events = store.events()
    assert [getattr(e, "deduplicated", None) for e in events] == [False, True]
    # Deleting one name keeps the file; the last name takes it.
    store.do(DeleteImage(image_id=first.image_id, project="p1"))
    assert store.files() == {first.sha256}
    store.do(DeleteImage(image_id=second.image_id, project="p1"))
    assert store.files() == set()
    assert [e.TYPE for e in store.events()][2:] == ["image.deleted", "image.deleted"]
    assert [getattr(e, "file_removed", None) for e in store.events()][2:] == [False, True]


def test_a_qcow2_is_converted_to_raw(store: Images, tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    with raw.open("wb") as f:
        f.truncate(64 * MiB)
        f.seek(10 * MiB)
        f.write(b"flotilla" * 1000)
    image = store.image("q", _qcow2_of(raw, tmp_path / "src.qcow2"), format="qcow2")
    assert image.size == 64 * MiB
    stored = store.pool_dir / "images" / str(image.sha256)
    assert stored.read_bytes() == raw.read_bytes()
    assert stored.stat().st_blocks * 512 < 4 * MiB  # stays sparse


def test_a_qcow2_with_a_backing_file_is_refused_and_leaves_nothing(
    store: Images, tmp_path: Path
) -> None:
    secret = tmp_path / "host-secret.raw"
    secret.write_bytes(b"secret" * 1000)
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(overlay)],
        check=True,
        capture_output=True,
    )
    reply = store.upload("evil", overlay.read_bytes())
    assert isinstance(reply, ErrorReply), reply
    assert reply.code == "invalid"
    assert "backing file" in reply.message
    assert (store.rows(), store.files(), store.temps(), store.events()) == (0, set(), [], [])


def test_a_kernel_image_that_is_no_kernel_is_refused(store: Images) -> None:
    reply = store.upload("k", b"MZ" + bytes(8190), kind="kernel")
    assert isinstance(reply, ErrorReply), reply
    assert reply.code == "invalid"
    assert "not a kernel image" in reply.message
    assert (store.rows(), store.files(), store.temps()) == (0, set(), [])


def test_a_declared_format_that_is_not_the_content_is_refused(store: Images) -> None:
    reply = store.upload("liar", b"not a qcow2 at all" * 100, format="qcow2")
    assert isinstance(reply, ErrorReply), reply
    assert reply.code == "invalid"
    assert "declared qcow2" in reply.message
    assert (store.rows(), store.files()) == (0, set())


def test_a_truncated_stream_leaves_no_image_and_no_file(store: Images) -> None:
    started = store.begin("cut")
    answer = store.stream(started, b"x" * MiB, end=False)
    assert (answer["state"], answer["code"]) == ("failed", "truncated")
    reply = store.do(EndImageImport(image_id=started.image.image_id, project="p1"))
    assert isinstance(reply, ErrorReply), reply
    assert reply.code == "invalid"
    assert (store.rows(), store.files(), store.temps(), store.events()) == (0, set(), [], [])


def test_an_empty_image_is_refused(store: Images) -> None:
    reply = store.upload("empty", b"")
    assert isinstance(reply, ErrorReply), reply
    assert (reply.code, store.rows()) == ("invalid", 0)


@pytest.mark.parametrize("name", ["a/b", "..", "a..b", "nul\0", "", "x" * 64, "-lead"])
def test_bad_names_are_refused_by_the_model(name: str) -> None:
    with pytest.raises(ValidationError):
        BeginImageImport(image_id=uuid.uuid4(), project="p1", name=name)


def test_a_private_image_of_another_project_is_not_found(store: Images) -> None:
    mine = store.image("mine", b"a" * 4096)
    public = store.image("shared-one", b"b" * 4096, project="ops", visibility="public")
    for command in (
        GetImage(image_id=mine.image_id, project="p2"),
        DeleteImage(image_id=mine.image_id, project="p2"),
        FindImage(name="mine", project="p2"),
        EndImageImport(image_id=mine.image_id, project="p2"),
        # A public image is usable by all, deletable only by its project.
        DeleteImage(image_id=public.image_id, project="p2"),
    ):
        reply = store.do(command)
        assert isinstance(reply, ErrorReply), (command, reply)
        assert reply.code == "not_found", reply
        assert "mine" not in reply.message or command.TYPE == "cmd.catalog.image_find"
    seen = store.do(ListImages(project="p2"))
    assert isinstance(seen, ImageList)
    assert [i.name for i in seen.images] == ["shared-one"]
    found = store.do(FindImage(name="shared-one", project="p2"))
    assert isinstance(found, Image)
    assert found.image_id == public.image_id
    everything = store.do(ListImages(project=None))
    assert isinstance(everything, ImageList)
    assert len(everything.images) == 2


def test_find_prefers_the_projects_own_image_over_a_public_one(store: Images) -> None:
    store.image("base", b"p" * 4096, project="ops", visibility="public")
    own = store.image("base", b"o" * 4096, project="p1")
    found = store.do(FindImage(name="base", project="p1"))
    assert isinstance(found, Image)
    assert found.image_id == own.image_id


def test_a_name_in_use_is_a_conflict(store: Images) -> None:
    store.image("dup", b"1" * 4096)
    reply = store.do(BeginImageImport(image_id=uuid.uuid4(), project="p1", name="dup"))
    assert isinstance(reply, ErrorReply), reply
    assert (reply.code, reply.details.get("reason")) == ("conflict", "name_in_use")


def test_an_import_whose_caller_went_away_is_settled_by_reconcile(store: Images) -> None:
    """The bytes arrived but nobody said `end` (the API died): once the lease runs out,
    reconcile asks the pool for the outcome and records the image."""
    data = b"z" * 8192
    started = store.begin("orphaned")
    store.stream(started, data)
    with store.catalog.db.transaction() as conn:
        conn.execute(sa.update(images).values(lease_until=time.time() - 1))
    done = store.service.reconcile_images()
    assert done == {started.image.image_id: "imported"}
    image = store.do(GetImage(image_id=started.image.image_id, project="p1"))
    assert isinstance(image, Image)
    assert (image.state, image.sha256) == ("available", hashlib.sha256(data).hexdigest())


def test_reconcile_forgets_an_import_never_streamed_and_sweeps_unnamed_files(
    store: Images, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage_transfer, "TICKET_TTL_S", 0.0)
    started = store.begin("never")
    stray = store.pool_dir / "images" / ("ab" * 32)
    stray.write_bytes(b"left by a name deleted while its host was away")
    with store.catalog.db.transaction() as conn:
        conn.execute(sa.update(images).values(lease_until=time.time() - 1))
    done = store.service.reconcile_images()
    assert done[started.image.image_id].startswith("forgotten")
    assert (store.rows(), store.files()) == (0, set())


def test_an_import_past_its_gib_quota_settled_by_reconcile_leaves_nothing(
    store: Images, tmp_path: Path
) -> None:
    """The limit an import began under holds when reconcile records it (its caller went
    away): past it the row goes, and the file too -- once no import into the pool is under
    way, which may be storing the same bytes."""
    qcow2 = tmp_path / "big.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), str((1 << 30) + 4096)], check=True
    )
    quota = ImageQuota(images=5, image_gib=1)
    started = store.begin("big", format="qcow2", quota=quota)
    store.stream(started, qcow2.read_bytes())
    other = store.begin("other", quota=quota)  # under way: the file stays for now
    with store.catalog.db.transaction() as conn:
        conn.execute(
            sa.update(images)
            .where(images.c.id == str(started.image.image_id))
            .values(lease_until=time.time() - 1)
        )
    done = store.service.reconcile_images()
    assert "GiB of images" in done[started.image.image_id], done
    assert store.rows() == 1  # only `other`, still importing
    assert len(store.files()) == 1
    store.stream(other, b"o" * 4096)
    assert isinstance(store.do(EndImageImport(image_id=other.image.image_id, project="p1")), Image)
    store.service.reconcile_images()  # the sweep: nothing names the big file
    assert store.files() == {hashlib.sha256(b"o" * 4096).hexdigest()}
    assert store.temps() == []


def test_an_image_count_quota_counts_imports_under_way(store: Images) -> None:
    quota = ImageQuota(images=1)
    store.begin("first", quota=quota)
    reply = store.do(
        BeginImageImport(image_id=uuid.uuid4(), project="p1", name="second", quota=quota)
    )
    assert isinstance(reply, ErrorReply), reply
    assert (reply.code, reply.details) == (
        "over_quota",
        {"resource": "images", "limit": 1, "used": 1, "requested": 1},
    )
    other_project = store.begin("second", project="p2", quota=quota)
    assert other_project.image.state == "importing"


def test_an_admin_imports_a_host_file(store: Images, tmp_path: Path) -> None:
    src = tmp_path / "kernel.bin"
    src.write_bytes(kernel(b"host"))
    reply = store.do(
        ImportImageFromHost(
            image_id=uuid.uuid4(), project="ops", name="k", kind="kernel", path=str(src)
        )
    )
    assert isinstance(reply, Image), reply
    assert reply.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    missing = store.do(
        ImportImageFromHost(image_id=uuid.uuid4(), project="ops", name="m", path="/nonexistent")
    )
    assert isinstance(missing, ErrorReply)
    assert (missing.code, store.rows()) == ("invalid", 1)


# ---- volume uploads --------------------------------------------------------------------------


def _upload_volume(
    store: Images, name: str, data: bytes, *, sha256: str | None = None, fill: Path | None = None
) -> tuple[dict[str, object], Message]:
    started = store.do(
        BeginVolumeUpload(
            volume_id=uuid.uuid4(), project="p1", name=name, size=len(data), sha256=sha256
        )
    )
    assert isinstance(started, VolumeUpload), started
    ticket = started.ticket
    with socket.create_connection((ticket.address, ticket.port)) as conn:
        conn.sendall(ticket.ticket.encode() + b"\n")
        if fill is None:
            send_frames(conn, iter([data]))
            answer = read_line(conn)
        else:
            # Another writer takes the rest of the space after the first MiB.
            conn.sendall(storage_transfer.FRAME.pack(MiB) + data[:MiB])
            _fill(fill)
            try:  # the host stops reading once it fails: the rest may be refused
                send_frames(conn, iter([data[MiB:]]))
                answer = read_line(conn)
            except OSError:
                answer = store.transfers.result(ticket.ticket).model_dump()
    return answer, store.do(EndVolumeUpload(volume_id=started.volume.volume_id, project="p1"))


def _fill(mnt: Path) -> None:
    with (mnt / "filler").open("wb") as f:
        try:
            while True:
                f.write(os.urandom(MiB))
                f.flush()
        except OSError:
            pass


def _volume_rows(store: Images) -> int:
    with store.catalog.db.transaction() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(volumes)).scalar_one())


def test_an_uploaded_volume_is_visible_whole_with_its_sha256(store: Images) -> None:
    data = os.urandom(MiB) + bytes(2 * MiB) + os.urandom(MiB)
    answer, reply = _upload_volume(store, "up", data, sha256=hashlib.sha256(data).hexdigest())
    assert answer["state"] == "done"
    assert isinstance(reply, UploadedVolume), reply
    assert reply.sha256 == hashlib.sha256(data).hexdigest()
    assert (reply.volume.state, reply.volume.size) == ("available", len(data))
    path = store.pool_dir / "volumes" / str(reply.volume.volume_id)
    assert path.read_bytes() == data
    assert path.stat().st_blocks * 512 < 3 * MiB  # the zeros stay holes
    with store.catalog.db.transaction() as conn:
        (row,) = conn.execute(sa.select(outbox)).all()
    assert row.routing_key == f"volume.created.{reply.volume.volume_id}"


def test_an_upload_ended_while_reconcile_settles_it_is_announced_once(
    store: Images, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted service's reconcile and the client's `end` both find the upload done on
    its host: whichever records it first announces it, the other changes nothing (the end
    answers conflict). Both used to record it, and `volume.created` went out twice."""
    data = os.urandom(MiB)
    started = store.do(BeginVolumeUpload(volume_id=uuid.uuid4(), project="p1", name="up", size=MiB))
    assert isinstance(started, VolumeUpload), started
    ticket = started.ticket
    with socket.create_connection((ticket.address, ticket.port)) as conn:
        conn.sendall(ticket.ticket.encode() + b"\n")
        send_frames(conn, iter([data]))
        assert read_line(conn)["state"] == "done"
    real = store.local.transfer_result
    raced: list[str] = []

    def result_then_reconcile(ticket_: str) -> object:
        answer = real(ticket_)
        if not raced:  # the end handler asked; reconcile settles the volume meanwhile
            raced.append("")
            volume = store.catalog.get(started.volume.volume_id, None)
            raced[0] = store.service._settle(volume)
        return answer

    monkeypatch.setattr(store.local, "transfer_result", result_then_reconcile)
    reply = store.do(EndVolumeUpload(volume_id=started.volume.volume_id, project="p1"))
    assert raced == ["created"]
    assert isinstance(reply, ErrorReply), reply
    assert reply.code == "conflict"
    with store.catalog.db.transaction() as db:
        keys = [r.routing_key for r in db.execute(sa.select(outbox)).all()]
    assert keys == [f"volume.created.{started.volume.volume_id}"]
    assert store.catalog.get(started.volume.volume_id, "p1").state == "available"


def test_a_wrong_sha256_leaves_no_volume(store: Images) -> None:
    answer, reply = _upload_volume(store, "bad", os.urandom(4096), sha256="0" * 64)
    assert answer["code"] == "checksum_mismatch"
    assert isinstance(reply, ErrorReply), reply
    assert (reply.code, reply.details.get("field")) == ("invalid", "sha256")
    assert (_volume_rows(store), list((store.pool_dir / "volumes").iterdir()), store.temps()) == (
        0,
        [],
        [],
    )


@pytest.mark.root
def test_enospc_mid_upload_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    with small_tmpfs(32 * MiB) as mnt:
        store = Images(tmp_path, pool_dir=mnt / "shared")
        try:
            answer, reply = _upload_volume(store, "big", os.urandom(24 * MiB), fill=mnt)
            assert answer["code"] == "no_space", answer
            assert isinstance(reply, ErrorReply), reply
            assert (reply.code, reply.details.get("field")) == ("no_space", "size")
            assert "uploading volume" in reply.message
            assert _volume_rows(store) == 0
            assert list((store.pool_dir / "volumes").iterdir()) == []
            assert store.temps() == []
        finally:
            store.transfers.stop()
