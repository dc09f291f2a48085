"""The snapshot file format without KVM: `native.snapshot_info` and `merge_snapshot` on files
written here byte by byte as docs/machine.md describes them."""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import native

MIB = 1 << 20
STATE_MAGIC = 0x50414E534C544C46  # "FLTLSNAP"
MEMORY_MAGIC = 0x4D454D534C544C46  # "FLTLSMEM"


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def state_file(*, version: int = 1, vcpus: int = 2, sid: bytes = b"A" * 16) -> bytes:
    slots = bytes(24 * 8)
    config = struct.pack("<IIQQII", vcpus, 0, 64 * MIB, 64 * MIB, 4096, 0) + slots
    sections = [(1, 0, config)] + [(2, i, bytes(64)) for i in range(vcpus)]
    # The IOAPIC's 13 bytes leave 3 of padding: those bytes are checked too.
    sections += [(3, 0, bytes(13))] + [(t, 0, bytes(16)) for t in (4, 5, 6, 7)]
    body = b""
    for kind, instance, payload in sections:
        padded = payload + bytes(-len(payload) % 8)
        crc = crc32c(struct.pack("<IIQII", kind, instance, len(payload), 0, 0) + padded)
        body += struct.pack("<IIQII", kind, instance, len(payload), crc, 0) + padded
    head = struct.pack(
        "<QIIIIQ16s16sI", STATE_MAGIC, version, 72, 1, len(sections), 72 + len(body), sid,
        bytes(16), 0,
    )  # fmt: skip
    return head + struct.pack("<I", crc32c(head + bytes(4))) + body


def memory_file(
    path: Path, *, kind: int, sid: bytes, parent: bytes, pages: dict[int, bytes]
) -> None:
    """A 64 MiB memory file holding `pages` (index -> 4 KiB), with its trailer."""
    runs = b"".join(struct.pack("<QQ", p, 1) for p in sorted(pages)) if kind == 2 else b""
    nruns = len(pages) if kind == 2 else 0
    head = struct.pack("<QII16s16sQQI", MEMORY_MAGIC, 1, kind, sid, parent, 64 * MIB, nruns, 4096)
    trailer_size = -(-(len(runs) + 72) // 4096) * 4096
    trailer = runs + bytes(trailer_size - len(runs) - 72) + head
    trailer += struct.pack("<I", crc32c(trailer))
    with path.open("wb") as f:
        f.truncate(64 * MIB + trailer_size)
        for index, data in pages.items():
            f.seek(index * 4096)
            f.write(data)
        f.seek(64 * MIB)
        f.write(trailer)


def test_a_well_formed_state_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "state").write_bytes(state_file(vcpus=3))
    info = native.snapshot_info(tmp_path)
    assert (info.kind, info.version, info.vcpus, info.memory_mib) == ("full", 1, 3, 64)
    assert info.id == (b"A" * 16).hex()


def test_every_flipped_byte_is_refused(tmp_path: Path) -> None:
    good = state_file()
    for off in range(len(good)):
        bad = bytearray(good)
        bad[off] ^= 0x40
        (tmp_path / "state").write_bytes(bad)
        with pytest.raises(native.SnapshotError):
            native.snapshot_info(tmp_path)


def test_truncated_longer_and_newer_files_are_refused(tmp_path: Path) -> None:
    good = state_file()
    for cut in (0, 1, 71, 72, 100, len(good) - 8, len(good) - 1):
        (tmp_path / "state").write_bytes(good[:cut])
        with pytest.raises(native.SnapshotError, match=r"truncated|past the end|bytes"):
            native.snapshot_info(tmp_path)
    (tmp_path / "state").write_bytes(good + bytes(8))
    with pytest.raises(native.SnapshotError, match="bytes"):
        native.snapshot_info(tmp_path)
    (tmp_path / "state").write_bytes(state_file(version=2))
    with pytest.raises(native.SnapshotError, match="newer"):
        native.snapshot_info(tmp_path)


