"""/v1/images over HTTP, end to end: the API streams the request body to the storage agent of
a compute node over its transfer port, the agent stores the image in its real pool, the
storage service records it; bad input refused with nothing left; projects apart; the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.bootfiles import KERNEL
from tests.integration import test_storage_api
from tests.integration.test_api import auth
from tests.integration.test_storage_api import ADMIN, ALICE, BOB, MiB, StorageCloud
from tests.unit.test_storage_images import kernel

pytestmark = pytest.mark.integration
storage_cloud = test_storage_api.storage_cloud  # the API, storage service and a compute node


def _images(c: StorageCloud) -> set[str]:
    return {p.name for p in (c.pool / "images").iterdir()}


def _temps(c: StorageCloud) -> list[str]:
    return [p.name for p in (c.pool / ".tmp").iterdir()]


def _upload(c: StorageCloud, data: bytes, token: str = ALICE, **params: str) -> object:
    return c.http.post(
        "/v1/images",
        params=params,
        content=data,
        headers={**auth(token), "Content-Type": "application/octet-stream"},
    )


def _raw_post(
    c: StorageCloud, target: str, length: int, body: bytes, *, hang_up: bool = False
) -> bytes:
    """A POST announcing `length` bytes and sending `body` (httpx refuses to lie)."""
    host, port = c.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(
            f"POST {target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {ALICE}\r\n".encode()
            + b"Content-Type: application/octet-stream\r\n"
            + f"Content-Length: {length}\r\n\r\n".encode()
            + body
        )
        if hang_up:
            conn.shutdown(socket.SHUT_WR)
        answer = b""
        try:  # the head, then as much body as its Content-Length says (it may come apart)
            while b"\r\n\r\n" not in answer:
                chunk = conn.recv(4096)
                if not chunk:
                    return answer
                answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            while len(body) < length:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                body += chunk
            return head + b"\r\n\r\n" + body
        except OSError:
            return answer


def _chunks(data: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    for pos in range(0, len(data), size):
        yield data[pos : pos + size]


def test_images_through_the_api(storage_cloud: StorageCloud, tmp_path: Path) -> None:
    c = storage_cloud
    data = os.urandom(3 * MiB + 17)
    reply = c.http.post(
        "/v1/images",
        params={"name": "kern", "kind": "disk"},
        content=_chunks(data),  # chunked: no Content-Length, streamed as it comes
        headers={**auth(ALICE), "Content-Type": "application/octet-stream"},
    )
    assert reply.status_code == 201, reply.text
    image = reply.json()
    sha = hashlib.sha256(data).hexdigest()
    assert (image["state"], image["sha256"], image["size"], image["kind"]) == (
        "available",
        sha,
        len(data),
        "disk",
    )
    assert reply.headers["location"] == f"/v1/images/{image['id']}"
    assert (c.pool / "images" / sha).read_bytes() == data
    again = _upload(c, data, name="kern2")
    assert again.status_code == 201, again.text  # type: ignore[attr-defined]
    assert _images(c) == {sha}  # the same bytes: a second name, one file

    raw = tmp_path / "d.raw"
    raw.write_bytes(b"disk" * 4096)
    qcow2 = tmp_path / "d.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True
    )
    q = _upload(c, qcow2.read_bytes(), name="disk", format="qcow2")
    assert q.status_code == 201, q.text  # type: ignore[attr-defined]
    assert q.json()["sha256"] == hashlib.sha256(raw.read_bytes()).hexdigest()  # type: ignore[attr-defined]

    listed = c.get("/v1/images").json()["images"]
    assert sorted(i["name"] for i in listed) == ["disk", "kern", "kern2"]
    assert c.get(f"/v1/images/{image['id']}").json()["sha256"] == sha
    assert c.delete(f"/v1/images/{image['id']}").status_code == 204
    assert _images(c) >= {sha}  # kern2 still names it
    assert c.delete(f"/v1/images/{again.json()['id']}").status_code == 204  # type: ignore[attr-defined]
    assert sha not in _images(c)
    assert _temps(c) == []


def test_bad_image_input_is_refused_and_nothing_is_left(
    storage_cloud: StorageCloud, tmp_path: Path
) -> None:
    c = storage_cloud
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 4096)
    overlay = tmp_path / "o.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(overlay)],
        check=True,
        capture_output=True,
    )
    backing = _upload(c, overlay.read_bytes(), name="evil")
    assert backing.status_code == 422, backing.text  # type: ignore[attr-defined]
    assert "backing file" in backing.json()["detail"]  # type: ignore[attr-defined]
    for name in ("a/b", "..", "a..b", "x" * 64, "nul\0"):
        bad = _upload(c, b"x" * 512, name=name)
        assert bad.status_code == 422, (name, bad.text)  # type: ignore[attr-defined]
        assert bad.json()["errors"][0]["field"] == "name"  # type: ignore[attr-defined]
    empty = _upload(c, b"", name="empty")
    assert empty.status_code == 422, empty.text  # type: ignore[attr-defined]
    liar = _upload(c, b"raw bytes" * 100, name="liar", format="qcow2")
    assert liar.status_code == 422, liar.text  # type: ignore[attr-defined]
    junk = _upload(c, b"MZ" + bytes(4094), name="junk", kind="kernel")
    assert junk.status_code == 422, junk.text  # type: ignore[attr-defined]
    assert "not a kernel image" in junk.json()["detail"]  # type: ignore[attr-defined]
    public = _upload(c, b"p" * 512, name="pub", visibility="public")
    assert public.status_code == 403  # type: ignore[attr-defined]
    huge = _raw_post(c, "/v1/images?name=huge", 1 << 60, b"")
    assert huge.startswith(b"HTTP/1.1 413"), huge[:200]
    assert (c.get("/v1/images").json()["images"], _images(c), _temps(c)) == ([], set(), [])


def test_a_truncated_upload_leaves_nothing(storage_cloud: StorageCloud) -> None:
    """The client announces 8 MiB, sends 1 MiB and hangs up: no image, no file, no temp."""
    c = storage_cloud
    _raw_post(c, "/v1/images?name=cut", 8 * MiB, b"y" * MiB, hang_up=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        images = c.get("/v1/images", ADMIN).json()["images"]
        if not images and not _temps(c):
            break
        time.sleep(0.2)
    assert (c.get("/v1/images", ADMIN).json()["images"], _images(c), _temps(c)) == ([], set(), [])


def test_projects_apart(storage_cloud: StorageCloud) -> None:
    c = storage_cloud
    mine = _upload(c, b"m" * 4096, name="mine").json()  # type: ignore[attr-defined]
    public = _upload(c, b"q" * 4096, ADMIN, name="base", visibility="public").json()  # type: ignore[attr-defined]
    other = c.get(f"/v1/images/{mine['id']}", BOB)
    assert other.status_code == 404
    assert "alice" not in other.text
    assert c.delete(f"/v1/images/{mine['id']}", BOB).status_code == 404
    assert c.delete(f"/v1/images/{public['id']}", BOB).status_code == 404
    assert [i["name"] for i in c.get("/v1/images", BOB).json()["images"]] == ["base"]
    assert c.get(f"/v1/images/{public['id']}", BOB).status_code == 200


def test_image_cli_verbs(storage_cloud: StorageCloud, tmp_path: Path) -> None:
    c = storage_cloud
    env = {**os.environ, "FLOTILLA_API_URL": c.url, "FLOTILLA_TOKEN": ALICE}
    src = tmp_path / "vmlinuz"
    src.write_bytes(kernel(b"cli"))

    def run(*args: str, token: str = ALICE) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli.main", *args],
            env={**env, "FLOTILLA_TOKEN": token},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    done = run("image-import", str(src), "kern", "--kind", "kernel")
    assert done.returncode == 0, done.stderr
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert sha in done.stdout
    assert f"sha256 {sha}" in done.stderr
    assert "\r" not in done.stderr  # no progress bar off a terminal
    listed = json.loads(run("--json", "image-list").stdout)
    assert [i["name"] for i in listed] == ["kern"]
    host_file = run("image-import", str(src), "k2", "--from-host", token=ADMIN)
    assert host_file.returncode == 0, host_file.stderr
    assert run("image-import", str(src), "k3", "--from-host").returncode == 7  # admins only
    rd = tmp_path / "initrd.img"
    rd.write_bytes(b"cpio" * 1024)
    assert run("image-import", str(rd), "rd", "--kind", "initrd").returncode == 0
    made = run(
        "--json",
        "create",
        "--name",
        "cli-rd",
        "--image",
        "kern",
        "--initrd-image",
        "rd",
        "--no-start",
    )
    assert made.returncode == 0, made.stderr
    boot = json.loads(made.stdout)["spec"]["boot"]
    assert (boot["image"], boot["initrd_image"]) == ("kern", "rd")
    shown = run("dominfo", "cli-rd")
    assert "Initrd:" in shown.stdout, shown.stdout
    assert "image rd" in shown.stdout, shown.stdout
    assert run("--json", "delete", "cli-rd").returncode == 0
    assert run("image-delete", "kern").returncode == 0
    assert run("image-delete", "kern").returncode == 3


def test_boot_image_resolution(storage_cloud: StorageCloud) -> None:
    """`boot.image` names a kernel image of the project or a public one; anything else is
    422 on `boot.image` with nothing left; a domain's image cannot be deleted under it."""
    c = storage_cloud
    kern = _upload(c, kernel(b"kern"), name="kern", kind="kernel").json()  # type: ignore[attr-defined]
    _upload(c, b"D" * 8192, name="disky")
    _upload(c, kernel(b"bobs"), BOB, name="bobs", kind="kernel")

    def domain(image: str, token: str = ALICE) -> httpx.Response:
        body = {"name": f"g-{uuid.uuid4().hex[:8]}", "boot": {"image": image}, "start": False}
        return c.post("/v1/domains", body, token)

    for image, why in (("nope", "no image"), ("disky", "disk image"), ("bobs", "no image")):
        refused = domain(image)
        assert (refused.status_code, refused.json()["field"]) == (422, "boot.image"), refused.text
        assert why in refused.json()["detail"]
    assert c.get("/v1/domains").json()["domains"] == []
    made = domain("kern")
    assert made.status_code == 201, made.text
    in_use = c.delete(f"/v1/images/{kern['id']}")
    assert (in_use.status_code, in_use.json()["reason"]) == (409, "in_use")
    assert c.delete(f"/v1/domains/{made.json()['id']}").status_code in (202, 204)
    deadline = time.monotonic() + 20
    while c.get(f"/v1/domains/{made.json()['id']}").status_code != 404:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert c.delete(f"/v1/images/{kern['id']}").status_code == 204


