"""kill -9 in the middle of a volume upload, then a restart: of the storage service (the
catalog's worker) and of the compute node (whose agent writes the bytes). States settle,
catalog and pool agree, no temp or orphan file is left. The test plays the API's part: it
asks for the ticket, streams the bytes to the host's transfer port, then says `end`."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from compute_node.storage_transfer import FRAME, read_line, send_frames
from protos.images import BeginVolumeUpload, EndVolumeUpload, VolumeUpload
from protos.volumes import ListVolumes, VolumePage
from services.bus import BusError, RemoteError
from tests.integration.compute_harness import ComputeProcess
from tests.integration.conftest import MakeBus
from tests.integration.storage_harness import StorageProcess, VolumeWatcher, call
from tests.integration.test_storage_service import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MiB = 1 << 20
SIZE = 64 * MiB
START_S = 180.0  # a loaded host starts processes slowly


@pytest.fixture
def sqlite_stack(
    amqp_url: str, tmp_path: Path, make_bus: MakeBus, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Stack]:
    """A compute node process (fake driver, one `dir` pool) and a storage service process."""
    pool = tmp_path / "pool"
    pool.mkdir()
    monkeypatch.setenv("FLOTILLA_DRIVER", "fake")
    monkeypatch.setenv("FLOTILLA_POOLS", json.dumps([{"name": "local", "path": str(pool)}]))
    state = tmp_path / "state"
    state.mkdir()
    bus = make_bus("test-client")
    watcher = VolumeWatcher(make_bus("test-watcher"))
    host = f"uk-{uuid.uuid4().hex[:6]}"
    compute = ComputeProcess(amqp_url, state, host).start(bus, START_S)
    storage = StorageProcess(
        amqp_url,
        f"sqlite:///{tmp_path}/cat.db",
        tmp_path / "storage.log",
        replica="r1",
        agent_hosts=[host],
        default_pool="local",
    )
    try:
        storage.start(bus, START_S)
        yield Stack(compute, storage, bus, watcher)
    finally:
        storage.stop()
        compute.stop()
        watcher.subscription.close()


def _begin(s: Stack, name: str) -> VolumeUpload:
    started = call(
        s.bus, BeginVolumeUpload(volume_id=uuid.uuid4(), project="p1", name=name, size=SIZE)
    )
    assert isinstance(started, VolumeUpload), started
    return started


def _volumes(s: Stack) -> dict[str, str]:
    page = call(s.bus, ListVolumes())
    assert isinstance(page, VolumePage)
    return {str(v.volume_id): v.state for v in page.volumes}


def _settled(s: Stack, timeout: float = 90.0) -> dict[str, str]:
    """Wait until no volume is mid-state and no temp file is left; the catalog's volumes."""
    deadline = time.monotonic() + timeout
    states = _volumes(s)
    while time.monotonic() < deadline:
        states = _volumes(s)
        if not set(states.values()) & {"creating", "deleting"} and not s.temp_files():
            return states
        time.sleep(0.3)
    raise AssertionError(f"not settled: {states}, temp files {s.temp_files()}")


def test_kill_9_of_the_service_mid_upload_then_restart(sqlite_stack: Stack) -> None:
    """The bytes keep arriving at the host while the service is dead; the restarted
    service records the upload (from `end`, or by reconcile asking the host)."""
    s = sqlite_stack
    started = _begin(s, "up")
    data = bytes(range(256)) * (MiB // 256)
    ticket = started.ticket
    with socket.create_connection((ticket.address, ticket.port)) as conn:
        conn.sendall(ticket.ticket.encode() + b"\n")
        for _ in range(16):
            conn.sendall(FRAME.pack(len(data)) + data)
        s.storage.kill()
        send_frames(conn, iter([data] * (SIZE // MiB - 16)))
        answer = read_line(conn)
    assert answer["state"] == "done", answer
    s.storage.start(s.bus, START_S)
    try:
        call(s.bus, EndVolumeUpload(volume_id=started.volume.volume_id, project="p1"))
    except RemoteError as exc:  # reconcile was first: it recorded the upload already
        assert exc.code == "conflict", exc
    states = _settled(s)
    assert states == {str(started.volume.volume_id): "available"}
    assert s.files() == set(states)
    created = [e for e in s.watcher.of(started.volume.volume_id, 1) if e.TYPE == "volume.created"]
    assert len(created) == 1
    with (s.pool / "volumes" / str(started.volume.volume_id)).open("rb") as f:
        assert f.read(MiB) == data


def test_kill_9_of_the_compute_node_mid_upload_then_restart(sqlite_stack: Stack) -> None:
    """The host dies with half the bytes in a temp file: its restart removes the temp file,
    the service forgets the volume (its host knows no such upload, no file was published)."""
    s = sqlite_stack
    started = _begin(s, "half")
    ticket = started.ticket
    data = b"\x5a" * MiB
    with socket.create_connection((ticket.address, ticket.port)) as conn:
        conn.sendall(ticket.ticket.encode() + b"\n")
        for _ in range(16):
            conn.sendall(FRAME.pack(len(data)) + data)
        deadline = time.monotonic() + 20
        while not s.temp_files() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.temp_files(), "the upload never reached the host"
        s.compute.kill()
    s.compute.start(s.bus, START_S)
    try:
        call(s.bus, EndVolumeUpload(volume_id=started.volume.volume_id, project="p1"))
        raise AssertionError("an upload cut short was recorded")
    except RemoteError as exc:
        assert exc.code in ("unavailable", "invalid"), exc
    except BusError:
        pass
    assert _settled(s) == {}
    assert s.files() == set()
    assert not s.temp_files()
