"""Seed inputs for the libFuzzer targets in this directory, one folder per target.

Each seed is a well-formed input of the kind the target's header comment describes (a
kernel the loader accepts, a guest that sets a device up and posts requests, a driver's
probe sequence), so fuzzing starts from deep inside the code rather than at its front door.
Usage: python3 seeds.py OUTDIR. Standard library only.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

# ---- kernel images (image) ----

KERNEL = 0x100000
WIDTH = {1: 0, 2: 1, 4: 2, 8: 3}  # access width -> the width byte of the access targets
ELF_IDENT64 = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
ELF_IDENT32 = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)
CODE = b"\xf4" * 64  # hlt


def xen_note(entry: int, desc_size: int) -> bytes:
    """The PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY = 18)."""
    desc = entry.to_bytes(desc_size, "little")
    return struct.pack("<III", 4, desc_size, 18) + b"Xen\x00" + desc


def elf64(paddr: int, note: bytes = b"") -> bytes:
    """An ELF64 executable with one PT_LOAD (and a PT_NOTE when note is given)."""
    phnum = 2 if note else 1
    code_at = 64 + 56 * phnum + len(note)
    ehdr = ELF_IDENT64 + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, paddr, 64, 0, 0, 64, 56, phnum, 64, 0, 0
    )
    load = struct.pack("<IIQQQQQQ", 1, 7, code_at, paddr, paddr, len(CODE), 0x1000, 0x1000)
    notes = struct.pack("<IIQQQQQQ", 4, 4, 64 + 56 * phnum, 0, 0, len(note), len(note), 4)
    return ehdr + load + (notes if note else b"") + note + CODE


def elf32_pvh(paddr: int) -> bytes:
    """A 32-bit ELF entered through its PVH note, as tinyguest and Xen-style kernels are."""
    note = xen_note(paddr + 1, 4)
    code_at = 52 + 32 * 2 + len(note)
    ehdr = ELF_IDENT32 + struct.pack(
        "<HHIIIIIHHHHHH", 2, 3, 1, paddr, 52, 0, 0, 52, 32, 2, 40, 0, 0
    )
    load = struct.pack("<IIIIIIII", 1, code_at, paddr, paddr, len(CODE), 0x2000, 7, 0x1000)
    notes = struct.pack("<IIIIIIII", 4, 52 + 64, 0, 0, len(note), len(note), 4, 4)
    return ehdr + load + notes + note + CODE


def bzimage(setup_sects: int = 4, payload: int = 0x400, init_size: int = 0x200000) -> bytes:
    """A bzImage with boot protocol 2.15, a 64-bit entry and a small payload."""
    img = bytearray(((setup_sects or 4) + 1) * 512 + payload)  # 0 setup sectors means 4
    img[0x1F1] = setup_sects
    struct.pack_into("<H", img, 0x1FE, 0xAA55)
    img[0x200] = 0xEB
    img[0x201] = 0x66  # the setup header ends at 0x268
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, 0x20F)
    img[0x211] = 1  # LOADED_HIGH
    struct.pack_into("<I", img, 0x22C, 0x7FFFFFFF)
    struct.pack_into("<H", img, 0x236, 1)  # XLF_KERNEL_64
    struct.pack_into("<I", img, 0x238, 2047)
    struct.pack_into("<I", img, 0x260, init_size)
    return bytes(img)


def image_input(kernel: bytes, cmdline: bytes = b"console=ttyS0", initrd: bytes = b"") -> bytes:
    flags = 6 | (1 if initrd else 0)  # 32 MiB of RAM
    return bytes([flags, len(cmdline)]) + struct.pack("<H", len(initrd)) + cmdline + initrd + kernel


def image_seeds() -> Iterable[tuple[str, bytes]]:
    yield "bzimage", image_input(bzimage())
    yield "bzimage-initrd", image_input(bzimage(setup_sects=0), initrd=b"070701" + bytes(200))
    yield "vmlinux", image_input(elf64(0x1000000))
    yield "pvh64", image_input(elf64(KERNEL, xen_note(KERNEL, 8)), initrd=b"initrd")
    yield "pvh32", image_input(elf32_pvh(KERNEL))


# ---- virtio (virtio_blk, virtio_net, virtio_mmio) ----


class Ring:
    """A split virtqueue laid out in a guest RAM image, filled the way a driver fills it."""

    def __init__(self, ram: bytearray, size: int, desc: int, avail: int, used: int) -> None:
        self.ram, self.size, self.desc, self.avail, self.used = ram, size, desc, avail, used
        self.next_desc = 0
        self.posted = 0

    def shape(self) -> bytes:
        """The queue bytes fz_driver_up reads: log2 size, then the three ring addresses."""
        return bytes([self.size.bit_length() - 1]) + struct.pack(
            "<HHH", self.desc, self.avail, self.used
        )

    def post(self, buffers: list[tuple[int, int, bool]]) -> None:
        """Posts one chain of (gpa, length, device-writable) buffers."""
        head = self.next_desc
        for i, (addr, length, writable) in enumerate(buffers):
            flags = (2 if writable else 0) | (1 if i + 1 < len(buffers) else 0)
            at = self.desc + 16 * self.next_desc
            struct.pack_into("<QIHH", self.ram, at, addr, length, flags, self.next_desc + 1)
            self.next_desc += 1
        struct.pack_into("<H", self.ram, self.avail + 4 + 2 * (self.posted % self.size), head)
        self.posted += 1
        struct.pack_into("<H", self.ram, self.avail + 2, self.posted)


def blk_request(ram: bytearray, at: int, kind: int, sector: int) -> int:
    struct.pack_into("<IIQ", ram, at, kind, 0, sector)
    return at


def virtqueue_seeds() -> Iterable[tuple[str, bytes]]:
    ram = bytearray(0x2000)
    ring = Ring(ram, 8, 0x000, 0x100, 0x200)
    ring.post([(0x400, 16, False), (0x500, 512, True), (0x700, 1, True)])
    ring.post([(0x800, 64, False)])
    ring.post([(0x900, 8, False), (0x908, 8, False), (0xA00, 32, True)])
    layout = struct.pack("<HHBHHHH", 8, 0x000, 0, 0x100, 0x200, 0, 0)
    yield "three-chains", layout + bytes(ram)


def virtio_blk_seeds() -> Iterable[tuple[str, bytes]]:
    for name, flags in (("rw-64k", 4), ("ro-64k", 5), ("partial-sector", 6)):
        ram = bytearray(0x4000)
        ring = Ring(ram, 16, 0x0000, 0x1000, 0x2000)
        ring.post(
            [(blk_request(ram, 0x3000, 0, 1), 16, False), (0x3100, 1024, True), (0x3600, 1, True)]
        )
        ring.post(
            [(blk_request(ram, 0x3010, 1, 2), 16, False), (0x3800, 512, False), (0x3601, 1, True)]
        )
        ring.post([(blk_request(ram, 0x3020, 4, 0), 16, False), (0x3602, 1, True)])
        ring.post(
            [(blk_request(ram, 0x3030, 8, 0), 16, False), (0x3A00, 20, True), (0x3603, 1, True)]
        )
        ring.post([(blk_request(ram, 0x3040, 99, 0), 16, False), (0x3604, 1, True)])
        ring.post(
            [
                (blk_request(ram, 0x3050, 0, 127), 8, False),
                (0x3058, 8, False),
                (0x3B00, 512, True),
                (0x3605, 1, True),
            ]
        )
        yield name, bytes([flags, 0xFF]) + ring.shape() + bytes(ram)


def virtio_net_seeds() -> Iterable[tuple[str, bytes]]:
    ram = bytearray(0x8000)
    rx = Ring(ram, 8, 0x0000, 0x1000, 0x1100)
    tx = Ring(ram, 8, 0x2000, 0x3000, 0x3100)
    for i in range(3):
        rx.post([(0x4000 + 0x800 * i, 12, True), (0x400C + 0x800 * i, 0x700, True)])
    frame = bytes(range(6)) * 2 + b"\x08\x00" + bytes(46)
    ram[0x6000 + 12 : 0x6000 + 12 + len(frame)] = frame
    tx.post([(0x6000, 12, False), (0x600C, len(frame), False)])
    tx.post([(0x6000, 12 + len(frame), False)])
    frames = [frame, frame + bytes(100)]
    host = bytes([len(frames)]) + b"".join(struct.pack("<H", len(f)) + f for f in frames)
    yield "rx-tx", bytes([0xFF]) + rx.shape() + tx.shape() + host + bytes(ram)


def mmio_write(offset: int, value: int, width: int = 4) -> bytes:
    return bytes([1]) + struct.pack("<HBQ", offset, WIDTH[width], value)


def mmio_read(offset: int, width: int = 4) -> bytes:
    return bytes([0]) + struct.pack("<HB", offset, WIDTH[width])


def ram_poke(gpa: int, data: bytes) -> bytes:
    out = b""
    for i in range(0, len(data), 255):
        chunk = data[i : i + 255]
        out += bytes([2]) + struct.pack("<HB", gpa + i, len(chunk)) + chunk
    return out


def virtio_mmio_seeds() -> Iterable[tuple[str, bytes]]:
    for name, net in (("blk", 0), ("net", 1)):
        ram = bytearray(0x400)
        ring = Ring(ram, 4, 0x000, 0x100, 0x200)
        if net:
            ring.post([(0x300, 12, True), (0x30C, 0x40, True)])
        else:
            ring.post(
                [(blk_request(ram, 0x300, 0, 0), 16, False), (0x310, 512, True), (0x3FF, 1, True)]
            )
        ops = bytes([net]) + b"".join(mmio_read(r) for r in (0x0, 0x4, 0x8, 0xC))
        ops += mmio_write(0x70, 0) + mmio_write(0x70, 3)
        ops += mmio_write(0x14, 1) + mmio_read(0x10) + mmio_write(0x24, 1) + mmio_write(0x20, 1)
        ops += mmio_write(0x70, 11) + mmio_read(0x70)
        ops += ram_poke(0, bytes(ram))
        for q in range(1 + net):
            ops += mmio_write(0x30, q) + mmio_read(0x34) + mmio_write(0x38, 4)
            ops += mmio_write(0x80, 0x800 * q) + mmio_write(0x90, 0x100 + 0x800 * q)
            ops += mmio_write(0xA0, 0x200 + 0x800 * q) + mmio_write(0x44, 1)
        ops += mmio_write(0x70, 15) + mmio_write(0x50, 0) + bytes([3])
        if net:
            ops += bytes([5, 60]) + bytes(60) + bytes([3])
        ops += mmio_read(0x60) + mmio_write(0x64, 1) + bytes([4])
        ops += mmio_read(0x100, 1) + mmio_read(0x104, 8) + mmio_read(0xFC)
        ops += mmio_write(0x70, 0) + mmio_read(0x70)
        yield name, ops


# ---- port devices (serial, ports) and the IOAPIC ----


def serial_seeds() -> Iterable[tuple[str, bytes]]:
    def out(port: int, value: int, width: int = 1) -> bytes:
        return bytes([1, port - 0x3F0, WIDTH[width]]) + struct.pack("<Q", value)

    def inp(port: int, width: int = 1) -> bytes:
        return bytes([0, port - 0x3F0, WIDTH[width]])

    probe = out(0x3F9, 0) + out(0x3FB, 0x80) + out(0x3F8, 1) + out(0x3F9, 0) + out(0x3FB, 3)
    probe += out(0x3FA, 0xC7) + out(0x3FC, 0x0B) + inp(0x3FA) + inp(0x3FD) + inp(0x3FE)
    probe += out(0x3FC, 0x1F) + inp(0x3FE) + out(0x3F8, 0x41) + inp(0x3F8) + out(0x3FC, 0x0B)
    probe += out(0x3FF, 0x5A) + inp(0x3FF) + out(0x3F9, 3) + inp(0x3FA)
    probe += b"".join(out(0x3F8, c) for c in b"hello\n") + inp(0x3FA) + inp(0x3FD)
    probe += bytes([2, 10]) + b"root\nls -l" + inp(0x3FA) + inp(0x3F8) + inp(0x3F8, 4)
    probe += bytes([3]) + inp(0x3FD) + out(0x3F8, 0x0A0D, 2) + inp(0x3FC, 8)
    yield "linux-probe", probe


def ports_seeds() -> Iterable[tuple[str, bytes]]:
    data, cmd, sleep, pvpanic, debugexit, pic1, pic2 = range(7)

    def out(dev: int, value: int, width: int = 1, delta: int = 1) -> bytes:
        return bytes([1, dev, delta, WIDTH[width]]) + struct.pack("<Q", value)

    def inp(dev: int, width: int = 1, delta: int = 1) -> bytes:
        return bytes([0, dev, delta, WIDTH[width]])

    kbd = out(cmd, 0xAA) + inp(cmd) + inp(data) + out(cmd, 0x20) + inp(data)
    kbd += out(cmd, 0x60) + out(data, 0x47) + out(cmd, 0xAD) + out(cmd, 0xAE)
    kbd += out(data, 0xFF) + inp(data) + inp(data) + out(data, 0xF2) + inp(data)
    kbd += out(cmd, 0xD2) + out(data, 0x1C) + inp(data) + out(cmd, 0xD0) + inp(data)
    kbd += bytes([2, 6]) + bytes([0x1D, 0x38, 0x53, 0xD3, 0xB8, 0x9D]) + inp(cmd) + inp(data)
    kbd += bytes([3]) + out(cmd, 0xA9) + out(cmd, 0xAB) + out(cmd, 0xC0) + out(cmd, 0xFE)
    yield "i8042", kbd
    misc = inp(pic1, delta=2) + inp(pic2, 2) + out(pic1, 0x11) + out(pic1, 0xFF, delta=2)
    misc += inp(sleep, delta=2) + out(sleep, 1, delta=2) + inp(pvpanic) + out(pvpanic, 1)
    misc += out(debugexit, 0x31, 4) + out(sleep, 0x34)
    yield "acpi-pvpanic-pic", misc


def ioapic_seeds() -> Iterable[tuple[str, bytes]]:
    def regsel(reg: int) -> bytes:
        return bytes([1, 0x00, WIDTH[4]]) + struct.pack("<I", reg)

    def win_write(value: int) -> bytes:
        return bytes([1, 0x10, WIDTH[4]]) + struct.pack("<I", value)

    win_read = bytes([0, 0x10, WIDTH[4]])
    ops = regsel(0) + win_read + regsel(1) + win_read + regsel(2) + win_read
    ops += regsel(0x10 + 2 * 4) + win_write(0x30) + regsel(0x11 + 2 * 4) + win_write(0x01000000)
    ops += regsel(0x10 + 2 * 9) + win_write(0x8031) + regsel(0x10 + 2 * 10) + win_write(0x400)
    ops += bytes([2, 4, 1, 2, 4, 0, 2, 9, 1, 3, 0x31, 2, 9, 0]) + bytes([1, 0x40, 2, 0x31, 0, 0, 0])
    ops += bytes([4, 5, 1, 4, 30, 1, 2, 10, 1, 5]) + regsel(0x10 + 2 * 9) + bytes([0, 0x12, 0])
    yield "program-raise-eoi", ops


# ---- snapshot files (snapshot) ----


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def snap_state(nvcpus: int = 2, kind: int = 1) -> bytes:
    """A state file as native/snapshot_file.c writes it: header, sections with their CRCs."""
    mib = 1 << 20
    slots = struct.pack("<IIQ8s", 2, 0, 2048, b"") + bytes(24 * 7)
    config = struct.pack("<IIQQII", nvcpus, 1, 64 * mib, 64 * mib, 4096, 0) + slots
    sections = [(1, 0, config)]
    sections += [(2, i, bytes(range(64))) for i in range(nvcpus)]
    sections += [(3, 0, bytes(208)), (4, 0, bytes(84)), (5, 0, bytes(28)), (6, 0, b"\0")]
    sections += [(7, 0, struct.pack("<QII", 123456789, 0, 0)), (8, 0, bytes(120))]
    body = b""
    for kind_, instance, payload in sections:
        padded = payload + bytes(-len(payload) % 8)
        crc = crc32c(struct.pack("<IIQII", kind_, instance, len(payload), 0, 0) + padded)
        body += struct.pack("<IIQII", kind_, instance, len(payload), crc, 0) + padded
    size = 72 + len(body)
    head = struct.pack(
        "<QIIIIQ16s16sII",
        0x50414E534C544C46,
        1,
        72,
        kind,
        len(sections),
        size,
        bytes(range(16)),
        bytes(16),
        0,
        0,
    )
    return head[:-4] + struct.pack("<I", crc32c(head)) + body


def snap_trailer(runs: list[tuple[int, int]]) -> bytes:
    """A memory file's trailer: the runs, padding, then its header in the last 72 bytes."""
    raw = b"".join(struct.pack("<QQ", first, count) for first, count in runs)
    kind = 2 if runs else 1
    head = struct.pack(
        "<QII16s16sQQII",
        0x4D454D534C544C46,
        1,
        kind,
        bytes(16),
        bytes(16),
        64 << 20,
        len(runs),
        4096,
        0,
    )
    size = -(-(len(raw) + 72) // 4096) * 4096
    trailer = raw + bytes(size - len(raw) - 72) + head[:-4]
    return trailer + struct.pack("<I", crc32c(trailer))


def snapshot_seeds() -> Iterable[tuple[str, bytes]]:
    yield "state-full", b"\x00" + snap_state()
    yield "state-diff-fixcrc", b"\x02" + snap_state(nvcpus=3, kind=2)
    yield "trailer-full", b"\x01" + snap_trailer([])
    yield "trailer-diff", b"\x01" + snap_trailer([(0, 3), (10, 1), (100, 50)])
    yield "trailer-diff-fixcrc", b"\x03" + snap_trailer([(5, 5)])


# ---- the live-migration stream (migrate) ----

MIG_TOKEN = b"flotilla-fuzz-token-0123456789ab"
MIG_DISK0 = (1 << 20) + 100  # migrate.c's DISK0 and DISK1
MIG_DISK1 = 1 << 20


def mig_record(kind: int, payload: bytes) -> bytes:
    return struct.pack("<IIQ", kind, 0, len(payload)) + payload


def mig_stream(*, debug: bool) -> bytes:
    """A whole migration as the target reads it: hello, config, its disks, pages, blocks of a
    copied disk, the pause, state."""
    mib = 1 << 20
    hello = struct.pack("<QII", 0x5247494D4C544C46, 2, 1 if debug else 0) + MIG_TOKEN
    config = struct.pack("<IIQQII", 1, 0, 64 * mib, 64 * mib, 4096, 0) + bytes(24 * 8)
    page = bytes(range(256)) * 16
    pages = struct.pack("<QII", 3, 2, 0) + (bytes(16) if debug else b"") + page * 2
    # The harness's disks: 0 copied (MIG_DISK0 bytes), 1 shared (MIG_DISK1 bytes).
    disks = struct.pack("<II4Q", 2, 1, MIG_DISK0, MIG_DISK1, 0, 0)
    block = struct.pack("<IIQQ", 0, 0, 65536, 4096) + (bytes(8) if debug else b"") + page
    tail = struct.pack("<IIQQ", 0, 0, MIG_DISK0 // 65536 * 65536, MIG_DISK0 % 65536)
    tail += (bytes(8) if debug else b"") + bytes(MIG_DISK0 % 65536)
    return (
        hello
        + mig_record(1, config)
        + mig_record(10, disks)
        + mig_record(2, pages)
        + mig_record(11, block)
        + mig_record(11, tail)
        + mig_record(3, struct.pack("<QII", 10, 5, 0))
        + mig_record(9, b"")
        + mig_record(4, struct.pack("<Q", 12345))
        + mig_record(5, snap_state(nvcpus=1))
        + mig_record(6, struct.pack("<QQQ4Q", 2, 0, 4096 + MIG_DISK0 % 65536, 0, 0, 0, 0))
        + mig_record(7, b"")
    )


def mig_stream_v1() -> bytes:
    """A version-1 stream (an older release's source): no DISKS or BLOCK, a 16-byte END."""
    hello = struct.pack("<QII", 0x5247494D4C544C46, 1, 0) + MIG_TOKEN
    config = struct.pack("<IIQQII", 1, 0, 64 << 20, 64 << 20, 4096, 0) + bytes(24 * 8)
    pages = struct.pack("<QII", 3, 1, 0) + bytes(range(256)) * 16
    return (
        hello
        + mig_record(1, config)
        + mig_record(2, pages)
        + mig_record(4, struct.pack("<Q", 12345))
        + mig_record(5, snap_state(nvcpus=1))
        + mig_record(6, struct.pack("<QQ", 1, 0))
        + mig_record(7, b"")
    )


def migrate_seeds() -> Iterable[tuple[str, bytes]]:
    yield "stream", b"\x00" + mig_stream(debug=False)
    yield "stream-v1", b"\x00" + mig_stream_v1()
    yield "stream-debug", b"\x00" + mig_stream(debug=True)
    yield (
        "stream-any-token",
        b"\x01" + mig_stream(debug=False)[:16] + bytes(32) + mig_stream(debug=False)[48:],
    )
    replies = mig_record(16, struct.pack("<Q", 5)) + mig_record(20, b"")
    replies += mig_record(17, struct.pack("<QQ", 0, 7)) + mig_record(18, bytes(16))
    yield "replies", b"\x02" + replies + mig_record(19, b"wrong migration token")


TARGETS: dict[str, Callable[[], Iterable[tuple[str, bytes]]]] = {
    "virtqueue": virtqueue_seeds,
    "image": image_seeds,
    "virtio_blk": virtio_blk_seeds,
    "virtio_net": virtio_net_seeds,
    "virtio_mmio": virtio_mmio_seeds,
    "serial": serial_seeds,
    "ports": ports_seeds,
    "ioapic": ioapic_seeds,
    "snapshot": snapshot_seeds,
    "migrate": migrate_seeds,
}


def write_seeds(root: Path) -> None:
    """Writes root/<target>/<name> for every target with seeds."""
    for target, seeds in TARGETS.items():
        folder = root / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in seeds():
            (folder / name).write_bytes(data)


if __name__ == "__main__":
    write_seeds(Path(sys.argv[1]))