def test_initrd_image_resolution(storage_cloud: StorageCloud) -> None:
    """`boot.initrd_image` names an initrd image of the project or a public one, beside a
    kernel image; it reaches the host's definition at create and at a disk attach's
    redefinition; a wrong kind, a missing name or a path beside it is 422 on its field with
    nothing left; the image cannot be deleted under the definition."""
    c = storage_cloud
    _upload(c, kernel(b"kern"), name="kern", kind="kernel")
    initrd = _upload(c, b"cpio" * 4096, name="rd", kind="initrd").json()  # type: ignore[attr-defined]
    public = _upload(c, b"pub!" * 4096, ADMIN, name="pubrd", kind="initrd", visibility="public")
    _upload(c, b"D" * 8192, name="disky")
    _upload(c, b"bobs" * 4096, BOB, name="bobrd", kind="initrd")

    def domain(boot: dict[str, str]) -> httpx.Response:
        body = {"name": f"g-{uuid.uuid4().hex[:8]}", "boot": boot, "start": False}
        return c.post("/v1/domains", body)

    for boot, field, why in (
        ({"image": "kern", "initrd_image": "nope"}, "boot.initrd_image", "no image"),
        ({"image": "kern", "initrd_image": "bobrd"}, "boot.initrd_image", "no image"),
        ({"image": "kern", "initrd_image": "disky"}, "boot.initrd_image", "disk image"),
        ({"image": "kern", "initrd_image": "kern"}, "boot.initrd_image", "kernel image"),
        ({"image": "rd", "initrd_image": "rd"}, "boot.image", "initrd image"),
        ({"kernel": KERNEL, "initrd_image": "rd"}, "boot.initrd_image", "goes with 'image'"),
        ({"image": "kern", "initrd": KERNEL, "initrd_image": "rd"}, "boot.initrd_image", ""),
    ):
        refused = domain(boot)
        assert (refused.status_code, refused.json()["field"]) == (422, field), refused.text
        assert why in refused.json()["detail"], refused.text
    assert c.get("/v1/domains").json()["domains"] == []

    made = domain({"image": "kern", "initrd_image": "rd"})
    assert made.status_code == 201, made.text
    domain_id = uuid.UUID(made.json()["id"])
    record = c.node.store.get(domain_id)
    assert record is not None
    assert record.bindings.initrd_image is not None
    assert (record.bindings.initrd_image.kind, record.bindings.initrd_image.sha256) == (
        "initrd",
        initrd["sha256"],
    )
    spare = c.create("spare")
    added = c.post(f"/v1/domains/{domain_id}/disks", {"target": "vdb", "volume_id": spare["id"]})
    assert added.status_code == 200, added.text
    record = c.node.store.get(domain_id)
    assert record is not None
    assert record.bindings.initrd_image is not None  # resolved again at the redefinition
    assert record.bindings.initrd_image.sha256 == initrd["sha256"]
    in_use = c.delete(f"/v1/images/{initrd['id']}")
    assert (in_use.status_code, in_use.json()["reason"]) == (409, "in_use"), in_use.text
    with_public = domain({"image": "kern", "initrd_image": "pubrd"})
    assert with_public.status_code == 201, with_public.text
    held = c.delete(f"/v1/images/{public.json()['id']}", ADMIN)  # type: ignore[attr-defined]
    assert (held.status_code, held.json()["reason"]) == (409, "in_use"), held.text
    _gone(c, str(domain_id))
    _gone(c, with_public.json()["id"])
    assert c.delete(f"/v1/images/{initrd['id']}").status_code == 204


