"""Host paths in a create, through the HTTP API, the real scheduler and compute nodes on a real
broker: what a member may boot, what an admin may, what each is told, and that a refused
create leaves nothing behind. (The compute nodes run the FakeDriver, which reads no file; the
KVM driver reads the very descriptors checked here, see tests/integration/test_compute.py.)"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from compute_node.boot_sources import MEMBER_RULE
from tests.bootfiles import BOOT_DIR, KERNEL
from tests.integration import test_api
from tests.integration.test_api import ADMIN, ALICE, Cloud, auth

pytestmark = pytest.mark.integration
cloud = test_api.cloud  # the fixture: an API, the scheduler and two FakeDriver nodes


def create(c: Cloud, token: str, boot: dict[str, Any], **kw: Any) -> dict[str, Any]:
    r = c.create(token, boot=boot, **kw)
    body: dict[str, Any] = r.json()
    body["status"] = r.status_code
    return body


def nothing_left(c: Cloud, project: str = "alice") -> None:
    listed = c.http.get("/v1/domains", params={"project": project}, headers=auth(ADMIN)).json()
    assert listed["domains"] == []
    usage = c.http.get(f"/v1/projects/{project}", headers=auth(ADMIN)).json()["usage"]
    assert usage == {
        "domains": 0,
        "vcpus": 0,
        "memory_mib": 0,
        "snapshot_bytes": 0,
        "images": 0,
        "image_gib": 0,
    }
    for node in c.nodes.values():
        assert node.store.all() == []


def secrets(tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "api.toml"  # stands for the API's config, which holds the admin token
    config.write_text('[[api.tokens]]\ntoken = "admin-secret"\nrole = "admin"\n')
    return {
        "shadow": "/etc/shadow",
        "api config": str(config),
        "missing": f"/nonexistent-{uuid.uuid4().hex}",
        "dot-dot": f"{BOOT_DIR}/../../pyproject.toml",
        "dir inside": str(BOOT_DIR),
    }


def test_a_member_cannot_boot_host_files_and_learns_only_the_rule(
    cloud: Cloud, tmp_path: Path
) -> None:
    for path in secrets(tmp_path).values():
        for field in ("kernel", "initrd"):
            p = create(cloud, ALICE, {"kernel": KERNEL, field: path})
            assert (p["status"], p["code"], p["field"]) == (403, "forbidden", f"boot.{field}"), p
            assert p["detail"] == f"boot.{field}: {MEMBER_RULE}"  # the same whatever exists
            assert p["fault"]["code"] == "forbidden"
            nothing_left(cloud)


def test_a_member_boots_files_under_the_allowed_dirs(cloud: Cloud) -> None:
    p = create(cloud, ALICE, {"kernel": KERNEL, "initrd": KERNEL})
    assert (p["status"], p["state"]) == (201, "running"), p


def test_an_admin_may_boot_any_absolute_path_and_gets_the_detail(
    cloud: Cloud, tmp_path: Path
) -> None:
    ok = create(cloud, ADMIN, {"kernel": KERNEL, "initrd": secrets(tmp_path)["api config"]})
    assert (ok["status"], ok["state"]) == (201, "running"), ok
    missing = secrets(tmp_path)["missing"]
    p = create(cloud, ADMIN, {"kernel": missing})
    assert (p["status"], p["code"], p["field"]) == (422, "invalid", "boot.kernel"), p
    assert p["detail"] == f"boot.kernel: {missing}: No such file or directory"
    # The spec's own fault: one host was asked, not every host in turn.
    assert p["fault"]["code"] == "invalid"
    listed = cloud.http.get("/v1/domains", headers=auth(ADMIN)).json()["domains"]
    assert [d["id"] for d in listed] == [ok["id"]]


SPEC_ERRORS = [
    ({"kernel": "guest.elf"}, "boot.kernel", "must be an absolute path"),
    ({"kernel": KERNEL, "initrd": "../../etc/shadow"}, "boot.initrd", "absolute path"),
    ({"kernel": f"{KERNEL}\u0000/etc/shadow"}, "boot.kernel", "NUL byte"),
    ({"kernel": KERNEL, "cmdline": "console=ttyS0\u0000x"}, "boot.cmdline", "NUL byte"),
]


def test_what_no_host_could_run_is_422_before_anything_is_stored(cloud: Cloud) -> None:
    for token, project in ((ALICE, "alice"), (ADMIN, "ops")):
        for boot, field, reason in SPEC_ERRORS:
            p = create(cloud, token, boot)
            assert (p["status"], p["code"], p["field"]) == (422, "invalid", field), p
            assert reason in p["detail"]
            nothing_left(cloud, project)


def test_the_role_comes_from_the_token_never_from_the_body(cloud: Cloud) -> None:
    p = create(cloud, ALICE, {"kernel": "/etc/shadow"}, privileged=True)
    assert (p["status"], p["field"]) == (422, "privileged"), p
    nothing_left(cloud)
