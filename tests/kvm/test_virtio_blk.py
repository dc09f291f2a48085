"""virtio-blk on a raw image file, driven by the test guest's `blk*` actions, and malformed
chains from `virtiohostile` (docs/machine.md)."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import native
from native import EventKind
from tests.kvm.harness import Booted, Console
from tests.kvm.tinyguest import build_pvh_elf

PREFIX = "flotilla-guest: "
SECTOR = 512
PATTERN_MUL = 0x9E3779B97F4A7C15
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK = (1 << 64) - 1

Boot = Callable[..., Booted]


def pattern(offset: int, seed: int) -> int:
    """The guest's `blkwrite` word at byte offset `offset` of the disk."""
    return (((offset ^ (seed << 48)) * PATTERN_MUL) + seed) & MASK


def checksum(data: bytes) -> int:
    """The guest's `blkread` checksum: FNV-1a over little-endian 64-bit words."""
    h = FNV_OFFSET
    for (word,) in struct.iter_unpack("<Q", data):
        h = ((h ^ word) * FNV_PRIME) & MASK
    return h


@pytest.fixture
def disk_boot(kvm: None, test_guest: Path) -> Iterator[Callable[..., Booted]]:
    started: list[Booted] = []

    def _boot(cmdline: str, disks: list[native.Disk]) -> Booted:
        console = Console()
        try:
            machine = native.Machine(
                test_guest,
                cmdline=cmdline,
                memory_mib=64,
                console_out=console.write_fd,
                console_in=console.input_fd,
                disks=disks,
            )
        except BaseException:
            console.close()
            raise
        booted = Booted(machine, console)
        started.append(booted)
        machine.start()
        return booted

    yield _boot
    for b in started:
        b.machine.close()
        b.console.close()


def run_to_poweroff(guest: Booted) -> str:
    guest.wait_end(EventKind.POWEROFF, 30)
    return guest.console.text