def test_merge_applies_a_diff_onto_its_base_only(tmp_path: Path) -> None:
    base, diff, other = tmp_path / "base", tmp_path / "diff", tmp_path / "other"
    for d in (base, diff, other):
        d.mkdir()
    memory_file(
        base / "memory", kind=1, sid=b"B" * 16, parent=bytes(16),
        pages={0: b"\1" * 4096, 5: b"\2" * 4096},
    )  # fmt: skip
    memory_file(
        diff / "memory", kind=2, sid=b"D" * 16, parent=b"B" * 16,
        pages={5: b"\3" * 4096, 9: bytes(4096)},
    )  # fmt: skip
    memory_file(other / "memory", kind=1, sid=b"O" * 16, parent=bytes(16), pages={})
    with pytest.raises(native.SnapshotError, match="not a diff of"):
        native.merge_snapshot(other, diff, tmp_path / "x")
    with pytest.raises(native.SnapshotError, match="not a diff"):
        native.merge_snapshot(base, other, tmp_path / "x")
    assert not (tmp_path / "x").exists()

    native.merge_snapshot(base, diff)
    merged = (diff / "memory").read_bytes()
    assert merged[:4096] == b"\1" * 4096  # the base's page
    assert merged[5 * 4096 : 6 * 4096] == b"\3" * 4096  # the diff's page over the base's
    assert merged[9 * 4096 : 10 * 4096] == bytes(4096)
    tail = merged[-72:]
    assert struct.unpack_from("<QII16s", tail) == (MEMORY_MAGIC, 1, 1, b"D" * 16)
    # The merged file is a full memory file of the diff's id: merging again is refused.
    with pytest.raises(native.SnapshotError, match="not a diff"):
        native.merge_snapshot(base, diff)
    assert (base / "memory").read_bytes()[5 * 4096 : 6 * 4096] == b"\2" * 4096


def test_every_byte_of_a_memory_trailer_is_checked(tmp_path: Path) -> None:
    base, diff = tmp_path / "base", tmp_path / "diff"
    base.mkdir()
    diff.mkdir()
    memory_file(base / "memory", kind=1, sid=b"B" * 16, parent=bytes(16), pages={})
    memory_file(diff / "memory", kind=2, sid=b"D" * 16, parent=b"B" * 16, pages={3: b"x" * 4096})
    path = diff / "memory"
    size = path.stat().st_size
    # The run, the padding after it, every byte of the header: each flipped on its own.
    offsets = [64 * MIB, 64 * MIB + 8, 64 * MIB + 100, 64 * MIB + 3000]
    offsets += range(size - 72, size)
    with path.open("r+b") as f:
        for at in offsets:
            f.seek(at)
            (byte,) = f.read(1)
            f.seek(at)
            f.write(bytes([byte ^ 0x04]))
            f.flush()
            with pytest.raises(native.SnapshotError):
                native.merge_snapshot(base, diff, tmp_path / "out")
            f.seek(at)
            f.write(bytes([byte]))
            f.flush()
    native.merge_snapshot(base, diff, tmp_path / "out")  # undamaged again: it merges
    assert (tmp_path / "out").stat().st_size == size


def _refused_promptly(call: Callable[[], object], fifo: Path) -> str:
    """Runs `call` (which opens `fifo` as a state or memory file) and returns its
    SnapshotError's text; fails if it blocks waiting for a writer."""
    out: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # handed to the test below
            out.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(5)
    if worker.is_alive():
        # Free the blocked open (a writer arrives, then leaves) before failing.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(5)
        pytest.fail(f"opening the FIFO {fifo.name} blocked")
    assert len(out) == 1
    assert isinstance(out[0], native.SnapshotError), out[0]
    return str(out[0])


def test_a_fifo_for_a_state_or_memory_file_is_refused_without_blocking(tmp_path: Path) -> None:
    """A hostile state directory's `state` or `memory` as a FIFO: refused at once, not an
    open() that waits forever for a writer."""
    hostile, base = tmp_path / "hostile", tmp_path / "base"
    hostile.mkdir()
    base.mkdir()
    os.mkfifo(hostile / "state")
    why = _refused_promptly(lambda: native.snapshot_info(hostile), hostile / "state")
    assert "not a snapshot state file" in why
    os.mkfifo(hostile / "memory")
    memory_file(base / "memory", kind=1, sid=b"B" * 16, parent=bytes(16), pages={})
    why = _refused_promptly(
        lambda: native.merge_snapshot(base, hostile, tmp_path / "x"), hostile / "memory"
    )
    assert "not a snapshot memory file" in why
    assert not (tmp_path / "x").exists()
