"""The L1 harness itself, run on the host: an L1 whose own kernel crashes under the command
is started again (tests/hwvirt/l1.py, `retries`), and only then.

Not marked `hwvirt`: it needs QEMU (TCG) and no hardware virtualization, and it runs on the
host, where it starts the L1s itself. Inside an L1 it does not run (no L1 in an L1).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hwvirt.l1 import L1Result, inside_l1, run_in_l1

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(inside_l1(), reason="starts L1s itself: runs on the host"),
]

# The L1's kernel made to crash for real (sysrq `c`: "Kernel panic - not syncing: sysrq
# triggered crash") the first time the command runs; the marker, on the host's file system
# through virtiofs, makes the next run finish.
CRASH_ONCE = (
    'if [ ! -e "$1" ]; then : > "$1"; sync; echo c > /proc/sysrq-trigger; sleep 60; fi; '
    "echo survived"
)


def _run(tmp_path: Path, retries: int) -> tuple[Path, L1Result]:
    marker = tmp_path / "crashed-once"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    argv = ["sh", "-c", CRASH_ONCE, "sh", str(marker)]
    return marker, run_in_l1(argv, run_dir, cwd=tmp_path, timeout=600, retries=retries)


@pytest.mark.timeout(700)
def test_a_command_whose_l1_kernel_crashed_runs_again_in_a_fresh_l1(tmp_path: Path) -> None:
    marker, result = _run(tmp_path, retries=2)
    assert marker.exists()
    assert result.status == 0, (result.output, result.console_tail())
    assert result.output.strip().endswith("survived")
    crashes = result.crashes
    assert len(crashes) == 1, crashes
    # Its kernel's panic, whose first line the console's tail (the stack) may not reach.
    assert "(its kernel panicked)" in crashes[0]


@pytest.mark.timeout(700)
def test_without_retries_the_crash_is_the_result(tmp_path: Path) -> None:
    _, result = _run(tmp_path, retries=0)
    assert result.status is None
    assert result.l1_crashed
    assert result.crashes == ()
