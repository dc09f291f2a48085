"""Volume upload and download through the API, end to end: the body streamed API → the
storage agent of a compute node over its transfer port into its real pool, and back; a
volume is visible whole or not at all; bad input and truncated uploads leave nothing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration import test_storage_api
from tests.integration.test_api import auth
from tests.integration.test_storage_api import ALICE, BOB, MiB, StorageCloud
from tests.integration.test_storage_images_api import _raw_post

pytestmark = pytest.mark.integration
storage_cloud = test_storage_api.storage_cloud  # the API, storage service and a compute node


def _temps(c: StorageCloud) -> list[str]:
    return [p.name for p in (c.pool / ".tmp").iterdir()]


def _upload(c: StorageCloud, data: bytes, token: str = ALICE, **params: str) -> object:
    return c.http.post(
        "/v1/volumes/upload",
        params=params,
        content=data,
        headers={**auth(token), "Content-Type": "application/octet-stream"},
    )


def test_upload_and_download(storage_cloud: StorageCloud) -> None:
    c = storage_cloud
    data = os.urandom(2 * MiB) + bytes(4 * MiB) + os.urandom(MiB)
    sha = hashlib.sha256(data).hexdigest()
    reply = _upload(c, data, name="disk", sha256=sha)
    assert reply.status_code == 201, reply.text  # type: ignore[attr-defined]
    volume = reply.json()  # type: ignore[attr-defined]
    assert reply.headers["x-content-sha256"] == sha  # type: ignore[attr-defined]
    assert (volume["state"], volume["size"]) == ("available", len(data))
    path = c.pool / "volumes" / volume["id"]
    assert path.read_bytes() == data
    assert path.stat().st_blocks * 512 < 5 * MiB  # the zeros stay holes
    with c.http.stream("GET", f"/v1/volumes/{volume['id']}/content", headers=auth(ALICE)) as r:
        assert r.status_code == 200
        assert int(r.headers["content-length"]) == len(data)
        got = b"".join(r.iter_bytes())
    assert hashlib.sha256(got).hexdigest() == sha
    assert c.get(f"/v1/volumes/{volume['id']}/content", BOB).status_code == 404
    assert _upload(c, b"x" * 512, name="disk").status_code == 409  # type: ignore[attr-defined]
    assert _temps(c) == []


def test_bad_uploads_leave_nothing(storage_cloud: StorageCloud) -> None:
    c = storage_cloud
    wrong = _upload(c, os.urandom(4096), name="w", sha256="0" * 64)
    assert (wrong.status_code, wrong.json()["field"]) == (422, "sha256"), wrong.text  # type: ignore[attr-defined]
    odd = _upload(c, b"x" * 1000, name="odd")
    assert (odd.status_code, odd.json()["field"]) == (422, "size"), odd.text  # type: ignore[attr-defined]
    chunked = c.http.post(
        "/v1/volumes/upload",
        params={"name": "chunked"},
        content=iter([b"x" * 512]),
        headers=auth(ALICE),
    )
    assert chunked.status_code == 411, chunked.text
    for name in ("a/b", "..", "nul\0"):
        assert _upload(c, b"x" * 512, name=name).status_code == 422  # type: ignore[attr-defined]
    huge = _raw_post(c, "/v1/volumes/upload?name=huge", 1 << 60, b"")
    assert huge.startswith(b"HTTP/1.1 413"), huge[:200]
    full = _raw_post(c, "/v1/volumes/upload?name=full", 1 << 45, b"")  # past the pool's space
    assert full.startswith(b"HTTP/1.1 422"), full[:300]
    assert b"no_space" in full
    _raw_post(c, "/v1/volumes/upload?name=cut", 8 * MiB, b"y" * MiB, hang_up=True)
    deadline = time.monotonic() + 30
    while (c.get("/v1/volumes").json()["volumes"] or _temps(c)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (c.get("/v1/volumes").json()["volumes"], c.files(), _temps(c)) == ([], set(), [])


def test_vol_upload_and_download_verbs(storage_cloud: StorageCloud, tmp_path: Path) -> None:
    c = storage_cloud
    env = {**os.environ, "FLOTILLA_API_URL": c.url, "FLOTILLA_TOKEN": ALICE}
    src = tmp_path / "disk.raw"
    src.write_bytes(os.urandom(3 * MiB))
    sha = hashlib.sha256(src.read_bytes()).hexdigest()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli.main", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    up = run("vol-upload", str(src), "d1")
    assert up.returncode == 0, up.stderr
    assert sha in up.stdout
    assert up.stderr == ""  # no progress off a terminal
    out = tmp_path / "back.raw"
    down = run("--json", "vol-download", "d1", str(out))
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout)["sha256"] == sha
    assert out.read_bytes() == src.read_bytes()
    assert not (tmp_path / "back.raw.part").exists()
    missing = run("vol-download", "nope", str(tmp_path / "x"))
    assert missing.returncode == 3
    odd = tmp_path / "odd"
    odd.write_bytes(b"x" * 1000)
    assert run("vol-upload", str(odd), "odd").returncode == 2
