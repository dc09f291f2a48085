"""The VMM process starts once per guest start: it imports only the standard library,
msgpack and `native`, and of the package only what it runs (docs/vmm.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_vmm_process_imports_only_what_it_runs() -> None:
    # As spawn() runs it: no site set-up (the module adds the site-packages it needs).
    code = "import sys, compute_node.vmm.__main__; print(' '.join(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-S", "-E", "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    modules = set(done.stdout.split())
    ours = {m for m in modules if m.split(".")[0] in ("compute_node", "protos", "services")}
    assert ours == {
        "compute_node",
        "compute_node.vmm",
        "compute_node.vmm.__main__",
        "compute_node.vmm.config",
        "compute_node.vmm.console",
        "compute_node.vmm.frames",
        "compute_node.vmm.guest",
        "compute_node.vmm.loop",
        "compute_node.vmm.migration",
        "compute_node.vmm.operations",
        "compute_node.vmm.protocol",
        "compute_node.vmm.spare",
    }
    heavy = {"pydantic", "structlog", "pika", "pathlib", "inspect", "dataclasses", "asyncio"}
    assert not heavy & {m.split(".")[0] for m in modules}


def test_the_lean_native_run_imports_no_enum_and_no_typing() -> None:
    # `python -S -E -m native.run`: its records and enums are made without `typing` and
    # `enum` (bench/boot.py's start_to_exit: ~2 ms of ~20 on this host).
    code = "import sys, native.run; print(' '.join(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-S", "-E", "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    modules = set(done.stdout.split())
    assert not {"enum", "typing", "signal", "contextlib", "dataclasses", "pathlib"} & modules


def test_the_run_time_int_enums_behave_as_intenum() -> None:
    code = """
import json
from native.machine import EventKind, MachineState
k = EventKind(1)
assert k is EventKind.POWEROFF and k == 1 and isinstance(k, int)
assert (k.name, k.value, str(k), f"{k}", json.dumps(k)) == ("POWEROFF", 1, "1", "1", "1")
assert repr(MachineState.PAUSED) == "<MachineState.PAUSED: 3>"
assert MachineState(3) is MachineState.PAUSED and MachineState(3) == 3  # ints, as IntEnum
assert {EventKind.REBOOT: "r"}[2] == "r"
for bad in (9, "1", None):
    try:
        EventKind(bad)
    except ValueError as exc:
        assert "is not a valid EventKind" in str(exc)
    else:
        raise AssertionError(bad)
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-S", "-E", "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.stdout.strip() == "ok", done.stderr
