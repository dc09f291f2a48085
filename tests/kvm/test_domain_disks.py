"""Volumes and images on real guests, through the compute node's lifecycle service and the KVM
driver (one VMM process per guest): the test guest writes a pattern to a volume in a real pool
directory and reads it back after a stop and a start; one writer per volume; read-only disks;
a kernel booted from an image store."""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import storage_guest
from compute_node.boot_sources import BootSources
from compute_node.kvm import KvmDriver
from compute_node.lifecycle import Lifecycle
from compute_node.resources import Claims
from compute_node.storage import ImageStore, Pool, VolumeStore
from compute_node.storage.locks import open_volume
from compute_node.storage_sources import StorageSources
from compute_node.store import Store
from compute_node.vmm.client import VmmSpawnError, spawn
from protos.base import Message
from protos.bindings import DiskBinding, ImageRef
from protos.codec import Envelope
from protos.commands import DefineDomain, DestroyDomain, StartDomain
from protos.domain import BootSpec, DiskSpec, DomainSpec, PowerState
from protos.host import HostInventory
from protos.replies import DomainInfo, ErrorReply
from services.bus import Context
from services.bus.service import dispatch
from tests.kvm.test_vmm_process import write_config

HOST = "node-1"
PREFIX = "flotilla-guest: "
CTX = Context(Envelope(type="t", body={}, source="test"))
MIB = 1024 * 1024


