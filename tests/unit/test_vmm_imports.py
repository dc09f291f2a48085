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