def make_image(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def test_guest_writes_a_pattern_the_host_finds_in_the_file(disk_boot: Boot, tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", 4 * 1024 * 1024)
    guest = disk_boot(
        "blkinfo blkwrite=100,300,7 blkverify=100,300,7 blkflush poweroff",
        [native.Disk(str(image), id="flotilla-test")],
    )
    text = run_to_poweroff(guest)
    assert f"{PREFIX}BLK capacity=8192 ro=0 id=flotilla-test" in text
    assert f"{PREFIX}BLK write sector=100 count=300 status=ok" in text
    assert f"{PREFIX}BLK verify sector=100 count=300 ok" in text
    assert f"{PREFIX}BLK flush status=ok" in text
    data = image.read_bytes()
    start, end = 100 * SECTOR, 400 * SECTOR
    words = struct.unpack(f"<{(end - start) // 8}Q", data[start:end])
    assert all(w == pattern(start + 8 * i, 7) for i, w in enumerate(words))
    # Nothing outside the range was touched.
    assert data[:start] == bytes(start)
    assert data[end:] == bytes(len(data) - end)
    dev = guest.machine.virtio_devices()[0]
    assert dev.kind == "blk"
    assert not dev.broken
    assert dev.ops[1] >= 1  # writes


def test_host_writes_a_pattern_the_guest_reads_back(disk_boot: Boot, tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", 2 * 1024 * 1024)
    payload = os.urandom(257 * SECTOR)
    with image.open("r+b") as f:
        f.seek(1000 * SECTOR)
        f.write(payload)
    guest = disk_boot("blkread=1000,257 poweroff", [native.Disk(str(image))])
    text = run_to_poweroff(guest)
    expected = checksum(payload)
    assert f"{PREFIX}BLK read sector=1000 count=257 status=ok checksum=0x{expected:016x}" in text


def test_read_only_disk_rejects_writes(disk_boot: Boot, tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", 1024 * 1024)
    before = image.read_bytes()
    guest = disk_boot(
        "blkinfo blkwrite=0,8 blkread=0,8 poweroff", [native.Disk(str(image), read_only=True)]
    )
    text = run_to_poweroff(guest)
    assert f"{PREFIX}BLK capacity=2048 ro=1" in text
    assert f"{PREFIX}BLK write sector=0 count=8 status=ioerr" in text
    assert f"{PREFIX}BLK read sector=0 count=8 status=ok" in text
    assert image.read_bytes() == before


def test_odd_sized_disk_works_at_its_last_sector_and_refuses_past_it(
    disk_boot: Boot, tmp_path: Path
) -> None:
    # 2047 whole sectors and a 100-byte tail the guest cannot reach.
    image = make_image(tmp_path / "odd.img", 2047 * SECTOR + 100)
    guest = disk_boot(
        "blkinfo blkwrite=2046,1,5 blkverify=2046,1,5 blkread=2047,1 blkwrite=2046,2 "
        "blkread=2046,2 poweroff",
        [native.Disk(str(image))],
    )
    text = run_to_poweroff(guest)
    assert f"{PREFIX}BLK capacity=2047 ro=0" in text
    assert f"{PREFIX}BLK write sector=2046 count=1 status=ok" in text
    assert f"{PREFIX}BLK verify sector=2046 count=1 ok" in text
    assert f"{PREFIX}BLK read sector=2047 count=1 status=ioerr" in text
    assert f"{PREFIX}BLK write sector=2046 count=2 status=ioerr" in text
    assert f"{PREFIX}BLK read sector=2046 count=2 status=ioerr" in text
    data = image.read_bytes()
    assert len(data) == 2047 * SECTOR + 100
    assert data[-100:] == bytes(100)
    last = struct.unpack("<64Q", data[2046 * SECTOR : 2047 * SECTOR])
    assert last[0] == pattern(2046 * SECTOR, 5)


def test_malformed_chains_mark_the_device_broken_and_the_vmm_survives(
    disk_boot: Boot, tmp_path: Path
) -> None:
    image = make_image(tmp_path / "disk.img", 1024 * 1024)
    guest = disk_boot("virtiohostile", [native.Disk(str(image))])
    done = guest.console.wait_for(rf"{PREFIX}VIRTIO HOSTILE done needs_reset=(\d+)/(\d+)\n", 30)
    assert done.group(1) == done.group(2) == "9", guest.console.text
    dev = guest.machine.virtio_devices()[0]
    assert dev.malformed >= 9
    assert guest.machine.state() is native.MachineState.RUNNING
    guest.machine.stop()


def test_device_works_again_after_a_reset_from_the_hostile_state(
    disk_boot: Boot, tmp_path: Path
) -> None:
    image = make_image(tmp_path / "disk.img", 1024 * 1024)
    guest = disk_boot(
        "virtiohostile blkwrite=3,2,9 blkverify=3,2,9 poweroff", [native.Disk(str(image))]
    )
    text = run_to_poweroff(guest)
    assert f"{PREFIX}BLK verify sector=3 count=2 ok" in text
    assert not guest.machine.virtio_devices()[0].broken


def test_device_state_survives_save_and_restore_while_paused(
    disk_boot: Boot, tmp_path: Path
) -> None:
    image = make_image(tmp_path / "disk.img", 1024 * 1024)
    guest = disk_boot("blkwrite=0,1,2 counter", [native.Disk(str(image))])
    guest.console.wait_for(f"{PREFIX}COUNTER 1")
    machine = guest.machine
    machine.pause()
    blob = machine.save_device(0)
    machine.restore_device(0, blob)
    assert machine.save_device(0) == blob
    corrupt = bytearray(blob)
    corrupt[20] ^= 1
    with pytest.raises(native.MachineStateError):
        machine.restore_device(0, bytes(corrupt))
    machine.resume()
    with pytest.raises(native.MachineStateError):
        machine.save_device(0)
    guest.console.wait_for(f"{PREFIX}COUNTER 5")


def test_missing_disk_is_a_config_error(kvm: None, test_guest: Path, tmp_path: Path) -> None:
    with pytest.raises(native.ConfigError, match="disk"):
        native.Machine(test_guest, disks=[native.Disk(str(tmp_path / "none.img"))])


def test_a_disk_has_one_writer_and_shared_readers(
    kvm: None, test_guest: Path, tmp_path: Path
) -> None:
    """The VMM's open takes an OFD lock (docs/storage.md): a second writer, or a reader beside
    a writer, is refused with EBUSY; readers share; the storage agent sees the VMM's lock."""
    from compute_node.storage import Busy, Pool, VolumeStore

    store = VolumeStore(Pool(tmp_path))
    store.create("vol-1", 1 << 20)
    disk = str(store.pool.volume_path("vol-1"))

    def machine(*disks: native.Disk) -> native.Machine:
        return native.Machine(test_guest, cmdline="", memory_mib=16, disks=list(disks))

    first = machine(native.Disk(disk))
    try:
        for second in (native.Disk(disk), native.Disk(disk, read_only=True)):
            with pytest.raises(native.ConfigError, match="in use") as refused:
                machine(second)
            assert refused.value.errno == errno.EBUSY
        with pytest.raises(Busy):
            store.wipe("vol-1")
        with pytest.raises(Busy):
            store.delete("vol-1")
    finally:
        first.close()
    readers = [machine(native.Disk(disk, read_only=True)) for _ in range(2)]
    try:
        with pytest.raises(native.ConfigError, match="in use"):
            machine(native.Disk(disk))
        store.clone("vol-1", "vol-2")  # a reader beside readers
    finally:
        for m in readers:
            m.close()
    machine(native.Disk(disk)).close()  # the lock went with the closed machines
    store.delete("vol-1")


def test_a_request_of_seg_max_segments_fits_in_the_ring(tmp_path: Path, kvm: None) -> None:
    # Without indirect descriptors a request takes seg_max + 2 ring entries (header, status):
    # Linux's zeroing fallback (256 bio_vecs of the zero page) built requests that never fit
    # in a 256-entry ring and waited forever (mkfs.ext4 hung in fallocate). A hand-made guest
    # reads QueueNumMax of queue 0 and the config's seg_max and exits with both.
    code = (
        b"\xc7\x05\x30\x00\x00\xe0\x00\x00\x00\x00"  # mov dword [0xe0000030], 0 (QueueSel)
        b"\xa1\x34\x00\x00\xe0"  # mov eax, [0xe0000034] (QueueNumMax)
        b"\x8b\x1d\x0c\x01\x00\xe0"  # mov ebx, [0xe000010c] (config: seg_max)
        b"\xc1\xe0\x10\x09\xd8"  # shl eax, 16; or eax, ebx
        b"\x66\xba\xf4\x00\xef\xf4"  # mov dx, 0xf4; out dx, eax; hlt
    )
    kernel = tmp_path / "segmax.elf"
    kernel.write_bytes(build_pvh_elf(code))
    console = Console()
    machine = native.Machine(
        kernel,
        memory_mib=16,
        console_out=console.write_fd,
        disks=[native.Disk(str(make_image(tmp_path / "d.img", 1 << 20)))],
    )
    try:
        machine.start()
        event = machine.wait_event(10)
    finally:
        machine.close()
        console.close()
    assert event is not None
    assert (event.kind, event.reason) == (EventKind.POWEROFF, "debug_exit")
    value = event.code >> 1
    queue_max, seg_max = value >> 16, value & 0xFFFF
    assert queue_max == 256
    assert 1 <= seg_max <= queue_max - 2