def _gone(c: StorageCloud, domain_id: str) -> None:
    assert c.delete(f"/v1/domains/{domain_id}").status_code in (202, 204)
    deadline = time.monotonic() + 20
    while c.get(f"/v1/domains/{domain_id}").status_code != 404:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_root_disk_from_an_image(storage_cloud: StorageCloud) -> None:
    """A disk `{target, image, size_gib}` is a new volume cloned from the image, grown,
    attached; deleted with the domain unless `keep`."""
    c = storage_cloud
    data = os.urandom(MiB) + b"\0" * MiB
    _upload(c, data, name="rootfs")
    _upload(c, kernel(b"k2"), name="kern", kind="kernel")

    def domain(disk: dict[str, object]) -> httpx.Response:
        body = {
            "name": f"g-{uuid.uuid4().hex[:8]}",
            "boot": {"kernel": KERNEL},
            "disks": [disk],
            "start": False,
        }
        return c.post("/v1/domains", body)

    made = domain({"target": "vda", "image": "rootfs", "size_gib": 1})
    assert made.status_code == 201, made.text
    volumes = c.get("/v1/volumes").json()["volumes"]
    (volume,) = volumes
    assert (volume["size"], volume["state"]) == (1 << 30, "attached")
    assert volume["attachment"]["domain_id"] == made.json()["id"]
    path = c.pool / "volumes" / volume["id"]
    with path.open("rb") as f:
        assert f.read(len(data)) == data
    assert path.stat().st_size == 1 << 30
    _gone(c, made.json()["id"])
    assert c.get("/v1/volumes").json()["volumes"] == []
    assert c.files() == set()

    kept = domain({"target": "vda", "image": "rootfs", "keep": True})
    assert kept.status_code == 201, kept.text
    _gone(c, kept.json()["id"])
    (volume,) = c.get("/v1/volumes").json()["volumes"]
    assert (volume["state"], volume["size"]) == ("available", len(data))

    bad: list[tuple[dict[str, object], str]] = [
        ({"target": "vdb", "image": "kern"}, "kernel image"),
        ({"target": "vdb", "image": "nope"}, "no image"),
        ({"target": "vdb", "image": "a..b"}, ""),
        ({"target": "vdb", "image": "rootfs", "size_gib": 0}, ""),
        ({"target": "vdb", "path": "/x", "size_gib": 1}, ""),
    ]
    for disk, why in bad:
        refused = domain(disk)
        assert refused.status_code == 422, (disk, refused.text)
        assert why in refused.json()["detail"], refused.text
    assert len(c.get("/v1/volumes").json()["volumes"]) == 1
    assert c.get("/v1/domains").json()["domains"] == []


