"""Live-migration benchmark (issue 14): our engine (native/migration.py) against QEMU's.

    python bench/migration.py [--rounds N]

The test guest (native/guest, the same PVH file for both VMMs), 256 MiB and one vCPU, runs
`rewrite=32`: it rewrites 32 MiB forever, every word each pass, printing a COUNTER line every
10 ms. Each round, interleaved, ours then QEMU, it migrates from one process to another over
loopback TCP: ours from this process to `python -m native.migration listen`, QEMU to a second
QEMU started with `-incoming tcp:127.0.0.1:PORT` (both with no bandwidth cap: QEMU's
`max-bandwidth` is raised from its 128 MiB/s default so the anchor is not held back):
- at a 300 ms downtime budget (QEMU: `downtime-limit` 300): migration.downtime_ms (ours:
  measured from the source's pause to the target's vCPUs running, one host, one clock;
  QEMU: query-migrate's `downtime`) and migration.total_ms (QEMU: `total-time`);
- at a 50 ms budget (QEMU with the `auto-converge` capability): migration.converge_50ms_s and
  the bytes sent against guest RAM;
- migration.guest_gap_ms: the longest gap between two COUNTER lines as this process reads
  them from both consoles, across the switch (the guest prints every 10 ms);
- migration.reported_vs_measured_ms: ours, |the pause the target reported (timed from the
  PAUSED marker) - the one measured on the shared clock|;
- migration.vmm_downtime_ms: the same guest at a 300 ms budget migrated the way a compute
  node does it, between two KvmDrivers (compute_node/kvm.py: each guest a VMM process, the
  engine on a thread of the source's VMM, the target a VMM waiting with the listener),
  anchored on the direct engine's pause in the same run: what the VMM processes add;
- migration.block_copy_mibps: a live block copy (docs/migration.md, "Block copy"): a 64 MiB
  guest running `counter` with a 256 MiB disk file full of data migrates with the disk copied
  through the stream into another file (the target a `MigrationListener` in this process,
  left paused), the disk's MiB over the whole migration's time, against `cp` of the same file
  then `sync` of the copy (the engine fsyncs its copy too), both from the page cache, in the
  same round. `--only block` runs just this figure.
Human-readable results go to stderr; stdout ends with one JSON object per figure. Needs
/dev/kvm, gcc and qemu-system-x86_64; exits 2 without them. Figures from a loaded host say so.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import native  # noqa: E402
from bench.figures import emit, figure, say  # noqa: E402
from bench.qmp import Qmp  # noqa: E402
from compute_node.boot_sources import BootFiles, HostFile  # noqa: E402
from compute_node.driver import GuestEvent  # noqa: E402
from compute_node.kvm import KvmDriver  # noqa: E402
from native import kvm_unavailable_reason, migration, testguest  # noqa: E402
from protos.domain import BootSpec, DomainSpec  # noqa: E402
from protos.migration import MigrationParams  # noqa: E402
from services.broker import free_port  # noqa: E402

MEMORY_MIB = 256
CMDLINE = "ready rewrite=32"
QEMU = "qemu-system-x86_64"
TIMEOUT = 60.0
QEMU_CONVERGE_TIMEOUT = 40.0
WARM_LINES = 30  # COUNTER lines (and the region written whole) before migrating
LINE = re.compile(rb"COUNTER (\d+)\n")


class Lines:
    """A guest's serial output from an fd: each COUNTER line with the time it was read."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = b""
        self.times: list[float] = []
        self.written = False  # the guest said it wrote its whole region once
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            now = time.monotonic()
            with self._cond:
                self._buf += chunk
                self.written = self.written or b"REWRITE pass=1 done" in self._buf
                for _ in LINE.finditer(self._buf):
                    self.times.append(now)
                self._buf = self._buf[self._buf.rfind(b"\n") + 1 :]
                self._cond.notify_all()

    def wait_lines(self, n: int, *, written: bool = False) -> None:
        """Waits for n COUNTER lines (and, with `written`, the whole region written once)."""
        deadline = time.monotonic() + TIMEOUT
        with self._cond:
            while len(self.times) < n or (written and not self.written):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit("bench/migration: the guest stopped printing")
                self._cond.wait(left)


