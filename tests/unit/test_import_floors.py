"""Imports run down the floors (STYLE.md): no service imports the CLI.

Every service process pays for what it imports at each start, and the CLI pulls in httpx,
rich and click: seconds of start-up where Python is emulated (the hwvirt L1).
"""

from __future__ import annotations

import subprocess
import sys

SERVICES = ("services.api.main", "services.scheduler.main", "compute_node.main")


def test_no_service_imports_the_cli() -> None:
    probe = (
        "import sys\n"
        f"for name in {SERVICES!r}:\n"
        "    __import__(name)\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('services.cli'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "", f"imported by a service: {done.stdout}"
