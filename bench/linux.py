"""Linux guest benchmark: Debian's cloud kernel on our VMM against QEMU microvm, same files.

    python bench/linux.py [--rounds N] [--no-anchor-offloads] [--initcalls]

A full Linux boot needs hardware virtualization: where the host has no vmx/svm this re-runs
itself in the hwvirt tier's nested L1 (tests/hwvirt/l1.py, QEMU TCG), with the output streamed
here; our VMM and QEMU (`-accel kvm`) then both run inside that one L1, interleaved, on the same
kernel and initramfs. Absolute times under TCG are not hardware times: the ratios are what
count (docs/benchmarks.md).

Each round boots each VMM once, with the disk and the NIC, and runs both workloads in that boot
(a Linux boot costs minutes in the L1):
- linux.boot_to_ready: process start -> `flotilla-bench: READY` (printed by the guest's /init
  once its modules are loaded) for our runtime's own executable (`flotilla-vmm`,
  native/vmm_binary.py, built before the L1 starts) and `qemu-system-x86_64 -M microvm -accel
  kvm`; median of the rounds; also start -> power-off (after the workloads). The same runtime
  behind Python's lean start (`python -S -E -m native.run`, `ours-python`) boots in each round
  too: `linux.boot_to_ready_python`, reported without a target.
- linux.blk_randread_iops: Linux in the guest reading 4 KiB blocks at random offsets, one in
  flight, O_DIRECT, from a virtio-blk disk (ours: virtio-mmio; QEMU: virtio-blk-device).
- linux.net_tcp_mbps: Linux in the guest sending 16 MiB over TCP through virtio-net to a
  receiver on the L1's side of a tap (ours: virtio-mmio; QEMU: virtio-net-device). QEMU's tap
  has a vnet header, so its guest gets checksum and TSO offloads, which ours does not offer;
  `--no-anchor-offloads` runs QEMU without (anchor `qemu-microvm-no-offloads`).
Each READY is also split at the guest kernel's own stamp of it: before the kernel (the VMM's
start, the decompressor) and in it. `--initcalls` measures nothing: one boot per VMM with
`initcall_debug`, and each one's slowest initcalls and boot marks by the kernel's clock.

The guest's /init is the test initramfs (deploy/images/build-initramfs) with an overlay
archive appended: a static workload program (bench/guest/linux_bench.c) and an /init that
reports through /dev/kmsg, so the kernel's polled console carries every marker for both VMMs.
Human-readable results go to stderr; stdout ends with one JSON object per figure. Needs gcc,
qemu-system-x86 and root (taps); exits 2 when something is missing.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.machinery
import importlib.util
import io
import os
import re
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TextIO, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.figures import emit, figure, say  # noqa: E402
from native import vmm_binary  # noqa: E402
from native.images import ImageError, LinuxImages, fetch_images  # noqa: E402
from tests.hwvirt.l1 import L1Error, run_in_l1, runs_directly  # noqa: E402

QEMU = "qemu-system-x86_64"
OURS_PYTHON = "ours-python"
ANCHOR, ANCHOR_NO_OFFLOADS = "qemu-microvm", "qemu-microvm-no-offloads"
MEMORY_MIB = 256
RUN_TIMEOUT = 900.0  # one guest boot with both workloads, emulated in a busy L1
L1_TIMEOUT = 3000.0
RAND_OPS = 1000
DISK_MIB = 64
NET_MIB = 16
TAP = "flbench0"
HOST_ADDR, GUEST_ADDR, PORT = "10.77.0.1", "10.77.0.2", 5001
READY = "flotilla-bench: READY"
SLOWEST = 15  # --initcalls: the slowest initcalls listed per VMM
WORKLOAD_SOURCE = ROOT / "bench" / "guest" / "linux_bench.c"
BUILD_INITRAMFS = ROOT / "deploy" / "images" / "build-initramfs"

# Writes to /dev/kmsg at level 2 reach the console even under `quiet`, through printk's
# polled output, without relying on the guest's tty.
OVERLAY_INIT = f"""#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() {{ echo "<2>flotilla-bench: $*" >/dev/kmsg; }}
for m in $(cat /etc/modules); do
    insmod /lib/modules/$m.ko 2>/dev/null || say "insmod $m failed"