def longest_gap(*consoles: Lines, start: float, end: float) -> float:
    """The longest time between two COUNTER lines read within [start, end] (ms)."""
    times = sorted(t for c in consoles for t in c.times if start <= t <= end)
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0) * 1e3


# ---- ours ----


def ours_round(guest: Path, budget_ms: float) -> dict[str, float]:
    r, w = os.pipe()
    source_lines = Lines(r)
    tr, tw = os.pipe()
    target_lines = Lines(tr)
    token = migration.new_token()
    target = subprocess.Popen(
        [
            *(sys.executable, "-m", "native.migration", "listen", "--console-fd", str(tw)),
            *("--timeout", str(2 * TIMEOUT)),  # the source's timeout decides
        ],
        cwd=ROOT,
        env={**os.environ, "FLOTILLA_MIGRATION_TOKEN": token},
        stdout=subprocess.PIPE,
        pass_fds=(tw,),
    )
    assert target.stdout is not None
    m = native.Machine(guest, cmdline=CMDLINE, memory_mib=MEMORY_MIB, console_out=w)
    try:
        listening = json.loads(target.stdout.readline())
        m.start()
        source_lines.wait_lines(WARM_LINES, written=True)
        t0 = time.monotonic()
        try:
            result = migration.migrate(
                m,
                ("127.0.0.1", int(listening["port"])),
                token,
                max_downtime_ms=budget_ms,
                timeout=TIMEOUT,
            )
        except migration.MigrationError as exc:
            # Counted, not fatal: the source runs on (exactly one copy), the round goes on.
            say(f"  ours at {budget_ms:g} ms: failed: {exc.message}")
            return {"failed": 1.0, "total_ms": TIMEOUT * 1e3}
        t1 = time.monotonic()
        target_lines.wait_lines(WARM_LINES)
        gap = longest_gap(source_lines, target_lines, start=t0 - 0.3, end=t1 + 0.2)
    finally:
        m.close()
        target.terminate()
        target.wait()
        target.stdout.close()
        for fd in (w, tw):
            os.close(fd)
    return {
        "paused_ms": result.paused_ms,
        "reported_ms": result.downtime_ms,
        "total_ms": result.total_ms,
        "sent": float(result.bytes_sent),
        "iterations": float(result.iterations),
        "throttle": float(result.throttle_pct),
        "gap_ms": gap,
    }


# ---- a live block copy against cp ----

BLOCK_DISK_MIB = 256
# Disk-backed, not tmpfs: the copies are files a host keeps its volumes in.
BLOCK_DIR = os.environ.get("FLOTILLA_BENCH_DIR", "/var/tmp")