def _quota(c: StorageCloud, project: str, **limits: int) -> None:
    set_ = c.http.put(f"/v1/projects/{project}/quota", json=limits, headers=auth(ADMIN))
    assert set_.status_code == 200, set_.text


def _usage(c: StorageCloud, project: str = "alice") -> tuple[int, int]:
    usage = c.get(f"/v1/projects/{project}", ADMIN).json()["usage"]
    return usage["images"], usage["image_gib"]


def test_image_quota_races_for_the_last_name(storage_cloud: StorageCloud) -> None:
    """Two imports begun together for the project's last image name: one is imported, the
    other refused (403 `over_quota`, resource `images`) with nothing left of it; the same
    bytes under another name (a deduplicated import) count too."""
    c = storage_cloud
    _quota(c, "alice", images=2)
    first = _upload(c, b"a" * 4096, name="first")
    assert first.status_code == 201, first.text  # type: ignore[attr-defined]

    def slow_body(fill: bytes) -> Iterator[bytes]:
        yield fill * 4096  # the import begins when the request does
        time.sleep(0.5)  # so both are under way before either ends
        yield fill * 4096

    def upload(name: str, fill: bytes) -> httpx.Response:
        return c.http.post(
            "/v1/images",
            params={"name": name},
            content=slow_body(fill),
            headers={**auth(ALICE), "Content-Type": "application/octet-stream"},
        )

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(upload, ("left", "right"), (b"L", b"R")))
    codes = sorted(a.status_code for a in answers)
    assert codes == [201, 403], [a.text for a in answers]
    refused = next(a.json() for a in answers if a.status_code == 403)
    assert (refused["code"], refused["resource"], refused["limit"], refused["used"]) == (
        "over_quota",
        "images",
        2,
        2,
    )
    assert len(c.get("/v1/images").json()["images"]) == 2
    assert len(_images(c)) == 2
    assert _temps(c) == []
    assert _usage(c) == (2, 1)
    again = _upload(c, b"a" * 4096, name="again")  # the first's bytes: still a name
    assert (again.status_code, again.json()["resource"]) == (403, "images"), again.text  # type: ignore[attr-defined]
    project = c.get("/v1/projects/alice").json()
    assert (project["quota"]["images"], project["usage"]["images"]) == (2, 2)
    assert _usage(c, "bob") == (0, 0)


