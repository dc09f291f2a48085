"""Which volumes a live migration copies, into which disk slots, and how the VMM's
MigrateOut carries them (docs/migration.md, "Host-local volumes")."""

from __future__ import annotations

import uuid

import pytest

from compute_node.vmm import protocol as p
from compute_node.vmm.migration import check
from compute_node.volume_copies import copied_disks, disk_indices
from protos.bindings import DiskBinding
from protos.domain import BootSpec, DiskSpec, DomainSpec
from services.bus import ServiceError

TOKEN = "ab" * 32


def _domain(readonly: str = "") -> tuple[DomainSpec, list[DiskBinding]]:
    ids = {t: uuid.uuid4() for t in ("vdc", "vda", "vdb")}
    spec = DomainSpec(
        name="db-1",
        boot=BootSpec(kernel="/boot/k"),
        disks=[DiskSpec(target=t, volume_id=v, readonly=t == readonly) for t, v in ids.items()],
    )
    bindings = [
        DiskBinding(target="vdc", volume_id=ids["vdc"], pool="local", host="node-a"),
        DiskBinding(target="vda", volume_id=ids["vda"], pool="shared"),
        DiskBinding(target="vdb", volume_id=ids["vdb"], pool="local", host="node-a"),
    ]
    return spec, bindings


def test_the_hosts_own_volumes_are_copied_into_their_slots() -> None:
    spec, bindings = _domain()
    copies = copied_disks(spec, bindings, "node-a")
    assert [b.target for b in copies] == ["vdc", "vdb"]
    assert disk_indices(spec, copies) == [2, 1]  # slots in target order: vda vdb vdc
    assert copied_disks(spec, bindings, "node-b") == []


@pytest.mark.parametrize("readonly", ["vdb", "vda"])
def test_a_read_only_host_local_volume_is_refused(readonly: str) -> None:
    spec, bindings = _domain(readonly)
    if readonly == "vda":  # a shared pool's: not copied, not refused
        assert len(copied_disks(spec, bindings, "node-a")) == 2
        return
    with pytest.raises(ServiceError) as exc:
        copied_disks(spec, bindings, "node-a")
    assert (exc.value.code, exc.value.details["field"]) == ("invalid", "disks")
    assert "vdb" in exc.value.message
    assert "read-only" in exc.value.message


def test_migrate_out_carries_the_copied_disks() -> None:
    req = p.MigrateOut(address="127.0.0.1", port=4000, token=TOKEN, copy_disks=(0, 2))
    decoded = p.decode_request(p.encode_request(req))
    assert isinstance(decoded, p.MigrateOut)
    assert decoded.copy_disks == (0, 2)
    check(decoded)
    for bad in (["0"], [-1], [True], "0"):
        frame = {**p.encode_request(req), "copy_disks": bad}
        with pytest.raises(p.ControlError):
            check(p.decode_request(frame))  # type: ignore[arg-type]
