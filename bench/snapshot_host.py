"""Save, snapshot and restore through the compute node's KVM driver and the VMM process.

    python bench/snapshot_host.py [ROUNDS]

The test guest, 256 MiB and 2 vCPUs, runs `memtest=32` (32 MiB written) and counts. Each
round: `KvmDriver.spawn` (boot, timed to its return: `started` delivered), wait for the
counter, `KvmDriver.snapshot` with nothing to copy (the pause it costs), the same with the
machine's memory and state (saved live: the pause it costs, and its wall time), `KvmDriver.save`
(timed, and the pause it reports), `KvmDriver.restore` (timed to its return: a new VMM
process restored the machine and `started`/restored was delivered; and to the guest's next
console line), then destroy. States go to TMPDIR (the disk: fsync costs what it costs).
Anchor: the same driver's spawn of the same guest in the same round (restore / boot).
Human-readable lines go to stderr; stdout ends with one JSON object per figure.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.figures import emit, figure, say
from compute_node.boot_sources import BootFiles, HostFile
from compute_node.kvm import KvmDriver
from native import kvm_unavailable_reason, testguest
from protos.domain import BootSpec, DomainSpec

MEMORY_MIB = 256
CMDLINE = "ready memtest=32 counter"


def wait_console(driver: KvmDriver, domain_id: uuid.UUID, pattern: str, timeout: float) -> None:
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while not rx.search(driver.console(domain_id, 1 << 16)[0].decode(errors="replace")):
        if time.monotonic() > deadline:
            raise SystemExit(f"bench/snapshot_host: no {pattern!r} within {timeout} s")
        time.sleep(0.0005)


def main() -> int:
    reason = kvm_unavailable_reason()
    if reason is not None:
        say(f"bench/snapshot_host: KVM unavailable: {reason}")
        return 2
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    guest = testguest.build()
    samples: dict[str, list[float]] = {
        k: []
        for k in (
            "spawn",
            "save",
            "save_pause",
            "snap_pause",
            "memsnap",
            "memsnap_pause",
            "restore",
            "running",
        )
    }
    with tempfile.TemporaryDirectory(prefix="flotilla-snaphost-") as tmp:
        root = Path(tmp)
        driver = KvmDriver(root / "domains")
        driver.set_event_sink(lambda _e: None)
        for i in range(rounds):
            spec = DomainSpec.model_validate(
                {
                    "name": f"b-{i}",
                    "boot": BootSpec(kernel=str(guest), cmdline=CMDLINE),
                    "memory_mib": MEMORY_MIB,
                    "vcpus": 2,
                }
            )
            fd = os.open(guest, os.O_RDONLY | os.O_CLOEXEC)
            with BootFiles([HostFile("boot.kernel", str(guest), fd)]) as files:
                t0 = time.monotonic()
                driver.spawn(spec, files)
                samples["spawn"].append((time.monotonic() - t0) * 1e3)
                wait_console(driver, spec.uuid, r"COUNTER 2\b", 60)
                snap = driver.snapshot(spec.uuid, None, lambda: None)
                samples["snap_pause"].append(snap.pause_ms)
                memsnap = root / f"snap-{i}"
                memsnap.mkdir()
                t0 = time.monotonic()
                snap = driver.snapshot(spec.uuid, memsnap, lambda: None)
                samples["memsnap"].append((time.monotonic() - t0) * 1e3)
                samples["memsnap_pause"].append(snap.pause_ms)
                state = root / f"state-{i}"
                state.mkdir()
                t0 = time.monotonic()
                saved = driver.save(spec.uuid, state)
                samples["save"].append((time.monotonic() - t0) * 1e3)
                samples["save_pause"].append(saved.pause_ms)
                t0 = time.monotonic()
                driver.restore(spec, files, state)
                samples["restore"].append((time.monotonic() - t0) * 1e3)
                wait_console(driver, spec.uuid, r"COUNTER \d+", 10)
                samples["running"].append((time.monotonic() - t0) * 1e3)
                driver.destroy(spec.uuid)
            say(
                f"round {i}: spawn {samples['spawn'][-1]:.1f} ms, save "
                f"{samples['save'][-1]:.1f} ms (paused {saved.pause_ms:.1f}), restore "
                f"{samples['restore'][-1]:.1f} ms, counting again {samples['running'][-1]:.1f} ms"
            )
        driver.close()
    med = {k: statistics.median(v) for k, v in samples.items()}
    say(
        f"snapshot_host: {rounds} rounds, {MEMORY_MIB} MiB / 2 vCPUs, 32 MiB written; medians: "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items())
    )
    boot = ("driver-spawn-boot (this run)", med["spawn"])
    emit(
        [
            figure(
                "snapshot.driver_restore_p50",
                med["restore"],
                "ms",
                anchor=boot[0],
                anchor_value=boot[1],
                target="none (reported)",
            ),
            figure(
                "snapshot.driver_restore_to_guest_p50",
                med["running"],
                "ms",
                anchor=boot[0],
                anchor_value=boot[1],
                target="none (reported)",
            ),
            figure(
                "snapshot.driver_save_ms",
                med["save"],
                "ms",
                anchor=boot[0],
                anchor_value=boot[1],
                target="none (reported)",
                pause_ms=round(med["save_pause"], 3),
            ),
            figure(
                "snapshot.driver_snapshot_pause_ms",
                med["snap_pause"],
                "ms",
                anchor=boot[0],
                anchor_value=boot[1],
                target="none (reported)",
            ),
            figure(
                "snapshot.driver_memory_snapshot_pause_ms",
                med["memsnap_pause"],
                "ms",
                anchor="driver-save-pause (this run)",
                anchor_value=med["save_pause"],
                target="none (reported)",
                wall_ms=round(med["memsnap"], 3),
                note="a domain snapshot with memory of the running guest, saved live: the "
                "guest's pause; anchor: the save's pause, the same memory written paused",
            ),
        ]
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
