"""Virtio benchmark (issue 4): the test guest's virtio-blk and virtio-net against the host.

    python bench/virtio.py

- virtio.blk_randread_iops: 4 KiB random reads, 16 in flight, from the test guest
  (`blkbench=randread,N`) against a 64 MiB file on tmpfs; floor: one host thread doing 4 KiB
  preads at random offsets of the same file (bench/floor/virtio_floor.c, fio's psync shape).
- virtio.blk_seq_mbps: 128 KiB sequential reads, 4 in flight (`blkbench=seqread,MiB`);
  floor: 128 KiB preads front to back (dd bs=128k's shape).
- virtio.net_udp_pps: guest -> host UDP datagrams (64-byte payload) through a tap on a bridge
  in a private network namespace (`netbench=`); floor: a host process writing the same frame
  to the same tap fd. Skipped without root.

ratio = guest / host floor (higher is better; no target yet). Runs are interleaved, medians
of ROUNDS. Human-readable results and the exits per I/O go to stderr; stdout ends with one
JSON object per figure. Needs /dev/kvm and gcc.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import native  # noqa: E402
from bench.figures import emit, figure, say  # noqa: E402
from native.testguest import build  # noqa: E402

ROUNDS = 3
RAND_OPS = 50_000
SEQ_MIB = 256
NET_PACKETS = 50_000
IMAGE_MIB = 64


def result(
    metric: str, value: float, unit: str, floor: float, extra: dict[str, object]
) -> dict[str, object]:
    return figure(
        metric, value, unit, anchor="host-floor", anchor_value=floor, target="none yet", **extra
    )


def run_guest(guest: Path, cmdline: str, **devices: object) -> tuple[str, native.Machine]:
    out_r, out_w = os.pipe()
    machine = native.Machine(guest, cmdline=cmdline, memory_mib=64, console_out=out_w, **devices)  # type: ignore[arg-type]
    machine.start()
    event = machine.wait_event(120)
    machine.stop()
    os.close(out_w)
    chunks = []
    while chunk := os.read(out_r, 65536):
        chunks.append(chunk)
    os.close(out_r)
    text = b"".join(chunks).decode(errors="replace")
    if event is None or event.kind is not native.EventKind.POWEROFF:
        raise RuntimeError(f"guest did not power off ({event}):\n{text}")
    return text, machine


def floor(binary: Path, *args: str, pass_fds: tuple[int, ...] = ()) -> tuple[int, int]:
    out = subprocess.run(
        [str(binary), *args], check=True, capture_output=True, text=True, pass_fds=pass_fds
    )
    ops, ns = out.stdout.split()
    return int(ops), int(ns)


def bench_blk(guest: Path, floor_bin: Path) -> list[dict[str, object]]:
    image = Path("/dev/shm") / f"flotilla-bench-{uuid.uuid4().hex[:8]}.img"
    image.write_bytes(os.urandom(IMAGE_MIB << 20))
    iops: dict[str, list[float]] = {"guest": [], "floor": []}
    mbps: dict[str, list[float]] = {"guest": [], "floor": []}
    exits_per_io = []
    try:
        for _ in range(ROUNDS):
            text, machine = run_guest(
                guest,
                f"blkbench=randread,{RAND_OPS} blkbench=seqread,{SEQ_MIB} poweroff",
                disks=[native.Disk(str(image), read_only=True)],
            )
            exits = machine.counters().exits["total"]
            dev = machine.virtio_devices()[0]
            machine.close()
            rand = re.search(
                r"BLKBENCH randread ops=(\d+) bytes=\d+ depth=\d+ errors=0 ns=(\d+)", text
            )
            seq = re.search(
                r"BLKBENCH seqread ops=(\d+) bytes=(\d+) depth=\d+ errors=0 ns=(\d+)", text
            )
            if not rand or not seq:
                raise RuntimeError(f"no BLKBENCH lines:\n{text}")
            iops["guest"].append(int(rand[1]) / int(rand[2]) * 1e9)
            mbps["guest"].append(int(seq[2]) / int(seq[3]) * 1e3)
            exits_per_io.append((exits, dev.interrupts, int(rand[1]) + int(seq[1])))
            ops, ns = floor(floor_bin, "randread", str(image), str(RAND_OPS))
            iops["floor"].append(ops / ns * 1e9)
            ops, ns = floor(floor_bin, "seqread", str(image), str(SEQ_MIB))
            mbps["floor"].append(ops * 128 * 1024 / ns * 1e3)
    finally:
        image.unlink()
    exits, irqs, ios = exits_per_io[-1]
    per_io: dict[str, object] = {
        "vmm_exits_per_io": round(exits / ios, 3),
        "interrupts_per_io": round(irqs / ios, 3),
    }
    g, f = statistics.median(iops["guest"]), statistics.median(iops["floor"])
    say(f"blk randread: guest {g:,.0f} IOPS (16 in flight), host pread {f:,.0f} IOPS, {per_io}")
    gs, fs = statistics.median(mbps["guest"]), statistics.median(mbps["floor"])
    say(f"blk seqread: guest {gs:,.0f} MB/s, host pread {fs:,.0f} MB/s")
    return [
        result("virtio.blk_randread_iops", g, "IOPS", f, per_io),
        result("virtio.blk_seq_mbps", gs, "MB/s", fs, {}),
    ]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def bench_net(guest: Path, floor_bin: Path) -> list[dict[str, object]]:
    tag = uuid.uuid4().hex[:8]
    ns, tap, subnet = f"fltb-{tag}", f"fltb{tag[:6]}", "10.251.7"
    fd = -1
    pps: dict[str, list[float]] = {"guest": [], "floor": []}
    ip("netns", "add", ns)
    try:
        ip("tuntap", "add", "name", tap, "mode", "tap")
        fd = native.open_tap(tap)
        ip("link", "set", tap, "netns", ns)
        for cmd in (
            ["link", "add", "br0", "type", "bridge"],
            ["addr", "add", f"{subnet}.1/24", "dev", "br0"],
            ["link", "set", "br0", "up"],
            ["link", "set", tap, "master", "br0"],
            ["link", "set", tap, "up"],
        ):
            ip("-n", ns, *cmd)
        br_mac = bytes.fromhex(
            subprocess.run(
                ["ip", "netns", "exec", ns, "cat", "/sys/class/net/br0/address"],
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .replace(":", "")
        )
        mac = "52:54:00:bb:00:02"
        frame = udp_frame(br_mac, bytes.fromhex(mac.replace(":", "")), f"{subnet}.2", f"{subnet}.1")
        for _ in range(ROUNDS):
            text, machine = run_guest(
                guest,
                f"net={subnet}.2 netbench={subnet}.1:9,{NET_PACKETS} poweroff",
                nics=[native.Nic(fd, mac)],
            )
            machine.close()
            m = re.search(r"NETBENCH packets=(\d+) bytes=\d+ ns=(\d+)", text)
            if not m:
                raise RuntimeError(f"no NETBENCH line:\n{text}")
            pps["guest"].append(int(m[1]) / int(m[2]) * 1e9)
            os.set_blocking(fd, True)
            ops, took = floor(
                floor_bin, "tapwrite", str(fd), frame.hex(), str(NET_PACKETS), pass_fds=(fd,)
            )
            pps["floor"].append(ops / took * 1e9)
            time.sleep(0.2)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", tap], check=False, capture_output=True)
        if fd >= 0:
            os.close(fd)
    g, f = statistics.median(pps["guest"]), statistics.median(pps["floor"])
    say(f"net udp: guest {g:,.0f} packets/s, host tap writes {f:,.0f} packets/s")
    return [result("virtio.net_udp_pps", g, "packets/s", f, {})]


def udp_frame(dst: bytes, src: bytes, src_ip: str, dst_ip: str) -> bytes:
    """The guest's netbench frame: UDP 40000 -> 9 with 64 bytes of 'x', no UDP checksum."""
    payload = b"x" * 64
    udp = (
        (40000).to_bytes(2, "big") + (9).to_bytes(2, "big") + (8 + len(payload)).to_bytes(2, "big")
    )
    udp += bytes(2) + payload
    hdr = bytearray(20)
    hdr[0], hdr[8], hdr[9] = 0x45, 64, 17
    hdr[2:4] = (20 + len(udp)).to_bytes(2, "big")
    hdr[12:16] = bytes(int(o) for o in src_ip.split("."))
    hdr[16:20] = bytes(int(o) for o in dst_ip.split("."))
    s = sum(int.from_bytes(hdr[i : i + 2], "big") for i in range(0, 20, 2))
    s = (s & 0xFFFF) + (s >> 16)
    hdr[10:12] = (~((s & 0xFFFF) + (s >> 16)) & 0xFFFF).to_bytes(2, "big")
    return dst + src + b"\x08\x00" + bytes(hdr) + udp


def main() -> int:
    reason = native.kvm_unavailable_reason()
    if reason is not None:
        say(f"bench/virtio: KVM unavailable: {reason}. Nothing was measured.")
        return 2
    guest = build()
    with tempfile.TemporaryDirectory() as tmp:
        floor_bin = Path(tmp) / "virtio_floor"
        subprocess.run(
            ["gcc", "-O2", "-o", str(floor_bin), str(ROOT / "bench" / "floor" / "virtio_floor.c")],
            check=True,
        )
        figures = bench_blk(guest, floor_bin)
        if os.geteuid() == 0:
            figures += bench_net(guest, floor_bin)
        else:
            say("net: skipped (needs root for a private network namespace)")
    emit(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
