"""The storage file layer on real file systems: XFS with reflink and ext4 on loop devices,
a small tmpfs to fill up (compute_node/storage, docs/storage.md). Needs root; CI is root."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from compute_node.storage import (
    AlreadyExists,
    BadImage,
    Busy,
    ChecksumMismatch,
    ImageStore,
    InvalidName,
    InvalidSize,
    NoSpace,
    NotFound,
    Pool,
    ShrinkRefused,
    Truncated,
    VolumeStore,
)
from tests.loopfs import loop_fs, small_tmpfs

pytestmark = pytest.mark.root

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def xfs_mount() -> Iterator[Path]:
    try:
        with loop_fs("xfs", 2048 * MiB) as mnt:
            yield mnt
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def ext4_mount() -> Iterator[Path]:
    try:
        with loop_fs("ext4", 1024 * MiB) as mnt:
            yield mnt
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


def fresh_pool(mount: Path) -> Pool:
    root = mount / uuid.uuid4().hex[:12]
    root.mkdir()
    return Pool(root)


@pytest.fixture
def xfs_pool(xfs_mount: Path) -> Pool:
    return fresh_pool(xfs_mount)


@pytest.fixture
def ext4_pool(ext4_mount: Path) -> Pool:
    return fresh_pool(ext4_mount)


@pytest.fixture(params=["xfs", "ext4"])
def pool(request: pytest.FixtureRequest) -> Pool:
    mount: Path = request.getfixturevalue(f"{request.param}_mount")
    return fresh_pool(mount)


def write_at(store: VolumeStore, name: str, offset: int, data: bytes) -> None:
    fd = store.open(name, read_only=False)
    try:
        os.pwrite(fd, data, offset)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def read_all(store: VolumeStore, name: str) -> bytes:
    return b"".join(bytes(c) for c in store.read(name))


def leftovers(pool: Pool) -> list[str]:
    return sorted(p.name for p in pool.tmp_dir.iterdir())


def test_capabilities_are_probed(xfs_pool: Pool, ext4_pool: Pool) -> None:
    assert xfs_pool.capabilities.reflink is True
    assert ext4_pool.capabilities.reflink is False
    assert xfs_pool.capabilities.punch_hole
    assert ext4_pool.capabilities.punch_hole
    assert leftovers(xfs_pool) == []
    assert leftovers(ext4_pool) == []


def test_create_is_sparse_reads_zeros_and_is_counted(pool: Pool) -> None:
    store = VolumeStore(pool)
    before = pool.usage()
    vol = store.create("vol-1", 64 * MiB)
    assert (vol.size, vol.allocated) == (64 * MiB, 0)
    assert read_all(store, "vol-1") == bytes(64 * MiB)
    write_at(store, "vol-1", 5 * MiB, b"x" * MiB)
    after = pool.usage()
    assert after.allocation - before.allocation >= MiB
    assert after.capacity == before.capacity
    assert 0 < after.available < after.capacity
    with pytest.raises(AlreadyExists):
        store.create("vol-1", MiB)
    assert read_all(store, "vol-1")[5 * MiB : 6 * MiB] == b"x" * MiB


@pytest.mark.parametrize("name", ["../escape", "a/b", "/etc/passwd", "a\0b", "..", "", ".hidden"])
def test_bad_names_are_refused_and_create_nothing(pool: Pool, name: str) -> None:
    store = VolumeStore(pool)
    with pytest.raises(InvalidName):
        store.create(name, MiB)
    with pytest.raises(InvalidName):
        store.delete(name)
    assert [p.name for p in pool.volumes_dir.iterdir()] == []
    assert leftovers(pool) == []


def test_a_planted_symlink_is_never_followed(pool: Pool, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    (pool.volumes_dir / "vol-evil").symlink_to(victim)
    store = VolumeStore(pool)
    for op in (store.wipe, store.delete, store.info):
        with pytest.raises(InvalidName):
            op("vol-evil")
    with pytest.raises(InvalidName):
        store.grow("vol-evil", 2 * MiB)
    assert victim.read_bytes() == b"keep me"


@pytest.mark.parametrize(
    ("size", "error"),
    [
        (-1, InvalidSize),
        (0, InvalidSize),
        (513, InvalidSize),
        (True, InvalidSize),
        ("10", InvalidSize),
        (1 << 70, InvalidSize),
        (64 << 40, NoSpace),  # allowed size, beyond this pool's free space
    ],
)
def test_bad_sizes_are_refused_and_create_nothing(pool: Pool, size: object, error: type) -> None:
    store = VolumeStore(pool)
    with pytest.raises(error):
        store.create("vol-1", size)  # type: ignore[arg-type]
    assert [p.name for p in pool.volumes_dir.iterdir()] == []
    assert leftovers(pool) == []


def test_grow_keeps_data_and_shrink_is_refused(pool: Pool) -> None:
    store = VolumeStore(pool)
    store.create("vol-1", 4 * MiB)
    write_at(store, "vol-1", 0, b"data")
    assert store.grow("vol-1", 8 * MiB).size == 8 * MiB
    with pytest.raises(ShrinkRefused):
        store.grow("vol-1", 4 * MiB)
    with pytest.raises(NoSpace):
        store.grow("vol-1", 64 << 40)
    data = read_all(store, "vol-1")
    assert len(data) == 8 * MiB
    assert data[:4] == b"data"
    assert data[4:] == bytes(8 * MiB - 4)


def test_a_clone_is_independent_of_its_source(pool: Pool) -> None:
    store = VolumeStore(pool)
    store.create("src", 32 * MiB)
    write_at(store, "src", 0, b"A" * MiB)
    write_at(store, "src", 20 * MiB, b"B" * MiB)
    seen: list[tuple[int, int]] = []
    cloned = store.clone("src", "dst", progress=lambda pos, size: seen.append((pos, size)))
    assert cloned.method == ("reflink" if pool.capabilities.reflink else "copy")
    assert cloned.volume.size == 32 * MiB
    if cloned.method == "copy":  # holes stay holes, progress reaches the end
        assert cloned.volume.allocated <= 3 * MiB
        assert seen[-1] == (32 * MiB, 32 * MiB)
    write_at(store, "src", 0, b"S" * MiB)
    write_at(store, "dst", 20 * MiB, b"D" * MiB)
    src, dst = read_all(store, "src"), read_all(store, "dst")
    assert src[:MiB] == b"S" * MiB
    assert src[20 * MiB : 21 * MiB] == b"B" * MiB
    assert dst[:MiB] == b"A" * MiB
    assert dst[20 * MiB : 21 * MiB] == b"D" * MiB
    assert src[MiB : 20 * MiB] == dst[MiB : 20 * MiB] == bytes(19 * MiB)
    with pytest.raises(AlreadyExists):
        store.clone("src", "dst")
    with pytest.raises(NotFound):
        store.clone("nope", "dst2")
    assert leftovers(pool) == []


def test_a_reflink_clone_is_instant_whatever_the_size(xfs_pool: Pool) -> None:
    store = VolumeStore(xfs_pool)
    store.create("big", 512 * MiB)
    fd = store.open("big", read_only=False)
    try:
        chunk = os.urandom(MiB)
        for i in range(128):
            os.pwrite(fd, chunk, i * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    before = xfs_pool.usage().available
    t = time.perf_counter()
    cloned = store.clone("big", "big-clone")
    elapsed = time.perf_counter() - t
    assert cloned.method == "reflink"
    assert elapsed < 0.5, f"reflink clone of 128 MiB of data took {elapsed:.3f} s"
    assert before - xfs_pool.usage().available < 16 * MiB  # blocks shared, not copied
    for name in ("big", "big-clone"):
        fd = store.open(name, read_only=True)
        try:
            assert os.pread(fd, MiB, 100 * MiB) == chunk
            assert os.pread(fd, MiB, 300 * MiB) == bytes(MiB)
        finally:
            os.close(fd)


def test_wipe_zeroes_the_data_and_leaves_a_clone_alone(pool: Pool) -> None:
    store = VolumeStore(pool)
    store.create("vol-1", 8 * MiB)
    write_at(store, "vol-1", MiB, b"secret" * 1000)
    store.clone("vol-1", "vol-2")
    assert store.wipe("vol-1") == "punch_hole"
    assert read_all(store, "vol-1") == bytes(8 * MiB)
    assert store.info("vol-1").allocated == 0
    assert store.info("vol-1").size == 8 * MiB
    assert read_all(store, "vol-2")[MiB : MiB + 6] == b"secret"


def test_delete(pool: Pool) -> None:
    store = VolumeStore(pool)
    store.create("vol-1", MiB)
    store.delete("vol-1")
    assert store.list() == []
    with pytest.raises(NotFound):
        store.delete("vol-1")


def test_one_writer_per_volume_readers_share(pool: Pool) -> None:
    store = VolumeStore(pool)
    store.create("vol-1", MiB)
    writer = store.open("vol-1", read_only=False)
    try:
        with pytest.raises(Busy, match="in use"):
            store.open("vol-1", read_only=False)
        with pytest.raises(Busy):
            store.open("vol-1", read_only=True)
        for refused in (
            lambda: store.wipe("vol-1"),
            lambda: store.delete("vol-1"),
            lambda: store.grow("vol-1", 2 * MiB),
            lambda: store.download("vol-1", io.BytesIO()),
            lambda: store.clone("vol-1", "vol-2"),
        ):
            with pytest.raises(Busy):
                refused()
        assert store.list()[0].name == "vol-1"
        assert leftovers(pool) == []
    finally:
        os.close(writer)
    readers = [store.open("vol-1", read_only=True) for _ in range(2)]
    try:
        store.clone("vol-1", "vol-2")  # reading is fine beside readers
        with pytest.raises(Busy):
            store.open("vol-1", read_only=False)
    finally:
        for fd in readers:
            os.close(fd)
    store.delete("vol-1")


def test_upload_is_atomic_and_reports_its_sha256(pool: Pool) -> None:
    store = VolumeStore(pool)
    data = os.urandom(3 * MiB) + bytes(4 * MiB) + os.urandom(MiB)
    seen_during: list[bool] = []

    def stream() -> Iterator[bytes]:
        for i in range(0, len(data), 256 * 1024):
            seen_during.append((pool.volumes_dir / "up").exists())
            yield data[i : i + 256 * 1024]

    digest = store.upload("up", stream(), len(data), sha256=hashlib.sha256(data).hexdigest())
    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    assert digest.size == len(data)
    assert not any(seen_during), "the volume was visible before the upload finished"
    assert read_all(store, "up") == data
    assert store.info("up").allocated <= 5 * MiB  # the zero run stayed a hole
    sink = io.BytesIO()
    assert store.download("up", sink) == digest
    assert sink.getvalue() == data


@pytest.mark.parametrize(
    ("announced", "sha", "error"),
    [
        (8 * MiB, None, Truncated),  # the stream ends early
        (2 * MiB, None, Truncated),  # the stream goes on past the size
        (4 * MiB, "0" * 64, ChecksumMismatch),
    ],
)
def test_a_bad_upload_leaves_nothing(pool: Pool, announced: int, sha: str, error: type) -> None:
    store = VolumeStore(pool)
    with pytest.raises(error):
        store.upload("up", io.BytesIO(os.urandom(4 * MiB)), announced, sha256=sha)
    assert store.list() == []
    assert leftovers(pool) == []


def make_qcow2(tmp: Path, raw: bytes, *extra: str) -> Path:
    src = tmp / "src.raw"
    src.write_bytes(raw)
    out = tmp / "img.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *extra, str(src), str(out)],
        check=True,
        capture_output=True,
    )
    return out


def test_images_raw_and_qcow2_are_stored_by_content_once(pool: Pool, tmp_path: Path) -> None:
    images = ImageStore(pool)
    raw = os.urandom(MiB) + bytes(3 * MiB) + b"end" + bytes(MiB - 3)
    first = images.import_image(io.BytesIO(raw), format="raw")
    assert (first.sha256, first.size, first.deduplicated) == (
        hashlib.sha256(raw).hexdigest(),
        len(raw),
        False,
    )
    with make_qcow2(tmp_path, raw).open("rb") as f:
        second = images.import_image(f)
    assert second.source_format == "qcow2"
    assert second.sha256 == first.sha256
    assert second.deduplicated is True
    assert [i.sha256 for i in images.list()] == [first.sha256]
    assert images.path(first.sha256).stat().st_mode & 0o777 == 0o444
    assert leftovers(pool) == []

    store = VolumeStore(pool)
    made = store.create_from_image("root", first.sha256, size=8 * MiB)
    assert made.volume.size == 8 * MiB
    write_at(store, "root", 0, b"changed")
    assert read_all(store, "root")[: len(raw)] == b"changed" + raw[7:]
    with pytest.raises(ShrinkRefused):
        store.create_from_image("small", second.sha256, size=MiB)
    with pytest.raises(NotFound):
        store.create_from_image("other", "0" * 64)
    with pytest.raises(InvalidName):
        store.create_from_image("other", "../../etc/passwd")
    images.delete(first.sha256)  # the volume is a clone: unaffected
    assert read_all(store, "root")[MiB * 4 : MiB * 4 + 3] == b"end"
    assert [v.name for v in store.list()] == ["root"]


def test_qcow2_is_converted_in_the_pool(pool: Pool, tmp_path: Path) -> None:
    raw = os.urandom(2 * MiB) + bytes(6 * MiB)
    with make_qcow2(tmp_path, raw).open("rb") as f:
        image = ImageStore(pool).import_image(f, format="qcow2")
    assert image.sha256 == hashlib.sha256(raw).hexdigest()
    assert image.size == len(raw)
    stored = ImageStore(pool).path(image.sha256)
    assert stored.read_bytes() == raw
    assert stored.stat().st_blocks * 512 <= 3 * MiB


def test_unsafe_or_unknown_images_are_refused(pool: Pool, tmp_path: Path) -> None:
    images = ImageStore(pool)
    secret = tmp_path / "host-secret.raw"
    secret.write_bytes(b"host data" * 1000)
    backed = tmp_path / "backed.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(backed)],
        check=True,
        capture_output=True,
    )
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "create", "-f", "vmdk", str(vmdk), "1M"], check=True)
    cases: list[tuple[bytes, str | None, str]] = [
        (backed.read_bytes(), None, "backing file"),
        (vmdk.read_bytes(), None, "not supported"),
        (b'# Disk DescriptorFile\nRW 8 FLAT "/etc/shadow" 0\n', None, "'vmdk' is not supported"),
        (make_qcow2(tmp_path, os.urandom(MiB)).read_bytes(), "raw", "declared raw"),
        (b"", None, "empty"),
    ]
    for data, fmt, message in cases:
        with pytest.raises(BadImage, match=message):
            images.import_image(io.BytesIO(data), format=fmt)  # type: ignore[arg-type]
    assert images.list() == []
    assert leftovers(pool) == []


def fill(directory: Path) -> None:
    """Take every free block of the file system `directory` is on."""
    with (directory / "filler").open("wb") as f:
        try:
            while True:
                f.write(b"\xff" * MiB)
                f.flush()
        except OSError:
            pass


def test_enospc_mid_upload_removes_the_temp_file() -> None:
    try:
        ctx = small_tmpfs(32 * MiB)
        mnt = ctx.__enter__()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        (mnt / "pool").mkdir()
        pool = Pool(mnt / "pool")
        store = VolumeStore(pool)

        def stream() -> Iterator[bytes]:
            yield os.urandom(MiB)
            fill(mnt)  # another writer takes the rest of the space
            for _ in range(15):
                yield os.urandom(MiB)

        with pytest.raises(NoSpace, match="ran out of space"):
            store.upload("up", stream(), 16 * MiB)
        assert store.list() == []
        assert leftovers(pool) == []
    finally:
        ctx.__exit__(None, None, None)


def test_enospc_mid_copy_removes_the_temp_file() -> None:
    try:
        ctx = small_tmpfs(32 * MiB)
        mnt = ctx.__enter__()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        (mnt / "pool").mkdir()
        pool = Pool(mnt / "pool")
        assert pool.capabilities.reflink is False  # tmpfs: the sparse copy path
        store = VolumeStore(pool)
        store.create("src", 16 * MiB)
        for i in range(0, 16, 2):  # 8 separate extents: progress after each
            write_at(store, "src", i * MiB, os.urandom(MiB))
        filled: list[bool] = []

        def progress(pos: int, size: int) -> None:
            if not filled:
                fill(mnt)
                filled.append(True)

        with pytest.raises(NoSpace, match="ran out of space"):
            store.clone("src", "dst", progress=progress)
        assert [v.name for v in store.list()] == ["src"]
        assert leftovers(pool) == []
    finally:
        ctx.__exit__(None, None, None)


CHILD = """
import os, sys, time
sys.path.insert(0, {root!r})
from compute_node.storage import Pool, VolumeStore
store = VolumeStore(Pool({pool!r}))
def progress(pos, size):
    print("progress", pos, flush=True)
    time.sleep(0.2)
