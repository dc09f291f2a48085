"""Storage benchmark: the file layer's clone and upload against the tools people use instead,
and a guest's random reads on a volume against QEMU's.

    python bench/storage.py

- storage.guest_randread_iops: 4 KiB random reads, 16 in flight, from the test guest on a
  volume, our VMM against QEMU microvm (same guest ELF, same file; bench/storage_guest.py).
  Needs /dev/kvm and qemu-system-x86_64; skipped, with the reason, without them.

Makes an XFS file system with reflink (`mkfs.xfs -m reflink=1`) on a loop device under TMPDIR
(tests/loopfs.py; needs root, xfsprogs and qemu-utils; exits 2 without them) and measures:
- storage.clone_1gib: `VolumeStore.clone` of a 1 GiB volume holding 1 GiB of data (FICLONE,
  fdatasync, link, directory fsyncs), against `qemu-img create -f qcow2 -b <src> -F raw`
  (an overlay: the way Nova makes a guest disk from a base image), and against a full copy
  (`cp --reflink=never` then `sync` of the copy) in the same rounds;
- storage.list_10k (bench/storage_list.py, which runs it alone too): listing 10,000 volumes
  through the API, against the same rows selected from the catalog; needs a broker
  (FLOTILLA_AMQP_URL or rabbitmq-server), not root;
- storage.file_upload_mbps: `VolumeStore.upload` of a 1 GiB file read in 1 MiB chunks (sha256 of
  every byte, zero chunks skipped, fdatasync, link), against `cp --reflink=never` of the same
  file then `sync` of the copy (equally durable; cp copies inside the kernel with
  copy_file_range), and beside it `dd bs=1M conv=fdatasync` (a user-space read/write loop
  like ours, without the hash).
- storage.upload_mbps (bench/storage_upload.py, which runs it alone too): a volume
  uploaded through the API (HTTP → API → the compute node's transfer port → the file
  layer), against `cp --reflink=never` + `sync -f` of the same file; needs a broker.

Rounds are interleaved (ours, anchor, copy, ...) so load from elsewhere hits all alike, and
the file system is synced (`sync -f`) before each timed operation; medians are reported.
Human-readable results go to stderr, one JSON object per figure last.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import storage_guest  # noqa: E402
from bench.figures import emit, figure, say  # noqa: E402
from bench.storage_list import measure as measure_list  # noqa: E402
from bench.storage_upload import measure as measure_api_upload  # noqa: E402
from compute_node.storage import Pool, VolumeStore  # noqa: E402
from tests.loopfs import loop_fs, missing_for  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
CLONE_ROUNDS = 9
UPLOAD_ROUNDS = 5
FS_BYTES = 6 * GiB  # sparse: holds the source, a full copy and the upload's file at once


def timed(fn: Callable[..., object], *args: object) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def settle(path: Path) -> None:
    """Flush the file system's dirty data and deferred work (syncfs: `sync -f`) so that no
    contender pays for what the previous one left, e.g. freeing a deleted 1 GiB copy."""
    run("sync", "-f", str(path))


def fill(path: Path, size: int) -> None:
    """`size` bytes of non-zero data, synced (1 MiB of random bytes repeated)."""
    chunk = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for off in range(0, size, MiB):
            os.pwrite(fd, chunk, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def upload(store: VolumeStore, source: Path, name: str) -> None:
    with source.open("rb") as f:
        store.upload(name, f, GiB)


def full_copy(src: Path, dst: Path) -> None:
    run("cp", "--reflink=never", str(src), str(dst))
    run("sync", str(dst))


def bench_clone(store: VolumeStore, scratch: Path) -> dict[str, list[float]]:
    store.create("src", GiB)
    src = store.pool.volume_path("src")
    fill(src, GiB)
    times: dict[str, list[float]] = {"ours": [], "qemu-img": [], "full copy": []}
    for i in range(-1, CLONE_ROUNDS):  # round -1 warms caches and is not counted
        settle(scratch)
        ours = timed(store.clone, "src", f"clone-{i}")
        settle(scratch)
        overlay = scratch / f"overlay-{i}.qcow2"
        qemu = timed(
            run,
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(src),
            "-F",
            "raw",
            str(overlay),
        )
        copy = scratch / "copy"
        settle(scratch)
        full = timed(full_copy, src, copy)
        copy.unlink()
        store.delete(f"clone-{i}")
        overlay.unlink()
        if i >= 0:
            for name, value in (("ours", ours), ("qemu-img", qemu), ("full copy", full)):
                times[name].append(value * 1000)
    store.delete("src")
    return times


def bench_upload(store: VolumeStore, scratch: Path) -> dict[str, list[float]]:
    source = scratch / "upload.raw"
    fill(source, GiB)
    mbps: dict[str, list[float]] = {"ours": [], "cp": [], "dd": []}
    for i in range(UPLOAD_ROUNDS):
        settle(scratch)
        ours = timed(upload, store, source, f"up-{i}")
        store.delete(f"up-{i}")
        copy = scratch / "copy"
        settle(scratch)
        cp = timed(full_copy, source, copy)
        copy.unlink()
        settle(scratch)
        dd = timed(run, "dd", f"if={source}", f"of={copy}", "bs=1M", "conv=fdatasync")
        copy.unlink()
        mbps["ours"].append(GiB / MiB / ours)
        mbps["cp"].append(GiB / MiB / cp)
        mbps["dd"].append(GiB / MiB / dd)
    source.unlink()
    return mbps


def guest_randread() -> list[dict[str, object]]:
    reason = storage_guest.unavailable()
    if reason is not None:
        say(f"bench/storage: storage.guest_randread_iops skipped: {reason}")
        return []
    say(
        f"storage.guest_randread_iops (4 KiB random reads, 16 in flight, {storage_guest.OPS} "
        f"a round, {storage_guest.VOLUME_MIB} MiB volume; {storage_guest.ROUNDS} rounds)"
    )
    iops = {k: statistics.median(v) for k, v in storage_guest.measure(say).items()}
    say("  medians: " + ", ".join(f"{k} {v:,.0f} IOPS" for k, v in iops.items()))
    return [
        figure(
            "storage.guest_randread_iops",
            iops["ours"],
            "IOPS",
            anchor=storage_guest.QEMU_IOTHREAD,
            anchor_value=iops[storage_guest.QEMU_IOTHREAD],
            target="ratio >= 1.0",
            qemu_defaults_iops=round(iops[storage_guest.QEMU_DEFAULT]),
        )
    ]


def main() -> int:
    guest = guest_randread()
    listing = measure_list()
    api_upload = measure_api_upload()
    early = [*guest, *(f for f in (listing, api_upload) if f is not None)]
    for kind in ("xfs",):
        reason = missing_for(kind)
        if reason is not None:
            say(f"bench/storage: {reason}. clone and upload were not measured.")
            emit(early)
            return 0 if early else 2
    if shutil.which("qemu-img") is None:
        say("bench/storage: qemu-img is missing (apt-get install -y qemu-utils)")
        emit(early)
        return 0 if early else 2
    with loop_fs("xfs", FS_BYTES) as mnt:
        (mnt / "pool").mkdir()
        scratch = mnt / "scratch"
        scratch.mkdir()
        pool = Pool(mnt / "pool")
        if not pool.capabilities.reflink:
            say("bench/storage: the XFS pool reports no reflink; nothing measured")
            return 2
        store = VolumeStore(pool)
        clone = bench_clone(store, scratch)
        upload = bench_upload(store, scratch)

    med = {name: statistics.median(v) for name, v in clone.items()}
    say(f"storage.clone_1gib (1 GiB volume, 1 GiB of data, XFS reflink; {CLONE_ROUNDS} rounds)")
    for name, values in clone.items():
        lo, hi = min(values), max(values)
        say(f"  {name:10s} median {med[name]:9.2f} ms  min {lo:9.2f}  max {hi:9.2f}")
    up = {name: statistics.median(v) for name, v in upload.items()}
    say(f"storage.file_upload_mbps (1 GiB file, 1 MiB chunks, sha256; {UPLOAD_ROUNDS} rounds)")
    for name, values in upload.items():
        lo, hi = min(values), max(values)
        say(f"  {name:10s} median {up[name]:7.1f} MiB/s  min {lo:7.1f}  max {hi:7.1f}")
    emit(
        [
            *guest,
            figure(
                "storage.clone_1gib",
                med["ours"],
                "ms",
                anchor="qemu-img create -f qcow2 -b",
                anchor_value=med["qemu-img"],
                target="value <= 5 ms and ratio <= 1",
                full_copy_ms=round(med["full copy"], 1),
            ),
            figure(
                "storage.file_upload_mbps",
                up["ours"],
                "MiB/s",
                anchor="cp --reflink=never + sync",
                anchor_value=up["cp"],
                target="report",
                dd_mibps=round(up["dd"], 1),
            ),
            *(f for f in (listing, api_upload) if f is not None),
        ]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
