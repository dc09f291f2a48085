"""Snapshot benchmark (issue 13): our save/restore against QEMU's migration to a file.

    python bench/snapshot.py

The test guest (native/guest, the same PVH file for both VMMs), 256 MiB and 2 vCPUs, runs
`memtest=32` (32 MiB written), sleeps, runs `memtest=32` again (32 MiB more) and counts.
Each round, interleaved, ours then QEMU:
- snapshot.full_ms: pause after the first memtest, then a full snapshot (`Machine.save`:
  state file and sparse memory file, fsync'd and renamed) against QEMU's `stop` + `migrate
  "exec:cat > FILE"` to completion at the same point;
- snapshot.diff_ms: after the second memtest, while the guest counts, a live diff snapshot
  (the pages written since the full one, `Machine.save(diff=True, live=True)`): the time
  the guest is held paused, for the last pass and the state; its pages are written while
  it runs, the fsync after it runs again. The same save's call to its fsync'd files
  (written_ms) and, in the other rounds, the diff saved with the machine paused throughout
  (paused_save_ms) go beside it. Against the same QEMU figure (QEMU has no diff snapshot to
  a file);
- snapshot.restore_p50: snapshot file (taken while counting) to guest running again
  (`Machine.restore` + `start`, in the benchmark's process) against QEMU started with
  `-incoming "exec:cat FILE"` until its guest prints again (loaded, then `cont`: the source
  was stopped to migrate); Firecracker's published restore (< 8 ms, p90 5 ms, 2 vCPUs /
  512 MiB) as a note. snapshot.restore_process_p50 times both as whole processes
  (`python -S -E -m native.run --restore DIR` to its guest's first line).
- snapshot.api_restore_to_event_p50: `POST /v1/domains/{id}/restore` to an outside pika
  subscriber's `domain.started` (restored) on a real stack (bench/snapshot_api.py), against
  the same stack's `resume` action to `domain.resumed` in the same rounds; needs
  rabbitmq-server (skipped, and said so, without it).
Snapshots go to tmpfs (/dev/shm) for both VMMs; ours is also timed on the disk (TMPDIR),
where fsync costs what the disk costs. A floor, one pwrite of 32 MiB to a new tmpfs file, is
timed in each round too: on a loaded host it, not the VMM, sets full_ms and a diff saved
paused.
Human-readable results go to stderr; stdout ends with one JSON object per figure. Needs
/dev/kvm, gcc and qemu-system-x86_64; exits 2 without them.
"""

from __future__ import annotations

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
from bench import snapshot_api  # noqa: E402
from bench.figures import emit, figure, say  # noqa: E402
from bench.qmp import Qmp  # noqa: E402
from native import kvm_unavailable_reason, testguest  # noqa: E402
from services.broker import available as broker_available  # noqa: E402

ROUNDS = 6  # even rounds take the diff live, odd ones paused
RESTORES = 4  # restores of each round's snapshot (the file warm in the page cache)
MEMORY_MIB = 256
VCPUS = 2
CMDLINE = "ready memtest=32 sleep=300 memtest=32 counter"
QEMU = "qemu-system-x86_64"
FIRECRACKER_RESTORE_MS = 8.0
TIMEOUT = 30.0


