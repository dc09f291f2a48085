"""What a Linux guest that stopped making progress in the L1 was doing: its vCPUs (where each
stands, its local APIC's timer and pending interrupts), its VMM's threads (in the guest,
halted, or waiting in the VMM) and the L1's view (interrupt counts, KVM's exit counters,
the kernel log). Read when a boot or a command stands still, and printed with the failure.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import native


def describe_machine(machine: native.Machine) -> str:
    """Pauses the machine for a moment to read every vCPU; resumes it. Then its devices'
    interrupt state (the IOAPIC, the UART, each virtio queue's indexes)."""
    try:
        return machine.describe()
    except native.VmmError as exc:
        # It ended: how (an internal error names KVM's exit reason and its data words).
        events = []
        while (event := machine.wait_event(0)) is not None:
            events.append(repr(event))
        return f"cannot pause it: {exc}; its events: {events or 'none left'}"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError as exc:
        return f"({exc.strerror})"


def describe_process(pid: int) -> str:
    """Each thread of a VMM process: its name, state, and where its kernel stack is."""
    lines = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        stat = _read(task / "stat")
        state = stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else "?"
        stack = [f.split()[-1] for f in _read(task / "stack").splitlines()[:6]]
        lines.append(f"  {task.name} {_read(task / 'comm')} {state} {' < '.join(stack)}")
    return f"pid {pid}:\n" + "\n".join(lines) if lines else f"pid {pid}: gone"


def _kvm_counters() -> dict[str, int]:
    root = Path("/sys/kernel/debug/kvm")
    if not root.is_dir():
        Path("/sys/kernel/debug").mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "debugfs", "none", "/sys/kernel/debug"], check=False)
    out = {}
    for name in ("exits", "halt_exits", "irq_injections", "irq_exits", "halt_wakeup"):
        text = _read(root / name)
        if text.isdigit():
            out[name] = int(text)
    return out


TRACING = Path("/sys/kernel/tracing")


def kvm_exits(seconds: float = 1.0, top: int = 12) -> str:
    """The L1 KVM's exits for `seconds` (its kvm_exit tracepoint), most frequent first:
    which VMM thread, why, and where in its guest."""
    if not (TRACING / "events").is_dir():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACING)], check=False)
    enable = TRACING / "events" / "kvm" / "kvm_exit" / "enable"
    if not enable.exists():
        return "kvm_exit: no tracepoint here"
    (TRACING / "trace").write_text("")
    enable.write_text("1")
    time.sleep(seconds)
    enable.write_text("0")
    counts: dict[str, int] = {}
    for line in _read(TRACING / "trace").splitlines():
        m = re.search(
            r"^\s*(\S+)\s.*kvm_exit: vcpu (\d+) reason (\S+).*?rip (0x[0-9a-f]+) info1 (\S+)", line
        )
        if m:
            key = f"{m.group(1)} vcpu{m.group(2)} {m.group(3)} rip={m.group(4)} info1={m.group(5)}"
            counts[key] = counts.get(key, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    body = "\n".join(f"  {n:6d} {key}" for key, n in ranked) or "  none"
    return f"kvm_exit over {seconds:.0f} s ({sum(counts.values())} in all):\n{body}"


def describe_l1(seconds: float = 5.0) -> str:
    """The L1 as a whole: load, KVM's exit counters over `seconds`, interrupts, dmesg."""
    before = _kvm_counters()
    time.sleep(seconds)
    after = _kvm_counters()
    moved = {k: after[k] - before.get(k, 0) for k in after}
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    return (
        f"loadavg {_read(Path('/proc/loadavg'))}; KVM counters over {seconds:.0f} s: {moved}\n"
        f"{kvm_exits()}\n"
        f"/proc/interrupts:\n{_read(Path('/proc/interrupts'))}\n"
        f"dmesg (last 30 lines):\n" + "\n".join(dmesg.splitlines()[-30:])
    )