if sys.argv[1] == "clone":
    store.clone("src", "dst", progress=progress)
else:
    with open(sys.argv[2], "rb") as source:
        store.upload("up", source, os.path.getsize(sys.argv[2]), progress=progress)
print("finished", flush=True)
"""


def run_and_kill(pool: Pool, *args: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=str(ROOT), pool=str(pool.root)), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.startswith("progress"), line
        assert len(leftovers(pool)) == 1  # the op's temp file, mid-way
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL


def test_a_clone_killed_mid_copy_leaves_no_orphan_after_reconcile(ext4_pool: Pool) -> None:
    store = VolumeStore(ext4_pool)
    store.create("src", 256 * MiB)
    for i in range(0, 256, 64):
        write_at(store, "src", i * MiB, os.urandom(MiB))
    run_and_kill(ext4_pool, "clone")
    restarted = Pool(ext4_pool.root)
    removed = restarted.reconcile()
    assert len(removed) == 1
    assert leftovers(restarted) == []
    assert [v.name for v in VolumeStore(restarted).list()] == ["src"]
    assert restarted.reconcile() == []
    VolumeStore(restarted).clone("src", "dst")  # and the op can be run again


def test_an_upload_killed_mid_stream_leaves_no_orphan_after_reconcile(
    pool: Pool, tmp_path: Path
) -> None:
    source = tmp_path / "upload.raw"
    with source.open("wb") as f:
        for _ in range(64):
            f.write(os.urandom(64 * 1024) + bytes(MiB - 64 * 1024))
    run_and_kill(pool, "upload", str(source))
    restarted = Pool(pool.root)
    assert len(restarted.reconcile()) == 1
    assert leftovers(restarted) == []
    assert VolumeStore(restarted).list() == []


def test_reconcile_leaves_running_operations_alone(pool: Pool) -> None:
    with pool.begin() as running:
        os.pwrite(running.fd, b"half", 0)
        assert Pool(pool.root).reconcile() == []
        assert running.path.exists()
    orphan = pool.tmp_dir / "from-a-dead-worker"
    orphan.write_bytes(b"x")
    assert pool.reconcile() == ["from-a-dead-worker"]
