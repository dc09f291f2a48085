"""The VMM process starts once per guest start: it imports only the standard library,
msgpack and `native`, and of the package only what it runs (docs/vmm.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def lean(code: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`code` run as the VMMs start: `python -S -E`, no site set-up (the modules add the
    site-packages they need)."""
    return subprocess.run(
        [sys.executable, "-S", "-E", "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=check,
    )


def modules_after(module: str) -> set[str]:
    return set(lean(f"import sys, {module}; print(' '.join(sorted(sys.modules)))").stdout.split())


def test_the_vmm_process_imports_only_what_it_runs() -> None:
    modules = modules_after("compute_node.vmm.__main__")
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
    modules = modules_after("native.run")
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
    done = lean(code, check=False)
    assert done.stdout.strip() == "ok", done.stderr
