"""The files of a saved machine state, as the KVM driver keeps them (docs/snapshots.md, "On
the host"): `state` and `memory` written by the VMM (native.Machine.save), and `machine.json`,
the driver's note of how the machine was when taken."""

from __future__ import annotations

import json
import os
from pathlib import Path

from compute_node.driver import DriverError, SavedMachine
from native.machine import MEMORY_FILE, STATE_FILE, SnapshotError, snapshot_info
from protos.domain import DomainSpec, PowerState

MACHINE_FILE = "machine.json"


def check_state(directory: Path, spec: DomainSpec) -> None:
    """Raises DriverError(`invalid`) unless `directory` holds a whole, undamaged state of a
    machine shaped as `spec` (vCPUs, memory, disks, NICs), of a format this host reads."""
    try:
        info = snapshot_info(directory)
    except SnapshotError as exc:
        raise DriverError(
            f"the saved state in {directory} is unusable: {exc.message}", "invalid"
        ) from None
    if info.kind != "full":
        raise DriverError(f"{directory} holds a diff snapshot, not a whole state", "invalid")
    mine = (spec.vcpus, spec.memory_mib, len(spec.disks), len(spec.nics))
    theirs = (info.vcpus, info.memory_mib, info.disks, len(info.macs))
    if mine != theirs:
        raise DriverError(
            f"the saved state in {directory} is of another machine: (vcpus, memory_mib, "
            f"disks, nics) {theirs}, the domain has {mine}",
            "invalid",
        )


def saved_power(directory: Path) -> PowerState:
    """How the machine was when taken (running unless the note says paused)."""
    try:
        note = json.loads((directory / MACHINE_FILE).read_text())
        return PowerState(note["power"])
    except (OSError, ValueError, KeyError, TypeError):
        return PowerState.RUNNING


def write_saved(directory: Path, machine: SavedMachine) -> None:
    """The note beside a state that was written whole (temporary file, fsync, rename)."""
    tmp = directory / f"{MACHINE_FILE}.tmp"
    note = {"power": machine.power.value, "pause_ms": machine.pause_ms}
    with tmp.open("w") as f:
        f.write(json.dumps(note))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(directory / MACHINE_FILE)


def discard_state(directory: Path | None) -> None:
    """Removes what a failed save or snapshot wrote into `directory`: the state, its memory,
    the note and any temporaries, so nothing there passes as a valid state."""
    if directory is None:
        return
    names = (STATE_FILE, MEMORY_FILE, MACHINE_FILE)
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    for path in entries:
        if path.name in names or any(path.name.startswith(f"{n}.tmp") for n in names):
            path.unlink(missing_ok=True)