done
say READY
for arg in $(cat /proc/cmdline); do
    case $arg in
    flotilla.bench=randread)
        say "$(/bin/linux_bench randread /dev/vda {RAND_OPS} 2>&1)" ;;
    flotilla.bench=tcp)
        ifconfig eth0 {GUEST_ADDR} netmask 255.255.255.0 up
        say "$(/bin/linux_bench tcpsend {HOST_ADDR} {PORT} {NET_MIB} 2>&1)" ;;
    flotilla.bench=initcalls)
        dmesg | awk '/initcall .* returned .* after/ {{print $(NF-1), $0}}' | sort -n |
            tail -{SLOWEST} | while read -r us line; do say "slow $line"; done
        dmesg | grep -e 'Run /init' -e 'Freeing unused kernel' -e 'smpboot: Total' \
            -e 'tsc: Refined' -e 'Unpacking initramfs' -e 'Trying to unpack' |
            while read -r line; do say "mark $line"; done ;;
    esac
done
poweroff -f
"""


class GuestRunFailed(Exception):
    """One guest run did not produce its figure; the message has the console's tail."""


@dataclass(frozen=True)
class Run:
    ready_s: float
    exit_s: float
    console: str

    @property
    def kernel_ready_s(self) -> float | None:
        """READY by the guest kernel's own clock (its printk stamp): the part of ready_s that
        is Linux's; the rest is the VMM's start and whatever ran before the kernel."""
        m = re.search(rf"^\[\s*(\d+\.\d+)\] {re.escape(READY)}", self.console, re.MULTILINE)
        return float(m.group(1)) if m else None

    @property
    def vcpus_running_s(self) -> float | None:
        """When our VMM's vCPUs began to run, from its start (its summary line; QEMU says
        nothing): the VMM's own part of ready_s; the rest is the guest's (the decompressor,
        then Linux). Unlike the kernel's clock, which in the L1 falls behind the wall clock
        and stands still for up to a second (an earlyprintk boot, docs/benchmarks.md), this
        is the host's clock."""
        m = re.search(r"; vCPUs running (\d+\.\d+) s after the start", self.console)
        return float(m.group(1)) if m else None


