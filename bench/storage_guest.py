"""storage.guest_randread_iops: 4 KiB random reads from the test guest on a volume, our VMM
against QEMU microvm, the same guest ELF on the same file (bench/storage.py runs it).

The volume is a raw file in a pool (`VolumeStore.create`, then 64 MiB of random data), opened
once the way the compute node opens it and handed to our virtio-blk as `/proc/self/fd/N`
(read-only: both sides read the same bytes and nothing changes between rounds). The guest runs
`blkbench=randread,N` (16 requests in flight, completions polled, then interrupts) and
reports the time it measured itself, so both VMMs are timed alike, from the first request to
the last completion. QEMU drives the same virtio-mmio transport: microvm with
`-global virtio-mmio.force-legacy=false` (virtio 1.x, which the guest requires) and the
device's window and pin on the guest's command line (microvm's last transport, 0xfeb00e00,
IOAPIC pin 23 with `ioapic2=off`). QEMU runs twice a round: with the device on an iothread
of its own (its faster setup, the anchor) and with its defaults (the main loop). All read
through the host page cache (QEMU's default `cache=writeback`, our preadv on a file opened
without O_DIRECT), warmed before timing. Rounds alternate ours / QEMU; medians are reported.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import native
from compute_node.storage import Pool, VolumeStore
from native.testguest import build

QEMU = "qemu-system-x86_64"
ROUNDS = 5
OPS = 20_000
VOLUME_MIB = 64
MEMORY_MIB = 64
QEMU_DEVICE = "virtio_mmio.device=512@0xfeb00e00:23"
QEMU_IOTHREAD = "qemu-microvm (iothread)"
QEMU_DEFAULT = "qemu-microvm (defaults)"
_RESULT = re.compile(r"BLKBENCH randread ops=(\d+) bytes=\d+ depth=(\d+) errors=(\d+) ns=(\d+)")


def unavailable() -> str | None:
    """Why this figure cannot be measured here, or None."""
    reason = native.kvm_unavailable_reason()
    if reason is not None:
        return f"KVM unavailable: {reason}"
    if shutil.which(QEMU) is None:
        return f"{QEMU} is missing (apt-get install -y qemu-system-x86)"
    return None


def _iops(text: str, who: str) -> float:
    found = _RESULT.search(text)
    if found is None or int(found[3]) != 0:
        raise RuntimeError(f"{who}: no clean BLKBENCH line in:\n{text[-2000:]}")
    return int(found[1]) / int(found[4]) * 1e9


def ours(guest: Path, fd: int, cmdline: str) -> float:
    out_r, out_w = os.pipe()
    try:
        machine = native.Machine(
            guest,
            cmdline=cmdline,
            memory_mib=MEMORY_MIB,
            console_out=out_w,
            disks=[native.Disk(f"/proc/self/fd/{fd}", read_only=True)],
        )
        with machine:
            machine.start()
            event = machine.wait_event(120)
            machine.stop()
        os.close(out_w)
        out_w = -1
        chunks = []
        while chunk := os.read(out_r, 65536):
            chunks.append(chunk)
    finally:
        os.close(out_r)
        if out_w >= 0:
            os.close(out_w)
    text = b"".join(chunks).decode(errors="replace")
    if event is None or event.kind is not native.EventKind.POWEROFF:
        raise RuntimeError(f"ours: the guest did not power off ({event}):\n{text[-2000:]}")
    return _iops(text, "ours")


def qemu(guest: Path, volume: Path, cmdline: str, *, iothread: bool) -> float:
    """QEMU's virtio-blk-device on `volume`; `iothread`: the queue served by an iothread of
    its own (QEMU's faster setup) rather than the main loop (its default)."""
    own = ["-object", "iothread,id=io0"] if iothread else []
    argv = [
        QEMU,
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,rtc=off,ioapic2=off",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        str(MEMORY_MIB),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=4",
        "-global",
        "virtio-mmio.force-legacy=false",
        *own,
        "-drive",
        f"file={volume},format=raw,if=none,id=d0,readonly=on",
        "-device",
        "virtio-blk-device,drive=d0" + (",iothread=io0" if iothread else ""),
        "-kernel",
        str(guest),
        "-append",
        f"{QEMU_DEVICE} {cmdline}",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    return _iops(out.stdout, "qemu-microvm")


def measure(say: Callable[[str], None]) -> dict[str, list[float]]:
    """Interleaved rounds; `say` prints progress. Raises RuntimeError on a failed run."""
    guest = Path(build())
    cmdline = f"blkbench=randread,{OPS} poweroff"
    results: dict[str, list[float]] = {"ours": [], QEMU_IOTHREAD: [], QEMU_DEFAULT: []}
    with tempfile.TemporaryDirectory(prefix="flotilla-bench-") as tmp:
        pool = Pool(tmp)
        store = VolumeStore(pool)
        name = str(uuid.uuid4())
        store.create(name, VOLUME_MIB << 20)
        path = pool.volume_path(name)
        with path.open("r+b") as f:
            for _ in range(VOLUME_MIB):
                f.write(os.urandom(1 << 20))
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            path.read_bytes()  # the page cache holds the volume for both
            ours(guest, fd, "blkbench=randread,2000 poweroff")  # warm-up
            qemu(guest, path, "blkbench=randread,2000 poweroff", iothread=True)
            for i in range(ROUNDS):
                results["ours"].append(ours(guest, fd, cmdline))
                results[QEMU_IOTHREAD].append(qemu(guest, path, cmdline, iothread=True))
                results[QEMU_DEFAULT].append(qemu(guest, path, cmdline, iothread=False))
                say(
                    f"  round {i + 1}: "
                    + ", ".join(f"{k} {v[-1]:,.0f} IOPS" for k, v in results.items())
                )
        finally:
            os.close(fd)
    return results
