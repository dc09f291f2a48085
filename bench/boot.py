"""Boot benchmark (issue 3): our VMM against QEMU microvm and a raw-KVM floor.

    python bench/boot.py

Boots the test guest (native/guest, the same PVH file for every VMM) and measures:
- boot.start_to_exit: process start -> READY on COM1 -> debug exit, median of ROUNDS runs for
  our VMM (`python -S -E -m native.run`, the lean start a compute node uses), QEMU microvm
  (FACTS.md's command line), and a C floor (bench/floor/boot_floor.c: KVM_CREATE_VM, memory,
  the ELF's segments, the PVH entry state, a KVM_RUN loop; no irqchip, no threads);
- boot.peak_rss: the child's peak RSS (ru_maxrss from wait4, taken by bench/floor/spawn.c),
  ours against QEMU's;
- boot.exit_cost: ns per port write of the guest's `serialflood` action (one exit per byte)
  through our VMM against the floor.

Human-readable results go to stderr; stdout ends with one JSON object per figure. Runs are
interleaved (ours, QEMU, floor, ...) so that load from elsewhere hits all of them alike.
Needs /dev/kvm, gcc and qemu-system-x86_64; installs nothing, exits 2 when one is missing.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.figures import emit, figure, say  # noqa: E402
from native import kvm_unavailable_reason, testguest  # noqa: E402

ROUNDS = 15
FLOOD_ROUNDS = 5
FLOOD_BYTES = 20000
MEMORY_MIB = 64  # as FACTS.md's QEMU line (-m 64)
BOOT_CMDLINE = "ready debugexit"
DEBUG_EXIT_STATUS = 1  # debugexit with v = 0: (0 << 1) | 1
QEMU = "qemu-system-x86_64"
FLOOR_SOURCE = ROOT / "bench" / "floor" / "boot_floor.c"
SPAWN_SOURCE = ROOT / "bench" / "floor" / "spawn.c"


@dataclass(frozen=True)
class Run:
    ms: float
    rss_kib: int
    output: str


def run_once(spawn: Path, argv: list[str], out_dir: Path) -> Run:
    """Run argv under the spawn helper; wall time and peak RSS are the helper's figures."""
    out_path = out_dir / "stdout"
    with out_path.open("wb") as out:
        proc = subprocess.run(
            [str(spawn), *argv],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.PIPE,
            check=False,
        )
    text = out_path.read_text(errors="replace")
    try:
        ns, rss_kib, status = (int(x) for x in proc.stderr.split()[-3:])
    except ValueError:
        raise SystemExit(f"bench/boot: spawn failed: {proc.stderr!r}") from None
    if status != DEBUG_EXIT_STATUS:
        raise SystemExit(
            f"bench/boot: {argv[0]} exited {status}, not {DEBUG_EXIT_STATUS}; "
            f"output:\n{text[-2000:]}"
        )
    return Run(ns / 1e6, rss_kib, text)


def build(source: Path, out_dir: Path) -> Path:
    exe = out_dir / source.stem
    result = subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-o", str(exe), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"bench/boot: building {source.name} failed:\n{result.stderr}")
    return exe


def commands(guest: Path, floor: Path, cmdline: str) -> dict[str, list[str]]:
    python = sys.executable
    run = ["-m", "native.run", "--kernel", str(guest), "--memory", str(MEMORY_MIB)]
    return {
        "ours": [python, "-S", "-E", *run, "--cmdline", cmdline],
        "ours (site)": [python, *run, "--cmdline", cmdline],
        "qemu-microvm": [
            QEMU,
            "-M",
            "microvm,x-option-roms=off,isa-serial=on,rtc=off",
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
            "-kernel",
            str(guest),
            "-append",
            cmdline,
        ],
        "floor": [str(floor), str(guest), cmdline, str(MEMORY_MIB)],
    }


def flood_ns_per_byte(text: str) -> float:
    m = re.search(r"SERIALFLOOD bytes=(\d+) tsc=\d+ ns=(\d+)", text)
    if not m:
        raise SystemExit(f"bench/boot: no SERIALFLOOD line in:\n{text[-500:]}")
    return int(m.group(2)) / int(m.group(1))


def main() -> int:
    if shutil.which(QEMU) is None:
        say(f"bench/boot: {QEMU} is not installed; it is the anchor of this benchmark")
        say("(Debian: apt-get install qemu-system-x86). Nothing was measured.")
        return 2
    if shutil.which("gcc") is None:
        say("bench/boot: gcc is not installed (it builds the test guest and the floor)")
        return 2
    reason = kvm_unavailable_reason()
    if reason is not None:
        say(f"bench/boot: no usable /dev/kvm: {reason}")
        return 2
    guest = testguest.build()

    with tempfile.TemporaryDirectory(prefix="bench-boot-") as tmp:
        out_dir = Path(tmp)
        floor = build(FLOOR_SOURCE, out_dir)
        spawn = build(SPAWN_SOURCE, out_dir)
        boot = commands(guest, floor, BOOT_CMDLINE)
        runs: dict[str, list[Run]] = {name: [] for name in boot}
        for argv in boot.values():  # warm the page cache; not counted
            run_once(spawn, argv, out_dir)
        for _ in range(ROUNDS):
            for name, argv in boot.items():
                run = run_once(spawn, argv, out_dir)
                if "READY vcpus=1" not in run.output:
                    raise SystemExit(f"bench/boot: {name} printed no READY line:\n{run.output}")
                runs[name].append(run)

        flood = commands(guest, floor, f"serialflood={FLOOD_BYTES} debugexit")
        ns: dict[str, list[float]] = {"ours": [], "floor": []}
        for _ in range(FLOOD_ROUNDS):
            for name, values in ns.items():
                values.append(flood_ns_per_byte(run_once(spawn, flood[name], out_dir).output))

    ms = {name: statistics.median(r.ms for r in rs) for name, rs in runs.items()}
    rss = {name: statistics.median(r.rss_kib for r in rs) / 1024 for name, rs in runs.items()}
    say(f"boot.start_to_exit ('{BOOT_CMDLINE}', {MEMORY_MIB} MiB, {ROUNDS} runs each)")
    for name, rs in runs.items():
        times = sorted(r.ms for r in rs)
        say(
            f"  {name:14s} median {ms[name]:6.1f} ms  min {times[0]:6.1f}  max {times[-1]:6.1f}"
            f"   peak RSS {rss[name]:5.1f} MiB"
        )
    flood_med = {name: statistics.median(v) for name, v in ns.items()}
    say(f"boot.exit_cost (serialflood={FLOOD_BYTES}, {FLOOD_ROUNDS} runs each)")
    for name, v in flood_med.items():
        say(f"  {name:14s} {v:7.0f} ns per port write ({1e9 / v:8.0f} bytes/s)")

    figures = [
        figure(
            "boot.start_to_exit",
            ms["ours"],
            "ms",
            anchor="qemu-microvm",
            anchor_value=ms["qemu-microvm"],
            target="ratio <= 0.5",
        ),
        figure(
            "boot.peak_rss",
            rss["ours"],
            "MiB",
            anchor="qemu-microvm",
            anchor_value=rss["qemu-microvm"],
            target="ratio <= 0.4",
        ),
        figure(
            "boot.exit_cost",
            flood_med["ours"],
            "ns",
            anchor="raw-kvm-floor",
            anchor_value=flood_med["floor"],
            target="ratio <= 1.15",
        ),
    ]
    say(f"  floor start_to_exit {ms['floor']:.1f} ms (the least any VMM process can take here)")
    emit(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