class Console:
    """A guest's serial output from an fd, collected on a thread."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            with self._cond:
                self._buf += chunk
                self._cond.notify_all()

    def wait_for(self, pattern: str, start: int = 0) -> int:
        """Waits for pattern after byte `start`; returns the end of the match."""
        rx = re.compile(pattern.encode())
        deadline = time.monotonic() + TIMEOUT
        with self._cond:
            while True:
                m = rx.search(self._buf, start)
                if m:
                    return m.end()
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = self._buf[-600:].decode(errors="replace")
                    raise SystemExit(f"bench/snapshot: no {pattern!r}; console:\n{tail}")
                self._cond.wait(left)

    def __len__(self) -> int:
        with self._cond:
            return len(self._buf)


def qemu_argv(guest: Path, qmp: Path, incoming: Path | None = None) -> list[str]:
    argv = [
        QEMU,
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,rtc=off",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        str(MEMORY_MIB),
        "-smp",
        str(VCPUS),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-kernel",
        str(guest),
        "-append",
        CMDLINE,
        "-qmp",
        f"unix:{qmp},server=on,wait=off",
    ]
    if incoming is not None:
        argv += ["-incoming", f"exec:cat {incoming}"]
    return argv


def spawn(argv: list[str]) -> tuple[subprocess.Popen[bytes], Console]:
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    return proc, Console(proc.stdout.fileno())


def end(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()
    for f in (proc.stdout, proc.stderr):
        if f is not None:
            f.close()


# ---- ours ----


def ours_round(guest: Path, shm: Path, disk: Path, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {
        "full": [],
        "diff": [],
        "diff_written": [],
        "diff_paused": [],
        "full_disk": [],
        "restore": [],
    }
    r, w = os.pipe()
    console = Console(r)
    m = native.Machine(guest, cmdline=CMDLINE, memory_mib=MEMORY_MIB, vcpus=VCPUS, console_out=w)
    try:
        m.start()
        at = console.wait_for(r"MEMTEST mib=32 base")
        m.pause()
        t = time.perf_counter()
        stats = m.save(shm / f"full{n}")
        out["full"].append((time.perf_counter() - t) * 1e3)
        say(f"  ours full: {stats.memory_pages * 4 // 1024} MiB in {stats.memory_runs} runs")
        t = time.perf_counter()
        m.save(disk / f"full{n}")  # the same state again, to the disk (its own diff base)
        out["full_disk"].append((time.perf_counter() - t) * 1e3)
        m.resume()
        at = console.wait_for(r"MEMTEST mib=32 base", at)
        console.wait_for(r"COUNTER 1\b", at)
        if n % 2 == 0:  # live, the guest counting on: its pause, and the call to the fsync
            t = time.perf_counter()
            stats = m.save(shm / f"diff{n}", diff=True, live=True)
            out["diff_written"].append((time.perf_counter() - t) * 1e3)
            out["diff"].append(stats.paused_ms)
            m.pause()
        else:  # the machine paused around the whole save
            m.pause()
            t = time.perf_counter()
            stats = m.save(shm / f"diff{n}", diff=True)
            out["diff_paused"].append((time.perf_counter() - t) * 1e3)
        say(
            f"  ours diff: {stats.memory_pages * 4 // 1024} MiB in {stats.memory_runs} runs, "
            f"passes while running {stats.passes}, pages written paused {stats.pages_paused}, "
            f"paused {stats.paused_ms:.2f} ms"
        )
        m.save(shm / f"count{n}")  # while counting: what the restores start from
    finally:
        m.close()
        os.close(w)
    for _ in range(RESTORES):
        r2, w2 = os.pipe()
        c2 = Console(r2)
        t = time.perf_counter()
        m2 = native.Machine.restore(shm / f"count{n}", console_out=w2)
        m2.start()
        out["restore"].append((time.perf_counter() - t) * 1e3)
        c2.wait_for(r"COUNTER \d+")  # it runs on
        m2.close()
        os.close(w2)
    return out


def write_floor(directory: Path, data: bytes) -> float:
    """The least a save of these pages can cost here: one pwrite of as many bytes to a new
    file on the same file system (no scan, no state, no fsync)."""
    path = directory / "floor"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    t = time.perf_counter()
    os.pwrite(fd, data, 0)
    ms = (time.perf_counter() - t) * 1e3
    os.close(fd)
    path.unlink()
    return ms


def ours_process_restore(snap: Path) -> float:
    argv = [sys.executable, "-S", "-E", "-m", "native.run", "--restore", str(snap)]
    t = time.perf_counter()
    proc, console = spawn(argv)
    console.wait_for(r"flotilla-guest: \w")
    ms = (time.perf_counter() - t) * 1e3
    end(proc)
    return ms


# ---- QEMU ----


def qemu_round(guest: Path, shm: Path, n: int) -> dict[str, float]:
    qmp_path = shm / f"qmp{n}"
    proc, console = spawn(qemu_argv(guest, qmp_path))
    try:
        qmp = Qmp(qmp_path, who="bench/snapshot", timeout=TIMEOUT)

        def migrate(file: Path) -> float:
            t = time.perf_counter()
            qmp.cmd("stop")
            qmp.cmd("migrate", uri=f"exec:cat > {file}")
            while (status := qmp.cmd("query-migrate").get("status")) not in ("completed",):
                if status == "failed":
                    raise SystemExit("bench/snapshot: QEMU's migration failed")
                time.sleep(0.0005)
            return (time.perf_counter() - t) * 1e3

        at = console.wait_for(r"MEMTEST mib=32 base")
        full = migrate(shm / f"qemu-full{n}.mig")
        qmp.cmd("cont")
        at = console.wait_for(r"MEMTEST mib=32 base", at)
        console.wait_for(r"COUNTER 1\b", at)
        migrate(shm / f"qemu{n}.mig")  # while counting: what the restores start from
        qmp.close()
    finally:
        end(proc)
    return {"full": full}


def qemu_restore(guest: Path, shm: Path, n: int) -> float:
    qmp_path = shm / f"qmp-in{n}"
    t = time.perf_counter()
    proc, console = spawn(qemu_argv(guest, qmp_path, shm / f"qemu{n}.mig"))
    try:
        qmp = Qmp(qmp_path, who="bench/snapshot", timeout=TIMEOUT)
        # The source was stopped for the migration, so the target loads it and stays paused.
        while qmp.cmd("query-status").get("status") == "inmigrate":
            time.sleep(0.0005)
        qmp.cmd("cont")
        qmp.close()
        console.wait_for(r"flotilla-guest: \w")
        ms = (time.perf_counter() - t) * 1e3
    finally:
        end(proc)
    return ms


def main() -> int:
    if shutil.which(QEMU) is None:
        say(f"bench/snapshot: {QEMU} is not installed; it is the anchor of this benchmark")
        return 2
    if shutil.which("gcc") is None:
        say("bench/snapshot: gcc is not installed (it builds the test guest)")
        return 2
    reason = kvm_unavailable_reason()
    if reason is not None:
        say(f"bench/snapshot: no usable /dev/kvm: {reason}")
        return 2
    guest = testguest.build()
    shm_root = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    ours: dict[str, list[float]] = {}
    qemu: dict[str, list[float]] = {"full": [], "restore": []}
    process: list[float] = []
    floor: list[float] = []
    floor_data = os.urandom(1 << 20) * 32  # the pages a memtest=32 wrote
    with (
        tempfile.TemporaryDirectory(prefix="bench-snapshot-", dir=shm_root) as shm_dir,
        tempfile.TemporaryDirectory(prefix="bench-snapshot-") as disk_dir,
    ):
        shm, disk = Path(shm_dir), Path(disk_dir)
        for n in range(ROUNDS):
            for key, values in ours_round(guest, shm, disk, n).items():
                ours.setdefault(key, []).extend(values)
            qemu["full"].append(qemu_round(guest, shm, n)["full"])
            floor.append(write_floor(shm, floor_data))
            for _ in range(RESTORES):
                process.append(ours_process_restore(shm / f"count{n}"))
                qemu["restore"].append(qemu_restore(guest, shm, n))
            for p in shm.glob("*.mig"):
                p.unlink()
            for p in list(shm.iterdir()) + list(disk.iterdir()):
                if p.is_dir():
                    shutil.rmtree(p)

    api = api_samples(guest)
    med = {k: statistics.median(v) for k, v in ours.items()}
    qmed = {k: statistics.median(v) for k, v in qemu.items()}
    pmed = statistics.median(process)
    fmed = statistics.median(floor)
    say(f"snapshot ({MEMORY_MIB} MiB, {VCPUS} vCPUs, 32 MiB written; {ROUNDS} rounds, tmpfs)")
    for k, v in ours.items():
        say(f"  ours {k:10s} median {med[k]:7.2f} ms  min {min(v):7.2f}  max {max(v):7.2f}")
    for k, v in qemu.items():
        say(f"  qemu {k:10s} median {qmed[k]:7.2f} ms  min {min(v):7.2f}  max {max(v):7.2f}")
    say(f"  ours restore as a process (python -S -E -m native.run --restore): {pmed:.1f} ms")
    say(f"  floor: one pwrite of 32 MiB to a new tmpfs file: {fmed:.1f} ms")
    figures = [
        figure(
            "snapshot.restore_p50",
            med["restore"],
            "ms",
            anchor="qemu-incoming-exec-cat",
            anchor_value=qmed["restore"],
            target="value <= 3 ms and ratio <= 0.1",
            note=f"Firecracker publishes < {FIRECRACKER_RESTORE_MS:g} ms (2 vCPUs, 512 MiB); "
            "ours is in-process (Machine.restore + start), QEMU's a process start to "
            "its guest's next line",
        ),
        figure(
            "snapshot.restore_process_p50",
            pmed,
            "ms",
            anchor="qemu-incoming-exec-cat",
            anchor_value=qmed["restore"],
            target="ratio <= 0.5",
            note="both as processes: start to the guest's first line on the console",
        ),
        figure(
            "snapshot.full_ms",
            med["full"],
            "ms",
            anchor="qemu-migrate-exec-cat",
            anchor_value=qmed["full"],
            target="value <= 30 ms",
            disk_value=round(med["full_disk"], 3),
            floor_ms=round(fmed, 3),
            note="tmpfs for both; disk_value: ours to TMPDIR's file system, fsync'd; "
            "floor_ms: one pwrite of the 32 MiB written, the least a save can cost here",
        ),
        figure(
            "snapshot.diff_ms",
            med["diff"],
            "ms",
            anchor="qemu-migrate-exec-cat",
            anchor_value=qmed["full"],
            target="value <= 5 ms",
            written_ms=round(med["diff_written"], 3),
            paused_save_ms=round(med["diff_paused"], 3),
            floor_ms=round(fmed, 3),
            note="the guest's pause in a live diff save (its pages written while it runs, "
            "paused for the last pass and the state); written_ms: the same save to its "
            "fsync'd files; paused_save_ms: the diff saved with the machine paused "
            "throughout; QEMU has no diff snapshot to a file: its stop + full migration "
            "is the anchor",
        ),
    ]
    if api is not None:
        figures.append(api_figure(api))
    emit(figures)
    return 0


def api_samples(guest: Path) -> snapshot_api.Samples | None:
    if not broker_available():
        say("bench/snapshot: no rabbitmq-server: snapshot.api_restore_to_event_p50 skipped")
        return None
    say(f"a stack (broker, API, scheduler, one compute node): {snapshot_api.ROUNDS} rounds")
    return snapshot_api.measure(guest)


def api_figure(api: snapshot_api.Samples) -> dict[str, object]:
    m = {k: api.median(k) for k in api.ms}
    for verb in ("restore", "resume"):
        say(
            f"  api {verb:8s} request→event median {m[verb]:6.1f} ms (min "
            f"{min(api.ms[verb]):.1f}); →VMM stamp {m[verb + '_vmm']:.1f} ms; "
            f"→envelope ts {m[verb + '_made']:.1f} ms; →200 {m[verb + '_answer']:.1f} ms"
        )
    say(f"  api restore / resume: {m['restore'] / m['resume']:.2f}")
    say(f"  restores whose VMM began as the warm spare: {api.warm}/{len(api.ms['restore'])}")
    return figure(
        "snapshot.api_restore_to_event_p50",
        m["restore"],
        "ms",
        anchor="api-resume-to-event",
        anchor_value=m["resume"],
        target="value <= 60 ms",
        hops_ms={k: round(v, 3) for k, v in m.items()},
        rounds=len(api.ms["restore"]),
        warm_restores=api.warm,
        note="POST /restore to an outside subscriber's domain.started (restored); anchor: "
        "POST /actions resume of the paused domain to domain.resumed, same rounds",
    )


if __name__ == "__main__":
    sys.exit(main())