def block_round(guest: Path, work: Path) -> dict[str, float]:
    source = work / "block-source.img"
    target = work / "block-target.img"
    copy = work / "block-cp.img"
    with source.open("wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(BLOCK_DISK_MIB):
            f.write(block)
        os.fsync(f.fileno())  # on disk, as a guest's old data is
    with target.open("wb") as f:
        f.truncate(BLOCK_DISK_MIB << 20)
    size = float(BLOCK_DISK_MIB << 20)
    r, w = os.pipe()
    lines = Lines(r)
    token = migration.new_token()
    got: list[object] = []
    m = native.Machine(
        guest,
        cmdline="ready counter",
        memory_mib=64,
        console_out=w,
        disks=[native.Disk(str(source))],
    )
    try:
        with migration.MigrationListener(token) as listener:

            def serve() -> None:
                try:
                    got.append(
                        listener.accept(
                            disks=[native.Disk(str(target))], copy_disks=[0], paused=True
                        )[0]
                    )
                except migration.MigrationError as exc:
                    got.append(exc)

            server = threading.Thread(target=serve, daemon=True)
            server.start()
            m.start()
            lines.wait_lines(3)
            try:
                result = migration.migrate(
                    m, listener.address, token, copy_disks=[0], timeout=TIMEOUT
                )
            except migration.MigrationError as exc:
                say(f"  block copy: failed: {exc.message}")
                return {"failed": 1.0}
            finally:
                server.join(TIMEOUT)
    finally:
        m.close()
        for item in got:
            if isinstance(item, native.Machine):
                item.close()
        os.close(w)
    t0 = time.monotonic()
    subprocess.run(["cp", str(source), str(copy)], check=True)
    subprocess.run(["sync", str(copy)], check=True)
    cp_s = time.monotonic() - t0
    for path in (source, target, copy):
        path.unlink()
    return {
        "mibps": result.disk_bytes / (1 << 20) / (result.total_ms / 1e3),
        "cp_mibps": size / (1 << 20) / cp_s,
        "total_ms": result.total_ms,
        "cp_ms": cp_s * 1e3,
        "paused_ms": result.paused_ms,
        "disk_mib": result.disk_bytes / (1 << 20),
    }


# ---- ours, through two KvmDrivers (a VMM process at each end) ----


def vmm_round(guest: Path, work: Path, budget_ms: float) -> dict[str, float]:
    def sink(_event: GuestEvent) -> None:
        pass

    spec = DomainSpec.model_validate(
        {
            "name": f"bench-{time.monotonic_ns()}",
            "boot": BootSpec(kernel=str(guest), cmdline=CMDLINE),
            "memory_mib": MEMORY_MIB,
            "vcpus": 1,
        }
    )
    source = KvmDriver(work / f"{spec.name}-source")
    target = KvmDriver(work / f"{spec.name}-target")
    files = [
        BootFiles([HostFile("boot.kernel", str(guest), os.open(guest, os.O_RDONLY))])
        for _ in range(2)
    ]
    for driver in (source, target):
        driver.set_event_sink(sink)
    try:
        source.spawn(spec, files[0])
        deadline = time.monotonic() + TIMEOUT
        while True:
            text = source.console(spec.uuid, 1 << 20)[0]
            if b"REWRITE pass=1 done" in text and len(LINE.findall(text)) >= WARM_LINES:
                break
            if time.monotonic() > deadline:
                raise SystemExit("bench/migration: the guest stopped printing")
            time.sleep(0.01)
        incoming = target.prepare_incoming(spec, files[1])
        params = MigrationParams(max_downtime_ms=budget_ms, timeout_s=TIMEOUT)
        outcome = source.migrate_out(spec.uuid, incoming, params, lambda _s: None)
        if not outcome.committed:
            say(f"  vmm at {budget_ms:g} ms: failed: {outcome.error}")
            return {"failed": 1.0}
        return {
            "paused_ms": outcome.paused_ms or float("nan"),
            "reported_ms": outcome.downtime_ms or float("nan"),
            "sent": float(outcome.stats.bytes_sent),
        }
    finally:
        for driver in (source, target):
            with contextlib.suppress(Exception):
                driver.destroy(spec.uuid)
            driver.close()
        for f in files:
            f.close()


# ---- QEMU ----


def qemu(
    guest: Path, qmp: Path, incoming: int | None = None
) -> tuple[subprocess.Popen[bytes], Lines]:
    argv = [
        QEMU,
        *("-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off", "-enable-kvm"),
        *("-cpu", "host,-arch-capabilities", "-m", str(MEMORY_MIB)),
        *("-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio"),
        *("-kernel", str(guest), "-append", CMDLINE),
        *("-qmp", f"unix:{qmp},server=on,wait=off"),
    ]
    if incoming is not None:
        argv += ["-incoming", f"tcp:127.0.0.1:{incoming}"]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    return proc, Lines(proc.stdout.fileno())


def qemu_round(guest: Path, work: Path, budget_ms: float, *, converge: bool) -> dict[str, float]:
    port = free_port()
    src, source_lines = qemu(guest, work / "src.qmp")
    dst, target_lines = qemu(guest, work / "dst.qmp", incoming=port)
    try:
        qs, qd = (
            Qmp(work / "src.qmp", who="bench/migration", timeout=TIMEOUT),
            Qmp(work / "dst.qmp", who="bench/migration", timeout=TIMEOUT),
        )
        source_lines.wait_lines(WARM_LINES, written=True)
        qs.cmd(
            "migrate-set-capabilities",
            capabilities=[{"capability": "auto-converge", "state": converge}],
        )
        qs.cmd(
            "migrate-set-parameters",
            **{"downtime-limit": int(budget_ms), "max-bandwidth": 100 << 30},
        )
        t0 = time.monotonic()
        qs.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        limit = QEMU_CONVERGE_TIMEOUT if converge else TIMEOUT
        while True:
            info = qs.cmd("query-migrate")
            status = info.get("status")
            if status == "completed":
                break
            if status == "failed":
                raise SystemExit(f"bench/migration: QEMU's migration failed: {info}")
            if time.monotonic() - t0 > limit:
                qs.cmd("migrate_cancel")
                return {"timed_out": 1.0, "total_ms": limit * 1e3}
            time.sleep(0.002)
        t1 = time.monotonic()
        target_lines.wait_lines(WARM_LINES)
        ram = info.get("ram", {})
        assert isinstance(ram, dict)
        gap = longest_gap(source_lines, target_lines, start=t0 - 0.3, end=t1 + 0.2)
        qs.close()
        qd.close()
        return {
            "reported_ms": float(str(info.get("downtime", 0))),
            "total_ms": float(str(info.get("total-time", 0))),
            "sent": float(str(ram.get("transferred", 0))),
            "gap_ms": gap,
        }
    finally:
        for proc in (src, dst):
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def med(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r.get(key, float("nan")) for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/migration.py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["block"], help="run one figure only")
    args = parser.parse_args()
    if args.only == "block":
        return block_only(args.rounds)
    if shutil.which(QEMU) is None:
        say(f"bench/migration: {QEMU} is not installed; it is the anchor of this benchmark")
        return 2
    if shutil.which("gcc") is None:
        say("bench/migration: gcc is not installed (it builds the test guest)")
        return 2
    reason = kvm_unavailable_reason()
    if reason is not None:
        say(f"bench/migration: no usable /dev/kvm: {reason}")
        return 2
    guest = testguest.build()
    ours300: list[dict[str, float]] = []
    ours50: list[dict[str, float]] = []
    qemu300: list[dict[str, float]] = []
    qemu50: list[dict[str, float]] = []
    vmm300: list[dict[str, float]] = []
    blocks: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-migration-", dir=BLOCK_DIR) as tmp:
        work = Path(tmp)
        for n in range(args.rounds):
            blocks.append(block_round(guest, work))
            say(f"round {n}: block {blocks[-1]}")
            vmm300.append(vmm_round(guest, work, 300))
            ours300.append(ours_round(guest, 300))
            qemu300.append(qemu_round(guest, work, 300, converge=False))
            ours50.append(ours_round(guest, 50))
            qemu50.append(qemu_round(guest, work, 50, converge=True))
            say(f"round {n}: ours300 {ours300[-1]}\n  qemu300 {qemu300[-1]}")
            say(f"  vmm300 {vmm300[-1]}")
            say(f"  ours50 {ours50[-1]}\n  qemu50 {qemu50[-1]}")
    ram = MEMORY_MIB << 20
    failed300 = sum(1 for r in ours300 if r.get("failed"))
    failed50 = sum(1 for r in ours50 if r.get("failed"))
    failed_vmm = sum(1 for r in vmm300 if r.get("failed"))
    vmm300 = [r for r in vmm300 if not r.get("failed")] or vmm300
    all50 = ours50  # totals count a failed run as the timeout
    ours300 = [r for r in ours300 if not r.get("failed")] or ours300
    ours50 = [r for r in ours50 if not r.get("failed")] or ours50
    q50_done = [r for r in qemu50 if not r.get("timed_out")]
    q50_total = med(qemu50, "total_ms") / 1e3
    q50_sent = med(q50_done, "sent") / ram if q50_done else float("nan")
    note = "loaded host (2 cores shared with other work); medians of interleaved rounds"
    emit(
        [
            figure(
                "migration.downtime_ms",
                med(ours300, "paused_ms"),
                "ms",
                anchor="qemu-7.2-downtime-limit-300",
                anchor_value=med(qemu300, "reported_ms"),
                target="value <= 5 ms",
                reported_ms=round(med(ours300, "reported_ms"), 3),
                failed_runs=failed300,
                note="ours: source pause to target vCPUs running on one clock; QEMU: its "
                "query-migrate downtime; " + note,
            ),
            figure(
                "migration.total_ms",
                med(ours300, "total_ms"),
                "ms",
                anchor="qemu-7.2-downtime-limit-300",
                anchor_value=med(qemu300, "total_ms"),
                target="ratio <= 1",
                sent_mib=round(med(ours300, "sent") / (1 << 20), 1),
                qemu_sent_mib=round(med(qemu300, "sent") / (1 << 20), 1),
                note=note,
            ),
            figure(
                "migration.converge_50ms_s",
                med(all50, "total_ms") / 1e3,
                "s",
                anchor="qemu-7.2-auto-converge-downtime-limit-50",
                anchor_value=q50_total,
                target="value <= 2 s and sent_ram_ratio <= 2",
                sent_ram_ratio=round(med(ours50, "sent") / ram, 3),
                qemu_sent_ram_ratio=round(q50_sent, 3),
                qemu_timed_out=len(qemu50) - len(q50_done),
                failed_runs=failed50,
                paused_ms=round(med(ours50, "paused_ms"), 3),
                throttle_pct=med(ours50, "throttle"),
                note=f"QEMU runs not done in {QEMU_CONVERGE_TIMEOUT:g} s, ours that failed "
                f"(the source ran on), count as {QEMU_CONVERGE_TIMEOUT:g} s and {TIMEOUT:g} s; "
                + note,
            ),
            figure(
                "migration.guest_gap_ms",
                med(ours300, "gap_ms"),
                "ms",
                anchor="qemu-7.2-downtime-limit-300",
                anchor_value=med(qemu300, "gap_ms"),
                target="report",
                gap_50ms_budget=round(med(ours50, "gap_ms"), 3),
                qemu_gap_50ms_budget=round(med(q50_done, "gap_ms"), 3) if q50_done else None,
                note="the guest prints every 10 ms: a gap is at least that; " + note,
            ),
            figure(
                "migration.reported_vs_measured_ms",
                med([{"d": abs(r["paused_ms"] - r["reported_ms"])} for r in ours300 + ours50], "d"),
                "ms",
                anchor="target-1ms",
                anchor_value=1.0,
                target="value <= 1 ms",
                note="ours: the target's pause (from the PAUSED marker) against the source "
                "pause to target resume on the shared clock; " + note,
            ),
            figure(
                "migration.vmm_downtime_ms",
                med(vmm300, "paused_ms"),
                "ms",
                anchor="ours-direct-engine-300",
                anchor_value=med(ours300, "paused_ms"),
                target="report (little over the direct engine's)",
                reported_ms=round(med(vmm300, "reported_ms"), 3),
                sent_mib=round(med(vmm300, "sent") / (1 << 20), 1),
                failed_runs=failed_vmm,
                note="KvmDriver.migrate_out between two KvmDrivers (a VMM process at each "
                "end), source pause to target resume on one clock; " + note,
            ),
            block_figure(blocks, note),
        ]
    )
    return 0


def block_figure(rows: list[dict[str, float]], note: str) -> dict[str, object]:
    done = [r for r in rows if not r.get("failed")] or [{"mibps": float("nan")}]
    return figure(
        "migration.block_copy_mibps",
        med(done, "mibps"),
        "MiB/s",
        anchor="cp-and-sync",
        anchor_value=med(done, "cp_mibps"),
        target="ratio >= 0.5",
        total_ms=round(med(done, "total_ms"), 1),
        cp_ms=round(med(done, "cp_ms"), 1),
        paused_ms=round(med(done, "paused_ms"), 3),
        disk_mib=round(med(done, "disk_mib"), 1),
        failed_runs=sum(1 for r in rows if r.get("failed")),
        load=Path("/proc/loadavg").read_text().split()[0],
        note=f"a {BLOCK_DISK_MIB} MiB disk of data copied live inside the migration (64 MiB "
        "guest), against cp + sync of the same file from the page cache; " + note,
    )


def block_only(rounds: int) -> int:
    reason = kvm_unavailable_reason()
    if reason is not None:
        say(f"bench/migration: no usable /dev/kvm: {reason}")
        return 2
    guest = testguest.build()
    blocks: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-migration-", dir=BLOCK_DIR) as tmp:
        for n in range(rounds):
            blocks.append(block_round(guest, Path(tmp)))
            say(f"round {n}: block {blocks[-1]}")
    note = "loaded host (2 cores shared with other work); medians of interleaved rounds"
    emit([block_figure(blocks, note)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