def test_image_gib_quota_at_begin_and_at_end(storage_cloud: StorageCloud, tmp_path: Path) -> None:
    """`image_gib` refuses an import whose Content-Length does not fit before a byte is
    stored, and one whose stored (raw) size does not fit when it ends: that one's file is
    removed, unless another name holds the same bytes (deduplicated, it counts again)."""
    c = storage_cloud
    _quota(c, "alice", image_gib=1)
    small = os.urandom(MiB)
    assert _upload(c, small, name="small").status_code == 201  # type: ignore[attr-defined]
    before = _images(c)
    answer = _raw_post(c, "/v1/images?name=huge", 2 << 30, b"x" * 4096)
    assert b" 403 " in answer.split(b"\r\n", 1)[0], answer[:300]
    assert b'"resource":"image_gib"' in answer, answer
    # A qcow2 of a few KiB whose raw content is 1 GiB + 1 MiB: past the limit only at the end.
    qcow2 = tmp_path / "big.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), str((1 << 30) + MiB)], check=True
    )
    big = _upload(c, qcow2.read_bytes(), name="big", format="qcow2")
    assert big.status_code == 403, big.text  # type: ignore[attr-defined]
    body = big.json()  # type: ignore[attr-defined]
    assert (body["resource"], body["limit"], body["used"], body["requested"]) == (
        "image_gib",
        1,
        1,
        1,
    )
    assert _images(c) == before  # the converted file is gone
    assert _temps(c) == []
    assert [i["name"] for i in c.get("/v1/images").json()["images"]] == ["small"]
    assert _usage(c) == (1, 1)
    _quota(c, "alice", image_gib=2)
    kept = _upload(c, qcow2.read_bytes(), name="big", format="qcow2")
    assert kept.status_code == 201, kept.text  # type: ignore[attr-defined]
    assert _usage(c) == (2, 2)
    # The same content again: a name, no new file, but its size counts for the project.
    _quota(c, "alice", image_gib=2)
    twice = _upload(c, qcow2.read_bytes(), name="big2", format="qcow2")
    assert (twice.status_code, twice.json()["resource"]) == (403, "image_gib")  # type: ignore[attr-defined]
    assert kept.json()["sha256"] in _images(c)  # type: ignore[attr-defined]  # held by `big`
    assert _usage(c) == (2, 2)
