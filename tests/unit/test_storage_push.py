"""`push_volume`, the sending side of a host-to-host volume move, against a real transfer
server on loopback and real pools: sparse at both ends, checked by size and sha256; a
volume a guest writes is refused before anything moves; a refused stream leaves nothing."""

from __future__ import annotations

import fcntl
import os
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from compute_node.storage import Pool, VolumeStore
from compute_node.storage.errors import Busy
from compute_node.storage_transfer import TransferServer, job_for, push_volume
from protos.images import OpenTransfer, PushVolume

MiB = 1 << 20


@pytest.fixture
def server() -> Iterator[TransferServer]:
    transfers = TransferServer().start()
    yield transfers
    transfers.stop()


def _pools(tmp_path: Path) -> tuple[Pool, Pool]:
    for name in "ab":
        (tmp_path / name).mkdir()
    return Pool(tmp_path / "a", "dir"), Pool(tmp_path / "b", "dir")


def _volume(pool: Pool, size: int) -> tuple[uuid.UUID, bytes]:
    vid = uuid.uuid4()
    VolumeStore(pool).create(str(vid), size)
    data = os.urandom(MiB // 2)
    with pool.volume_path(str(vid)).open("r+b") as f:
        f.seek(size - MiB)
        f.write(data)
    return vid, bytes(size - MiB) + data + bytes(MiB // 2)


def _push(server: TransferServer, src: Pool, dst: Pool, vid: uuid.UUID, size: int) -> PushVolume:
    opened = OpenTransfer(pool="b", op="volume_upload", volume_id=vid, size=size)
    ticket = server.issue(job_for(dst, opened))
    return PushVolume(
        pool="a", volume_id=vid, address=ticket.address, port=ticket.port, ticket=ticket.ticket
    )


def test_a_pushed_volume_arrives_whole_sparse_and_checked(
    server: TransferServer, tmp_path: Path
) -> None:
    src, dst = _pools(tmp_path)
    vid, want = _volume(src, 8 * MiB)
    cmd = _push(server, src, dst, vid, 8 * MiB)
    result = push_volume(src, cmd)
    assert (result.state, result.size) == ("done", 8 * MiB), result
    arrived = dst.volume_path(str(vid))
    assert arrived.read_bytes() == want
    assert arrived.stat().st_blocks * 512 <= 2 * MiB  # the leading 7 MiB stayed a hole
    assert server.result(cmd.ticket).sha256 == result.sha256
    assert src.volume_path(str(vid)).exists()  # the sender removes nothing
    again = push_volume(src, cmd)  # the ticket is spent: refused, and nothing changes
    assert again.state == "failed"
    assert arrived.read_bytes() == want


def test_a_volume_a_guest_writes_is_not_pushed(server: TransferServer, tmp_path: Path) -> None:
    src, dst = _pools(tmp_path)
    vid, _ = _volume(src, 2 * MiB)
    cmd = _push(server, src, dst, vid, 2 * MiB)
    fd = os.open(src.volume_path(str(vid)), os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("@hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
        with pytest.raises(Busy):
            push_volume(src, cmd)
    finally:
        os.close(fd)
    assert not dst.volume_path(str(vid)).exists()
