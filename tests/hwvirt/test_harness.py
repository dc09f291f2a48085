"""The L1 harness itself, run on the host: an L1 whose own kernel crashes under the command
is started again (tests/hwvirt/l1.py, `retries`), and only then.

Not marked `hwvirt`: it needs QEMU (TCG) and no hardware virtualization, and it runs on the
host, where it starts the L1s itself. Inside an L1 it does not run (no L1 in an L1).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.hwvirt.l1 import (
    L1_PULSE_FILE,
    SILENT_ENV,
    STOPPED_SIGN,
    L1Result,
    inside_l1,
    run_in_l1,
)

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


@pytest.mark.timeout(700)
def test_an_l1_whose_pulse_stopped_is_ended_and_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first L1 is frozen for real (SIGSTOP to its QEMU once it has a pulse): nothing in
    it runs any more, as when its clock stopped. The harness ends it after the silence
    bound and runs the command again in a fresh L1, which is left alone."""
    monkeypatch.setenv(SILENT_ENV, "15")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    frozen: list[int] = []

    def freeze_the_first_l1() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not frozen:
            if (run_dir / L1_PULSE_FILE).exists():
                for pid, name in _processes_of(run_dir):
                    if name.endswith("qemu-system-x86_64"):
                        os.kill(pid, signal.SIGSTOP)
                        frozen.append(pid)
                        return
            time.sleep(0.2)

    freezer = threading.Thread(target=freeze_the_first_l1, daemon=True)
    freezer.start()
    argv = ["sh", "-c", "sleep 30; echo done"]
    result = run_in_l1(argv, run_dir, cwd=tmp_path, timeout=600, retries=1)
    freezer.join(5)
    assert frozen, "the first L1 was never frozen"
    with contextlib.suppress(ProcessLookupError):
        os.kill(frozen[0], signal.SIGCONT)  # ended by the harness already: nothing to resume
    assert result.status == 0, (result.output, result.console_tail())
    assert result.output.strip().endswith("done")
    # The run that counts beat every 5 s of its 30: a silence near that, far from the bound.
    assert 0 < result.longest_silence < 15, result.longest_silence
    assert len(result.crashes) == 1
    assert "(it stopped: no pulse)" in result.crashes[0]
    assert "QEMU's monitor did not answer either" in result.crashes[0]  # QEMU itself stopped


@pytest.mark.timeout(300)
def test_a_silent_l1_is_examined_through_qemus_monitor_before_it_is_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A silence bound shorter than the pulse's period makes a healthy L1 look silent: the
    report has each vCPU's registers and local APIC as QEMU's monitor gives them, and says
    that an NMI brought the pulse back (the next beat comes within the wait)."""
    monkeypatch.setenv(SILENT_ENV, "3")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = run_in_l1(["sleep", "60"], run_dir, cwd=tmp_path, timeout=240)
    assert result.l1_crashed
    assert result.how_the_l1_died == "it stopped: no pulse"
    assert result.longest_silence > 3
    report = result.console[result.console.index(STOPPED_SIGN) :]
    assert "after an NMI its pulse came back" in report, report
    assert report in result.console_tail()  # whole, however long, after the console's tail
    for shown in ("(qemu) info registers -a", "RIP=", "HLT=", "(qemu) info lapic", "LVTT"):
        assert shown in report, report
    assert "YMM00" not in report  # vector state is left out


@pytest.mark.timeout(300)
def test_sigterm_to_the_harness_leaves_no_qemu_or_virtiofsd_running(tmp_path: Path) -> None:
    """A CI job's timeout sends SIGTERM: the harness ends its L1's QEMU and virtiofsd before
    it goes, as it does on Ctrl-C (by default SIGTERM would end it at once and leave them)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = (
        "import sys; from pathlib import Path; from tests.hwvirt.l1 import run_in_l1; "
        "run_in_l1(['sleep', '120'], Path(sys.argv[1]), timeout=240)"
    )
    repo = Path(__file__).resolve().parents[2]
    harness = subprocess.Popen([sys.executable, "-c", script, str(run_dir)], cwd=repo)
    left = _sigterm_once_beating(harness, run_dir, l1s=1, bound=120, wait=60)
    assert left == []


def _sigterm_once_beating(
    proc: subprocess.Popen[bytes], where: Path, *, l1s: int, bound: float, wait: float
) -> list[tuple[int, str]]:
    """Once `l1s` L1s under `where` beat (within `bound` s), SIGTERM to `proc`, which has
    `wait` s to end; returns the QEMUs and virtiofsds it left (killed here, by pid)."""
    try:
        deadline = time.monotonic() + bound
        while len(list(where.glob(f"**/{L1_PULSE_FILE}"))) < l1s:
            assert proc.poll() is None, "it ended before its L1s ran"
            assert time.monotonic() < deadline, f"{l1s} L1(s) never beat at once"
            time.sleep(0.2)
        assert len(_processes_of(where)) >= 2 * l1s, "not a QEMU and a virtiofsd per L1"
        proc.send_signal(signal.SIGTERM)
        proc.wait(wait)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        left = _processes_of(where)
        for pid, _name in left:
            os.kill(pid, signal.SIGKILL)  # left behind: not for the next test
    return left


def _processes_of(run_dir: Path) -> list[tuple[int, str]]:
    """QEMU and virtiofsd processes (not zombies) whose command line names `run_dir`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(run_dir).encode() in argv and state != "Z":
            name = argv.split(b"\0")[0].decode(errors="replace")
            if name.endswith(("qemu-system-x86_64", "virtiofsd")):
                found.append((int(proc.name), name))
    return found


@pytest.mark.timeout(400)
def test_sigterm_to_a_tier_of_two_l1s_side_by_side_ends_both(tmp_path: Path) -> None:
    """The plugin's tier runs its groups (the Linux guests, the control plane) in L1s side
    by side, on threads: a SIGTERM to pytest reaches only its main thread, which must end
    both L1s' QEMU and virtiofsd before it goes."""
    for name in ("a", "b"):
        (tmp_path / f"test_{name}.py").write_text(
            f"import time\n\n\ndef test_{name}():\n    time.sleep(200)\n"
        )
    # A short TMPDIR: the run dirs' sockets must fit a unix socket's 108 bytes, which
    # tmp_path under pytest-xdist (…/popen-gw0/test_sigterm_to_a_tier_…) does not leave.
    tmp = Path(tempfile.mkdtemp(prefix="fl-tier-", dir="/tmp"))
    script = (
        "import sys, types; from pathlib import Path; "
        "from tests.hwvirt.plugin import L1Session, L1Tier; "
        "root = Path(sys.argv[1]); "
        "config = types.SimpleNamespace(rootpath=root, "
        "pluginmanager=types.SimpleNamespace(get_plugin=lambda name: None)); "
        "sessions = [L1Session(config, [f'test_{n}.py'], broker=False) for n in 'ab']; "
        "L1Tier(config, sessions).run()"
    )
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TMPDIR": str(tmp), "FLOTILLA_HWVIRT_L1S": "2"}
    tier = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=repo, env=env)
    try:
        left = _sigterm_once_beating(tier, tmp, l1s=2, bound=180, wait=90)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert left == []
    assert tier.returncode != 0  # interrupted, not passed