def image_builder() -> ModuleType:
    """deploy/images/build-initramfs as a module (its cpio writer), not a second builder."""
    loader = importlib.machinery.SourceFileLoader("build_initramfs", str(BUILD_INITRAMFS))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def bench_initramfs(base: Path, out_dir: Path) -> Path:
    """The test initramfs with the overlay appended (Linux unpacks concatenated archives in
    order, so the overlay's /init replaces the base's)."""
    workload = out_dir / "linux_bench"
    built = subprocess.run(
        ["gcc", "-O2", "-static", "-Wall", "-o", str(workload), str(WORKLOAD_SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode != 0:
        raise SystemExit(f"bench/linux: building linux_bench failed:\n{built.stderr}")
    cpio = image_builder().Cpio()
    cpio.file("init", OVERLAY_INIT.encode(), 0o755)
    cpio.file("bin/linux_bench", workload.read_bytes(), 0o755)
    out = out_dir / "bench-initramfs.cpio.gz"
    out.write_bytes(base.read_bytes() + gzip.compress(cpio.finish(), mtime=0))
    return out


Vmm = Callable[[Path, Path, str, Path | None, bool], list[str]]


def ours(kernel: Path, initrd: Path, cmdline: str, disk: Path | None, tap: bool) -> list[str]:
    """flotilla-vmm: the runtime with no interpreter in front of it (native/vmm_binary.py)."""
    return _our_args([str(vmm_binary.OUTPUT)], kernel, initrd, cmdline, disk, tap=tap)


def ours_python(
    kernel: Path, initrd: Path, cmdline: str, disk: Path | None, tap: bool
) -> list[str]:
    """The same runtime behind Python's lean start (`python -S -E -m native.run`)."""
    argv = [sys.executable, "-S", "-E", "-m", "native.run"]
    return _our_args(argv, kernel, initrd, cmdline, disk, tap=tap)


def _our_args(
    argv: list[str], kernel: Path, initrd: Path, cmdline: str, disk: Path | None, *, tap: bool
) -> list[str]:
    argv = [*argv, "--kernel", str(kernel)]
    argv += ["--initrd", str(initrd), "--memory", str(MEMORY_MIB), "--cmdline", cmdline]
    if disk is not None:
        argv += ["--disk", str(disk)]
    if tap:
        argv += ["--tap", TAP]
    return argv


def qemu(kernel: Path, initrd: Path, cmdline: str, disk: Path | None, tap: bool) -> list[str]:
    return qemu_argv(kernel, initrd, cmdline, disk, tap, offloads=True)


def qemu_no_offloads(
    kernel: Path, initrd: Path, cmdline: str, disk: Path | None, tap: bool
) -> list[str]:
    return qemu_argv(kernel, initrd, cmdline, disk, tap, offloads=False)


def qemu_argv(
    kernel: Path, initrd: Path, cmdline: str, disk: Path | None, tap: bool, *, offloads: bool
) -> list[str]:
    """QEMU microvm; without `offloads` its tap has no vnet header, so its virtio-net offers
    the guest no checksum or segmentation offload (as ours): one frame per packet.

    With its RTC (unlike bench/boot.py's line for the test guest): without one, microvm does
    not tell Linux so, and Linux's rtc_cmos probe of the absent chip took 5.4 s of QEMU's
    boot in the L1, a cost of that option and not of QEMU."""
    argv = [
        QEMU, "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on", "-accel", "kvm",
        "-cpu", "host", "-m", str(MEMORY_MIB), "-smp", "1", "-nodefaults", "-no-user-config",
        "-nographic", "-serial", "stdio", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
    ]  # fmt: skip
    if disk is not None:
        argv += ["-drive", f"file={disk},if=none,id=d0,format=raw"]
        argv += ["-device", "virtio-blk-device,drive=d0"]
    if tap:
        vnet_hdr = "" if offloads else ",vnet_hdr=off"
        argv += ["-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no{vnet_hdr}"]
        argv += ["-device", "virtio-net-device,netdev=n0"]
    return argv


def run_guest(argv: list[str]) -> Run:
    """Starts argv and reads its console until it exits; READY is timed from the start."""
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    out = b""
    ready: float | None = None
    try:
        while True:
            left = started + RUN_TIMEOUT - time.monotonic()
            if left <= 0:
                raise GuestRunFailed(
                    f"{argv[0]} ran {RUN_TIMEOUT:.0f} s; console:\n"
                    f"{out[-3000:].decode(errors='replace')}"
                )
            readable, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
            if not readable:
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
            if ready is None and READY.encode() in out:
                ready = time.monotonic() - started
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    exited = time.monotonic() - started
    console = out.decode(errors="replace")
    if ready is None:
        raise GuestRunFailed(
            f"{argv[0]} exited {proc.returncode} without {READY!r}; console:\n{console[-3000:]}"
        )
    return Run(ready, exited, console)


def parse(pattern: str, console: str, what: str) -> tuple[int, int]:
    m = re.search(pattern, console)
    if not m:
        raise GuestRunFailed(f"no {what} result; console:\n{console[-3000:]}")
    return int(m.group(1)), int(m.group(2))


class Receiver:
    """A TCP sink on the L1's side of the tap: reads to EOF, then acknowledges with a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST_ADDR, PORT))
        self.sock.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                while conn.recv(1 << 20):
                    pass
                conn.sendall(b"k")

    def close(self) -> None:
        self.sock.close()


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class _Progress(io.TextIOBase):
    """The L1's output, live on stderr but for its figure lines: those are relayed to stdout
    at the end, once (so stdout and stderr captured together hold each figure once)."""

    def __init__(self) -> None:
        self._partial = ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if not line.startswith('{"metric"'):
                sys.stderr.write(line + "\n")
        sys.stderr.flush()
        return len(text)


def in_l1(rounds: int, anchor_offloads: bool, initcalls: bool = False) -> int:
    """Re-runs this benchmark in the nested L1 and relays its figures."""
    try:
        vmm_binary.build()  # here, not under the L1's TCG
    except vmm_binary.VmmBuildError as exc:
        say(f"bench/linux: {exc}")
        return 2
    argv = [sys.executable, str(Path(__file__).resolve()), "--rounds", str(rounds)]
    if not anchor_offloads:
        argv.append("--no-anchor-offloads")
    if initcalls:
        argv.append("--initcalls")
    try:
        with tempfile.TemporaryDirectory(prefix="flotilla-hwvirt-") as tmp:
            result = run_in_l1(
                argv, Path(tmp), cwd=ROOT, timeout=L1_TIMEOUT, echo=cast(TextIO, _Progress())
            )
    except L1Error as exc:
        say(f"bench/linux: {exc}")
        return 2
    for line in result.output.splitlines():
        if line.startswith('{"metric"'):
            print(line)
    if result.status is None:
        say(f"bench/linux: the L1 did not finish; console:\n{result.console_tail()}")
        return 1
    return result.status


@dataclass
class Results:
    boot: list[Run] = field(default_factory=list)
    iops: list[float] = field(default_factory=list)
    mbps: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def one_round(vmm: Vmm, kernel: Path, initrd: Path, disk: Path, into: Results) -> str:
    """One boot of one VMM with the disk and the NIC: READY, then the randread and the tcp
    workloads in turn, then power-off (a Linux boot costs minutes in the L1). A run that
    fails is recorded, not fatal."""
    cmdline = "console=ttyS0 panic=-1 quiet flotilla.bench=randread flotilla.bench=tcp"
    try:
        run = run_guest(vmm(kernel, initrd, cmdline, disk, True))
    except GuestRunFailed as exc:
        into.failures.append(f"boot: {exc}")
        return "nothing measured"
    into.boot.append(run)
    in_kernel = "?" if run.kernel_ready_s is None else f"{run.kernel_ready_s:5.2f}"
    vcpus = "" if run.vcpus_running_s is None else f"vCPUs at {run.vcpus_running_s:4.2f} s, "
    done = [f"READY {run.ready_s:6.2f} s ({vcpus}kernel clock {in_kernel} s)"]
    try:
        ops, ns = parse(r"RANDREAD ops=(\d+) ns=(\d+)", run.console, "randread")
        into.iops.append(ops / (ns / 1e9))
        done.append(f"randread {into.iops[-1]:7.0f} IOPS")
    except GuestRunFailed as exc:
        into.failures.append(f"randread: {exc}")
    try:
        sent, ns = parse(r"TCPSEND bytes=(\d+) ns=(\d+)", run.console, "tcpsend")
        into.mbps.append(sent * 8 / 1e6 / (ns / 1e9))
        done.append(f"tcp {into.mbps[-1]:7.0f} Mbit/s")
    except GuestRunFailed as exc:
        into.failures.append(f"tcp: {exc}")
    return "  ".join(done)


def preflight() -> LinuxImages | None:
    """The kernel and initramfs, once root and the tools are there; None (said why) if not."""
    missing = [t for t in (QEMU, "gcc", "ip") if shutil.which(t) is None]
    if missing or os.geteuid() != 0:
        say(f"bench/linux: needs root and {', '.join((QEMU, 'gcc', 'ip'))}; missing: {missing}")
        return None
    try:
        vmm_binary.build()  # done before the L1 already: compiling under TCG takes minutes
    except vmm_binary.VmmBuildError as exc:
        say(f"bench/linux: {exc}")
        return None
    try:
        images = fetch_images(initramfs=True)
    except ImageError as exc:
        say(f"bench/linux: {exc}")
        return None
    assert images.initramfs is not None
    return images


def measure(rounds: int, anchor_offloads: bool) -> int:
    images = preflight()
    if images is None:
        return 2
    assert images.initramfs is not None
    anchor = ANCHOR if anchor_offloads else ANCHOR_NO_OFFLOADS
    vmms: dict[str, Vmm] = {
        "ours": ours,
        anchor: qemu if anchor_offloads else qemu_no_offloads,
        OURS_PYTHON: ours_python,
    }
    results = {name: Results() for name in vmms}
    with tempfile.TemporaryDirectory(prefix="bench-linux-") as tmp:
        out_dir = Path(tmp)
        initrd = bench_initramfs(images.initramfs, out_dir)
        disk = out_dir / "disk.img"
        with disk.open("wb") as f:  # written, not sparse: reads hit data
            for _ in range(DISK_MIB):
                f.write(os.urandom(1 << 20))
        ip("tuntap", "add", "dev", TAP, "mode", "tap")
        receiver: Receiver | None = None
        try:
            ip("addr", "add", f"{HOST_ADDR}/24", "dev", TAP)
            ip("link", "set", TAP, "up")
            receiver = Receiver()
            for n in range(rounds):
                for name, vmm in vmms.items():  # interleaved: load hits both alike
                    line = one_round(vmm, images.vmlinuz, initrd, disk, results[name])
                    say(f"round {n + 1} {name:12s} {line}")
        finally:
            if receiver is not None:
                receiver.close()
            subprocess.run(["ip", "link", "del", TAP], check=False, capture_output=True)
    return report(rounds, results, anchor)


def guest_part(results: Results) -> float | None:
    """The median, over our runs, of READY less the VMM's start: the guest's part (ms)."""
    return median_or_none(
        [(r.ready_s - s) * 1000 for r in results.boot if (s := r.vcpus_running_s) is not None]
    )


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def report(rounds: int, results: dict[str, Results], a: str) -> int:
    """Prints the medians and the figures both VMMs produced; 1 when any run failed."""
    ready = {n: median_or_none([r.ready_s * 1000 for r in res.boot]) for n, res in results.items()}
    off = {n: median_or_none([r.exit_s * 1000 for r in res.boot]) for n, res in results.items()}
    kernel = {
        n: median_or_none([s * 1000 for r in res.boot if (s := r.kernel_ready_s) is not None])
        for n, res in results.items()
    }
    setup = {
        n: median_or_none([s * 1000 for r in res.boot if (s := r.vcpus_running_s) is not None])
        for n, res in results.items()
    }
    iops = {n: median_or_none(res.iops) for n, res in results.items()}
    mbps = {n: median_or_none(res.mbps) for n, res in results.items()}
    say(f"medians of {rounds} rounds, in one L1 (TCG: not hardware times; compare the ratios)")
    for name, res in results.items():
        say(
            f"  {name:12s} READY {fmt(ready[name])} ms (vCPUs at {fmt(setup[name])} ms, "
            f"kernel clock {fmt(kernel[name])} ms)  "
            f"power-off {fmt(off[name])} ms  "
            f"randread {fmt(iops[name])} IOPS  tcp {fmt(mbps[name])} Mbit/s"
        )
        for failure in res.failures:
            say(f"  {name} failed: {failure}")
    figures = []
    for metric, values, unit, target in (
        ("linux.boot_to_ready", ready, "ms", "ratio <= 0.6"),
        ("linux.blk_randread_iops", iops, "IOPS", "ratio >= 1.0"),
        ("linux.net_tcp_mbps", mbps, "Mbit/s", "ratio >= 1.0"),
    ):
        ours_value, anchor_value = values["ours"], values[a]
        if ours_value is None or anchor_value is None:
            say(f"  {metric}: not reported (a VMM produced no value)")
            continue
        extra: dict[str, object] = {}
        ours_off, anchor_off = off["ours"], off[a]
        if metric == "linux.boot_to_ready" and ours_off is not None and anchor_off is not None:
            extra = {"poweroff_ms": round(ours_off), "anchor_poweroff_ms": round(anchor_off)}
        guest = guest_part(results["ours"])
        if metric == "linux.boot_to_ready" and guest is not None and anchor_value is not None:
            # The VMM's start apart from the guest's boot: what ratio a VMM that cost
            # nothing to start would get with this kernel and command line in this L1.
            extra |= {
                "vmm_start_ms": None if setup["ours"] is None else round(setup["ours"], 1),
                "guest_ms": round(guest, 1),
                "zero_start_ratio": round(guest / anchor_value, 4),
            }
        figures.append(
            figure(
                metric,
                ours_value,
                unit,
                anchor=a,
                anchor_value=anchor_value,
                target=target,
                **extra,
            )
        )
    python, anchor_ready = ready.get(OURS_PYTHON), ready[a]
    if python is not None and anchor_ready is not None:
        # The same runtime behind the interpreter's start: reported, no target.
        figures.append(
            figure(
                "linux.boot_to_ready_python",
                python,
                "ms",
                anchor=a,
                anchor_value=anchor_ready,
                target="report",
            )
        )
    emit(figures)
    return 1 if any(res.failures for res in results.values()) else 0


def initcalls() -> int:
    """One boot per VMM with `initcall_debug`: the slowest initcalls and the boot's marks,
    by the guest kernel's clock, to say where one VMM's boot spends time the other's does
    not. No figures."""
    images = preflight()
    if images is None:
        return 2
    assert images.initramfs is not None
    cmdline = "console=ttyS0 panic=-1 quiet initcall_debug flotilla.bench=initcalls"
    with tempfile.TemporaryDirectory(prefix="bench-linux-") as tmp:
        initrd = bench_initramfs(images.initramfs, Path(tmp))
        for name, vmm in (("ours", ours), (ANCHOR, qemu)):
            run = run_guest(vmm(images.vmlinuz, initrd, cmdline, None, False))
            in_kernel = "?" if run.kernel_ready_s is None else f"{run.kernel_ready_s:.2f}"
            say(f"{name}: READY {run.ready_s:.2f} s (in the kernel {in_kernel} s)")
            for line in run.console.splitlines():
                if "flotilla-bench: slow " in line or "flotilla-bench: mark " in line:
                    say(f"  {name}: {line.split('flotilla-bench: ', 1)[1]}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--anchor-offloads",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="QEMU's tap with a vnet header, so its virtio-net offers checksum and TSO "
        f"offloads (default); without: anchor {ANCHOR_NO_OFFLOADS}, one frame per packet as ours",
    )
    parser.add_argument(
        "--initcalls",
        action="store_true",
        help="no figures: one boot per VMM with initcall_debug, its slowest initcalls listed",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not runs_directly():
        return in_l1(args.rounds, args.anchor_offloads, args.initcalls)
    if args.initcalls:
        return initcalls()
    return measure(args.rounds, args.anchor_offloads)


if __name__ == "__main__":
    sys.exit(main())
