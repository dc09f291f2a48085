"""Images end to end, through HTTP only: the test guest's kernel imported as an image (the
bytes streamed API → the pool's host), a domain booted from it by name (`boot.image`), the
initrd image beside it (`boot.initrd_image`) received by the guest, the images' delete
refused while a definition boots from them."""

from __future__ import annotations

import hashlib
import re
import struct
import time
import uuid

from tests.e2e.harness import E2E, ok, wait_console, wait_domain, wait_gone
from tests.guest_initrd import initrd_line
from tests.kvm.test_virtio_blk import pattern

MIB = 1 << 20


def test_a_guest_boots_from_an_imported_kernel_image(e2e: E2E) -> None:
    """...and receives the initrd image named beside it (`boot.initrd_image`): the guest
    hashes the module the VMM loaded."""
    c = e2e.client()
    name = f"guest-{uuid.uuid4().hex[:6]}"
    data = e2e.guest.read_bytes()
    image = ok(
        c.post(
            "/v1/images",
            params={"name": name, "kind": "kernel"},
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        ),
        201,
    )
    assert image["sha256"] == hashlib.sha256(data).hexdigest()
    initrd_data = uuid.uuid4().bytes * 4096
    initrd = ok(
        c.post(
            "/v1/images",
            params={"name": f"{name}-initrd", "kind": "initrd"},
            content=initrd_data,
            headers={"Content-Type": "application/octet-stream"},
        ),
        201,
    )
    spec = e2e.spec()
    spec["boot"] = {"image": name, "initrd_image": initrd["name"], "cmdline": "initrd ready"}
    d = ok(c.post("/v1/domains", json=spec), 201)
    wait_domain(c, d["id"], "running")
    text = wait_console(c, d["id"], "READY vcpus=1 memory_mib=32")
    assert re.search(initrd_line(initrd_data), text), text
    for held in (image, initrd):
        refused = c.delete(f"/v1/images/{held['id']}")
        assert (refused.status_code, refused.json().get("reason")) == (409, "in_use"), refused.text
    # Another project cannot boot a private image it cannot see.
    other = e2e.client("bob").post("/v1/domains", json={**e2e.spec(), "boot": spec["boot"]})
    assert (other.status_code, other.json().get("field")) == (422, "boot.image"), other.text
    ok(c.delete(f"/v1/domains/{d['id']}"), (202, 204))
    wait_gone(c, d["id"])
    ok(c.delete(f"/v1/images/{image['id']}"), 204)
    ok(c.delete(f"/v1/images/{initrd['id']}"), 204)


def test_a_root_disk_from_an_image_is_read_by_the_guest(e2e: E2E) -> None:
    """A disk image holding the guest's pattern at sectors 100-163 (seed 7) becomes the
    1 GiB root disk of a new domain; the guest verifies the pattern through virtio-blk."""
    c = e2e.client()
    data = bytearray(MIB)
    for offset in range(100 * 512, 164 * 512, 8):
        struct.pack_into("<Q", data, offset, pattern(offset, 7))
    name = f"root-{uuid.uuid4().hex[:6]}"
    ok(
        c.post(
            "/v1/images",
            params={"name": name},
            content=bytes(data),
            headers={"Content-Type": "application/octet-stream"},
        ),
        201,
    )
    spec = e2e.spec("ready blkinfo blkverify=100,64,7")
    spec["disks"] = [{"target": "vda", "image": name, "size_gib": 1}]
    d = ok(c.post("/v1/domains", json=spec), 201)
    wait_domain(c, d["id"], "running")
    text = wait_console(c, d["id"], "BLK verify sector=100 count=64")
    assert "BLK capacity=2097152 ro=0" in text, text
    assert "BLK verify sector=100 count=64 ok" in text, text
    volumes = ok(c.get("/v1/volumes"))["volumes"]
    assert [v["attachment"]["domain_id"] for v in volumes if v["attachment"]] == [d["id"]]
    ok(c.delete(f"/v1/domains/{d['id']}"), (202, 204))
    wait_gone(c, d["id"])
    deadline = time.monotonic() + 20
    while any(v["name"].startswith(spec["name"]) for v in ok(c.get("/v1/volumes"))["volumes"]):
        assert time.monotonic() < deadline, "the root disk outlived its domain"
        time.sleep(0.1)
