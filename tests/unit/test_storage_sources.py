"""Volumes and images bound to a definition, resolved and opened in the node's own pools
(compute_node.storage_sources), and kept with the definition by the lifecycle service."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

import pytest

from compute_node.boot_sources import BootFiles, SourceRefused
from compute_node.storage import ImageStore, Pool, VolumeStore, open_volume
from compute_node.storage_sources import StorageBindings, StorageSources
from protos.bindings import DiskBinding, ImageRef
from protos.commands import DefineDomain, DestroyDomain, StartDomain
from protos.domain import BootSpec, DiskSpec, DomainSpec, PowerState
from protos.replies import ErrorReply
from tests.bootfiles import KERNEL
from tests.unit.test_compute_lifecycle import Node

HOST = "node-1"
MIB = 1024 * 1024


@pytest.fixture
def pools(tmp_path: Path) -> dict[str, Pool]:
    (tmp_path / "local").mkdir()
    (tmp_path / "shared").mkdir()
    return {
        "local": Pool(tmp_path / "local", "dir"),
        "nfs": Pool(tmp_path / "shared", "shared"),
    }


@pytest.fixture
def sources(pools: dict[str, Pool]) -> StorageSources:
    return StorageSources(HOST, pools)


def volume(pool: Pool, size: int = MIB) -> uuid.UUID:
    vid = uuid.uuid4()
    VolumeStore(pool).create(str(vid), size)
    return vid


def spec(*disks: DiskSpec, image: str | None = None) -> DomainSpec:
    boot = BootSpec(image=image) if image else BootSpec(kernel=KERNEL)
    return DomainSpec(name="d1", boot=boot, disks=list(disks))


def bound(vid: uuid.UUID, target: str = "vda", pool: str = "local", **kw: object) -> DiskBinding:
    host = kw.pop("host", HOST if pool == "local" else None)
    return DiskBinding(target=target, volume_id=vid, pool=pool, host=host, **kw)  # type: ignore[arg-type]


def refusal(sources: StorageSources, s: DomainSpec, b: StorageBindings) -> SourceRefused:
    with pytest.raises(SourceRefused) as caught, BootFiles() as files:
        sources.open(s, b, files)
    return caught.value


def test_a_bound_volume_is_opened_read_write_from_its_pool(
    sources: StorageSources, pools: dict[str, Pool]
) -> None:
    vid = volume(pools["local"])
    s = spec(DiskSpec(target="vdb", volume_id=vid))
    with BootFiles() as files:
        sources.open(s, StorageBindings(disks=(bound(vid, "vdb"),)), files)
        (disk,) = files.disks
        assert disk.target == "vdb"
        assert not disk.read_only
        assert disk.disk_id == str(vid)[:20]
        assert os.fstat(disk.fd).st_ino == pools["local"].volume_path(str(vid)).stat().st_ino
        os.pwrite(disk.fd, b"x", 0)  # read-write


def test_readonly_in_the_binding_or_the_spec_opens_read_only(
    sources: StorageSources, pools: dict[str, Pool]
) -> None:
    a, b = volume(pools["local"]), volume(pools["nfs"])
    s = spec(
        DiskSpec(target="vda", volume_id=a, readonly=True), DiskSpec(target="vdb", volume_id=b)
    )
    bindings = StorageBindings(disks=(bound(a), bound(b, "vdb", "nfs", readonly=True)))
    with BootFiles() as files:
        sources.open(s, bindings, files)
        assert [d.target for d in files.disks] == ["vda", "vdb"]
        for disk in files.disks:
            assert disk.read_only
            with pytest.raises(OSError, match="Bad file descriptor"):
                os.pwrite(disk.fd, b"x", 0)


def test_a_volume_another_writer_holds_is_a_conflict_at_start_not_at_define(
    sources: StorageSources, pools: dict[str, Pool]
) -> None:
    vid = volume(pools["local"])
    path = pools["local"].volume_path(str(vid))
    s = spec(DiskSpec(target="vda", volume_id=vid))
    bindings = StorageBindings(disks=(bound(vid),))
    ro = StorageBindings(disks=(bound(vid, readonly=True),))
    writer = open_volume(path, read_only=False, what="v")
    try:
        for b in (bindings, ro):
            err = refusal(sources, s, b)
            assert (err.code, err.field) == ("conflict", "disks.0")
            assert f"vda (volume {vid} in pool local) is in use" in err.message
        sources.exist(s, bindings)  # a redefinition of the running domain is fine
    finally:
        os.close(writer)
    reader = open_volume(path, read_only=True, what="v")
    try:
        with BootFiles() as files:  # readers share
            sources.open(s, ro, files)
        assert refusal(sources, s, bindings).code == "conflict"
    finally:
        os.close(reader)


def test_a_root_disk_bound_without_a_spec_disk_is_attached(
    sources: StorageSources, pools: dict[str, Pool]
) -> None:
    vid = volume(pools["local"])
    with BootFiles() as files:
        sources.open(spec(), StorageBindings(disks=(bound(vid),)), files)
        assert [d.target for d in files.disks] == ["vda"]


@pytest.mark.parametrize(
    ("make", "code", "words"),
    [
        (lambda v: bound(v, pool="nowhere", host=HOST), "not_found", "no pool 'nowhere'"),
        (lambda v: bound(v, host="node-2"), "invalid", "of host node-2 is not on this host"),
        (lambda v: bound(v, host=None), "invalid", "must name its host"),
        (lambda _v: bound(uuid.uuid4()), "not_found", "does not exist"),
    ],
    ids=["unknown-pool", "other-host", "dir-pool-without-host", "missing-file"],
)
def test_a_binding_this_node_cannot_honour_is_refused(
    sources: StorageSources, pools: dict[str, Pool], make: object, code: str, words: str
) -> None:
    vid = volume(pools["local"])
    assert callable(make)
    err = refusal(sources, spec(), StorageBindings(disks=(make(vid),)))
    assert err.code == code
    assert err.field == "disks.0"
    assert words in err.message


def test_a_symlink_planted_in_the_pool_is_not_followed(
    sources: StorageSources, pools: dict[str, Pool], tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"host data")
    vid = uuid.uuid4()
    pools["local"].volume_path(str(vid)).symlink_to(secret)
    err = refusal(sources, spec(), StorageBindings(disks=(bound(vid),)))
    assert err.code == "invalid"
    assert "outside" in err.message or "symbolic" in err.message


def test_a_spec_volume_without_its_binding_is_refused(
    sources: StorageSources, pools: dict[str, Pool]
) -> None:
    vid, other = volume(pools["local"]), volume(pools["local"])
    s = spec(DiskSpec(target="vda", volume_id=vid))
    for bindings in (StorageBindings(), StorageBindings(disks=(bound(other),))):
        err = refusal(sources, s, bindings)
        assert (err.code, err.field) == ("invalid", "disks.0.volume_id")
        assert "not resolved by the storage service" in err.message


def test_more_disks_than_the_runtime_has_slots_are_refused(
    sources: StorageSources, pools: dict[str, Pool]
) -> None:
    paths = [DiskSpec(target=f"vd{t}", path=f"/d{t}") for t in "abc"]
    bindings = StorageBindings(
        disks=(bound(volume(pools["local"]), "vdd"), bound(uuid.uuid4(), "vde"))
    )
    err = refusal(sources, spec(*paths), bindings)
    assert (err.code, err.field) == ("invalid", "disks")
    assert "at most 4" in err.message


def test_a_kernel_and_initrd_from_an_image_store_are_opened(
    sources: StorageSources, pools: dict[str, Pool]
) -> None:
    store = ImageStore(pools["nfs"])
    kernel = store.import_image(io.BytesIO(b"K" * 4096), format="raw")
    initrd = store.import_image(io.BytesIO(b"I" * 4096), format="raw")
    bindings = StorageBindings(
        kernel_image=ImageRef(sha256=kernel.sha256, pool="nfs", kind="kernel"),
        initrd_image=ImageRef(sha256=initrd.sha256, pool="nfs", kind="initrd"),
    )
    with BootFiles() as files:
        sources.open(spec(image="debian"), bindings, files)
        assert files.kernel is not None
        assert files.initrd is not None
        assert os.pread(files.kernel.fd, 4, 0) == b"KKKK"
        assert os.pread(files.initrd.fd, 4, 0) == b"IIII"
        assert files.kernel.given == f"image {kernel.sha256} in pool nfs"


def test_image_bindings_must_match_the_boot_spec(
    sources: StorageSources, pools: dict[str, Pool]
) -> None:
    sha = ImageStore(pools["nfs"]).import_image(io.BytesIO(b"K" * 512)).sha256
    ref = ImageRef(sha256=sha, pool="nfs", kind="kernel")
    cases = [
        (spec(image="debian"), StorageBindings(), "boot.image", "not resolved"),
        (spec(), StorageBindings(kernel_image=ref), "boot.kernel", "not both"),
        (
            spec(image="debian"),
            StorageBindings(kernel_image=ref.model_copy(update={"kind": "initrd"})),
            "boot.kernel",
            "not a kernel",
        ),
        (
            spec(image="debian"),
            StorageBindings(kernel_image=ref.model_copy(update={"sha256": "0" * 64})),
            "boot.kernel",
            "does not exist",
        ),
    ]
    for s, bindings, field, words in cases:
        err = refusal(sources, s, bindings)
        assert err.field == field
        assert words in err.message


# ---- kept with the definition --------------------------------------------------------------


@pytest.fixture
def node(tmp_path: Path, pools: dict[str, Pool]) -> Node:
    n = Node(tmp_path / "node")
    n.service.storage = StorageSources(HOST, pools)
    return n


def test_bindings_are_kept_with_the_definition_and_used_at_every_start(
    node: Node, pools: dict[str, Pool]
) -> None:
    vid = volume(pools["local"])
    s = spec(DiskSpec(target="vda", volume_id=vid))
    node.ok(DefineDomain(spec=s, disks=[bound(vid)]))
    record = node.store.get(s.uuid)
    assert record is not None
    assert record.bindings.disks == (bound(vid),)
    assert node.ok(StartDomain(domain_id=s.uuid)).state is PowerState.RUNNING
    node.ok(DestroyDomain(domain_id=s.uuid))
    # The volume goes away behind the node's back: the next start says so, nothing runs.
    pools["local"].volume_path(str(vid)).unlink()
    reply = node.do(StartDomain(domain_id=s.uuid))
    assert isinstance(reply, ErrorReply)
    assert reply.code == "not_found"
    assert reply.details["field"] == "disks.0"
    assert node.store.get(s.uuid) is not None  # the definition stays


def test_define_refuses_what_this_node_cannot_honour_and_stores_nothing(
    node: Node, pools: dict[str, Pool]
) -> None:
    vid = volume(pools["local"])
    s = spec(DiskSpec(target="vda", volume_id=vid))
    reply = node.do(DefineDomain(spec=s, disks=[bound(vid, host="node-2")]))
    assert isinstance(reply, ErrorReply)
    assert reply.code == "invalid"
    assert node.store.get(s.uuid) is None
    assert node.events() == []


def test_disks_change_by_redefinition_while_shut_off_and_not_while_running(
    node: Node, pools: dict[str, Pool]
) -> None:
    a, b = volume(pools["local"]), volume(pools["local"])
    s = spec(DiskSpec(target="vda", volume_id=a))
    node.ok(DefineDomain(spec=s, disks=[bound(a)]))
    # Attach vdb while shut off: an update.
    s2 = spec(DiskSpec(target="vda", volume_id=a), DiskSpec(target="vdb", volume_id=b))
    s2 = s2.model_copy(update={"uuid": s.uuid})
    node.ok(DefineDomain(spec=s2, disks=[bound(a), bound(b, "vdb")]))
    node.ok(StartDomain(domain_id=s.uuid))
    node.events()
    # Detach while running: refused, the definition unchanged.
    reply = node.do(DefineDomain(spec=s, disks=[bound(a)]))
    assert isinstance(reply, ErrorReply)
    assert reply.code == "conflict"
    assert "only while the domain is shut off" in reply.message
    record = node.store.get(s.uuid)
    assert record is not None
    assert [d.target for d in record.bindings.disks] == ["vda", "vdb"]
    # Making a disk read-only is a change of the disk list too.
    ro = s2.model_copy(
        update={"disks": [DiskSpec(target="vda", volume_id=a, readonly=True), s2.disks[1]]}
    )
    reply = node.do(DefineDomain(spec=ro, disks=[bound(a), bound(b, "vdb")]))
    assert isinstance(reply, ErrorReply)
    assert reply.code == "conflict"
    # Another change while running (metadata) still takes effect at the next boot.
    s3 = s2.model_copy(update={"metadata": {"k": "v"}})
    node.ok(DefineDomain(spec=s3, disks=[bound(a), bound(b, "vdb")]))
    node.ok(DestroyDomain(domain_id=s.uuid))
    node.ok(DefineDomain(spec=s.model_copy(update={"metadata": {"k": "v"}}), disks=[bound(a)]))
    record = node.store.get(s.uuid)
    assert record is not None
    assert [d.target for d in record.bindings.disks] == ["vda"]
    assert [e[:2] for e in node.events()][-1] == ("domain.defined", "updated")


def test_a_restarted_node_starts_from_the_stored_bindings(
    tmp_path: Path, pools: dict[str, Pool]
) -> None:
    """Autostart after a node restart goes through `start_domain` on what the store kept."""
    first = Node(tmp_path / "node")
    first.service.storage = StorageSources(HOST, pools)
    vid = volume(pools["local"])
    s = spec(DiskSpec(target="vda", volume_id=vid, readonly=True))
    first.ok(DefineDomain(spec=s, disks=[bound(vid)]))
    first.store.close()
    second = Node(tmp_path / "node")
    second.service.storage = StorageSources(HOST, pools)
    opened: list[tuple[str | None, bool]] = []
    spawn = second.driver.spawn

    def watching(
        spec: DomainSpec, files: BootFiles, *, paused: bool = False, nics: object = ()
    ) -> object:
        opened.extend((d.target, d.read_only) for d in files.disks)
        return spawn(spec, files, paused=paused, nics=nics)  # type: ignore[arg-type]

    second.driver.spawn = watching  # type: ignore[method-assign,assignment]
    second.service.start_domain(s.uuid)
    assert opened == [("vda", True)]