class Node:
    """The lifecycle service on the KVM driver, with one `dir` pool, no broker."""

    def __init__(self, root: Path, guest_dir: Path) -> None:
        self.driver = KvmDriver(root / "domains")
        self.store = Store(root / "compute.db", host=HOST, source=f"compute:{HOST}")
        inventory = HostInventory(
            capacity=self.driver.host_resources(),
            cpu_allocation_ratio=4.0,
            ram_allocation_ratio=1.0,
            kvm=self.driver.capabilities().kvm,
        )
        (root / "pool").mkdir()
        self.pool = Pool(root / "pool", "dir")
        self.service = Lifecycle(
            HOST,
            self.store,
            self.driver,
            Claims(inventory, reserved_memory_mib=0),
            BootSources([guest_dir]),
            storage=StorageSources(HOST, {"local": self.pool}),
        )

    def do(self, command: Message) -> Message:
        return dispatch(self.service, command, CTX)

    def ok(self, command: Message) -> DomainInfo:
        reply = self.do(command)
        assert isinstance(reply, DomainInfo), reply
        return reply

    def volume(self, size: int = MIB) -> uuid.UUID:
        vid = uuid.uuid4()
        VolumeStore(self.pool).create(str(vid), size)
        return vid

    def console(self, domain_id: uuid.UUID) -> str:
        return self.driver.console(domain_id, 1 << 20)[0].decode(errors="replace")

    def wait_console(self, domain_id: uuid.UUID, pattern: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.console(domain_id)
            if re.search(pattern, text):
                return text
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in:\n{self.console(domain_id)}")

    def wait_off(self, domain_id: uuid.UUID, timeout: float = 20.0) -> None:
        assert self.store.wait_for(domain_id, {PowerState.SHUTOFF}, timeout) is not None

    def close(self) -> None:
        for record in self.store.all():
            if record.state is not PowerState.SHUTOFF:
                self.do(DestroyDomain(domain_id=record.id))
        self.driver.close()
        self.store.close()


@pytest.fixture
def node(kvm: None, test_guest: Path, tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path, test_guest.parent)
    yield n
    n.close()


def disk_domain(
    name: str, kernel: Path, cmdline: str, vid: uuid.UUID, *, readonly: bool = False
) -> DefineDomain:
    spec = DomainSpec(
        name=name,
        memory_mib=32,
        boot=BootSpec(kernel=str(kernel), cmdline=cmdline),
        disks=[DiskSpec(target="vda", volume_id=vid, readonly=readonly)],
    )
    binding = DiskBinding(target="vda", volume_id=vid, pool="local", host=HOST)
    return DefineDomain(spec=spec, disks=[binding])


def test_a_pattern_written_to_a_volume_is_read_back_after_stop_and_start(
    node: Node, test_guest: Path
) -> None:
    vid = node.volume(4 * MIB)
    # First boot: the pattern is not there yet (mismatch), is written and flushed;
    # second boot of the same definition: the first verify finds it.
    cmd = disk_domain(
        "writer", test_guest, "blkinfo blkverify=100,64,7 blkwrite=100,64,7 blkflush poweroff", vid
    )
    domain_id = cmd.spec.uuid
    node.ok(cmd)
    node.ok(StartDomain(domain_id=domain_id))
    node.wait_off(domain_id)
    first = node.console(domain_id)
    assert f"{PREFIX}BLK capacity=8192 ro=0 id={str(vid)[:20]}" in first
    assert f"{PREFIX}BLK verify sector=100 count=64 mismatch" in first
    assert f"{PREFIX}BLK flush status=ok" in first
    assert f"{PREFIX}BLK verify sector=100 count=64 ok" not in first
    node.ok(StartDomain(domain_id=domain_id))
    node.wait_off(domain_id)
    text = node.console(domain_id)
    assert f"{PREFIX}BLK verify sector=100 count=64 ok" in text, text
    data = node.pool.volume_path(str(vid)).read_bytes()
    assert data[100 * 512 : 164 * 512] != bytes(64 * 512)


def test_a_machine_restarted_by_its_reboot_policy_opens_its_volume_again(
    node: Node, test_guest: Path
) -> None:
    vid = node.volume()
    # on_reboot=restart: the VMM makes a new machine from the same descriptors each time.
    cmd = disk_domain("again", test_guest, "blkverify=0,8,4 blkwrite=0,8,4 blkflush reboot", vid)
    node.ok(cmd)
    node.ok(StartDomain(domain_id=cmd.spec.uuid))
    text = node.wait_console(
        cmd.spec.uuid, f"{PREFIX}BLK verify sector=0 count=8 ok(.|\\n)*BLK flush status=ok"
    )
    assert f"{PREFIX}BLK verify sector=0 count=8 mismatch" in text
    node.ok(DestroyDomain(domain_id=cmd.spec.uuid))


def test_a_second_writer_is_refused_and_readers_share(node: Node, test_guest: Path) -> None:
    vid = node.volume()
    writer = disk_domain("w1", test_guest, "blkwrite=0,8,3 blkflush ready", vid)
    second = disk_domain("w2", test_guest, "ready", vid)
    reader = disk_domain("r1", test_guest, "ready", vid, readonly=True)
    for cmd in (writer, second, reader):
        node.ok(cmd)
    node.ok(StartDomain(domain_id=writer.spec.uuid))
    node.wait_console(writer.spec.uuid, f"{PREFIX}READY")
    for cmd in (second, reader):
        reply = node.do(StartDomain(domain_id=cmd.spec.uuid))
        assert isinstance(reply, ErrorReply), reply
        assert reply.code == "conflict"
        assert f"vda (volume {vid} in pool local)" in reply.message
        assert "in use" in reply.message
    node.ok(DestroyDomain(domain_id=writer.spec.uuid))
    # Without the writer, two read-only users share the volume.
    reader2 = disk_domain("r2", test_guest, "ready", vid, readonly=True)
    node.ok(reader2)
    for cmd in (reader, reader2):
        assert node.ok(StartDomain(domain_id=cmd.spec.uuid)).state is PowerState.RUNNING
    reply = node.do(StartDomain(domain_id=second.spec.uuid))
    assert isinstance(reply, ErrorReply)
    assert reply.code == "conflict"


def test_a_read_only_disk_refuses_the_guests_writes(node: Node, test_guest: Path) -> None:
    vid = node.volume()
    before = node.pool.volume_path(str(vid)).read_bytes()
    cmd = disk_domain(
        "ro", test_guest, "blkinfo blkwrite=0,8,1 blkread=0,8 poweroff", vid, readonly=True
    )
    node.ok(cmd)
    node.ok(StartDomain(domain_id=cmd.spec.uuid))
    node.wait_off(cmd.spec.uuid)
    text = node.console(cmd.spec.uuid)
    assert f"{PREFIX}BLK capacity=2048 ro=1" in text
    assert f"{PREFIX}BLK write sector=0 count=8 status=ioerr" in text
    assert f"{PREFIX}BLK read sector=0 count=8 status=ok" in text
    assert node.pool.volume_path(str(vid)).read_bytes() == before


def test_a_kernel_from_an_image_store_boots(node: Node, test_guest: Path) -> None:
    with test_guest.open("rb") as f:
        image = ImageStore(node.pool).import_image(f, format="raw")
    spec = DomainSpec(
        name="imaged", memory_mib=32, boot=BootSpec(image="test-guest", cmdline="ready poweroff")
    )
    ref = ImageRef(sha256=image.sha256, pool="local", host=HOST, kind="kernel")
    node.ok(DefineDomain(spec=spec, kernel_image=ref))
    node.ok(StartDomain(domain_id=spec.uuid))
    node.wait_console(spec.uuid, f"{PREFIX}READY")
    node.wait_off(spec.uuid)


def test_the_test_guest_drives_qemus_virtio_blk_device(test_guest: Path, tmp_path: Path) -> None:
    """The anchor of bench/storage.py's guest_randread_iops works: the same guest ELF reads
    QEMU microvm's virtio-mmio block device."""
    if storage_guest.unavailable() is not None:
        pytest.skip(str(storage_guest.unavailable()))
    volume = tmp_path / "volume"
    volume.write_bytes(os.urandom(4 * MIB))
    for iothread in (False, True):
        assert (
            storage_guest.qemu(
                test_guest, volume, "blkbench=randread,500 poweroff", iothread=iothread
            )
            > 0
        )


def test_the_vmm_refuses_a_disk_another_writer_holds_as_conflict(
    kvm: None, test_guest: Path, tmp_path: Path
) -> None:
    """The lock that decides a race (the node's early look at the lock aside): the VMM's
    virtio-blk open of a volume another process holds is a `conflict` spawn failure."""
    volume = tmp_path / "volume"
    volume.write_bytes(bytes(MIB))
    holder = open_volume(volume, read_only=False, what="volume")
    directory = tmp_path / "vmm"
    directory.mkdir()
    disks = [{"path": str(volume), "read_only": False, "id": ""}]
    write_config(directory, test_guest, "ready", disks=disks)
    try:
        with pytest.raises(VmmSpawnError) as raised:
            spawn(directory)
    finally:
        os.close(holder)
    assert raised.value.code == "conflict"
    assert "in use" in raised.value.reason
