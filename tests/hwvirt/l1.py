"""One command in a nested L1 with hardware-virt KVM, under QEMU TCG (docs/testing.md).

PVM hosts (FACTS.md) cannot run a Linux guest; QEMU's TCG with `-cpu EPYC` emulates AMD SVM
with nested paging, and Debian's cloud kernel booted there (the one deploy/images fetches) gets
a `/dev/kvm` with hardware-virt semantics. The L1 mounts the host's root over virtiofs, so the
checkout, its .venv and the image cache are all there; it runs one script from a run directory
on the host chrooted into that root, with a tmpfs TMPDIR of its own, and powers off.

`run_in_l1()` is bounded in time: on timeout it kills QEMU and virtiofsd by pid and reports the
console tail; it never leaves a process running, whatever happens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from native.images import cache_root
from services.broker import BrokerError, PrivateBroker

# Set in the L1's environment: code that must not start another L1 (the pytest plugin, the
# harness's own command line) runs directly when it sees it.
INSIDE_ENV = "FLOTILLA_HWVIRT_L1"
TIMEOUT_ENV = "FLOTILLA_HWVIRT_TIMEOUT"
DEFAULT_TIMEOUT = 3000.0  # the whole tier at TCG speed on a 2-core host (docs/testing.md)
QEMU = os.environ.get("FLOTILLA_HWVIRT_QEMU", "qemu-system-x86_64")
VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")  # Debian 12's qemu-system-x86 ships it here
BUILD_INITRAMFS = Path(__file__).resolve().parents[2] / "deploy" / "images" / "build-initramfs"
# Host settings that mean nothing in an L1 without a network (a broker or database URL would
# point at the host); everything else of the caller's FLOTILLA_* environment is passed on.
NOT_PASSED = frozenset({"FLOTILLA_AMQP_URL", "FLOTILLA_AMQP_MGMT_URL", "FLOTILLA_TEST_PG_URL"})
PASSED_PREFIXES = ("FLOTILLA_", "PYTEST_", "LC_")
PASSED_NAMES = frozenset({"LANG", "TERM", "TZ", "HYPOTHESIS_PROFILE"})
CONSOLE_TAIL_LINES = 40
# The first line of a kernel's report of trouble (the L1's console shows warnings: loglevel=5).
# A WARN() report starts "WARNING: CPU: n PID: ..."; a bare "WARNING:" also starts boot lines
# every L1 prints (Speculative Return Stack Overflow's), which are no trouble.
L1_TROUBLE_SIGNS = (
    "BUG:", "Oops", "WARNING: CPU:", "general protection fault", "Kernel panic", "soft lockup",
    "hung_task", "rcu_sched detected stall", "rcu: INFO", "clocksource: Marking",
)  # fmt: skip
# The host as the L1 sees it through QEMU's user-mode network: only the ports forwarded to
# the host's loopback answer there (tests/hwvirt/relay.py), nothing else leaves the L1.
HOST_ALIAS = "10.0.2.100"
# AMQP settings for the L1's clients: Python there runs 100x slower than on the host, and a
# loaded L1 took longer than pika's defaults (15 s for the handshake, 60 s heartbeats) to
# connect at all ("Timeout during AMQP handshake", then the broker closing on missed
# heartbeats): a compute node never came up.
L1_AMQP_QUERY = "heartbeat=600&socket_timeout=120&stack_timeout=300"
RELAY = Path(__file__).resolve().parent / "relay.py"
# Plugins the hwvirt tests do not use, left out of pytest in the L1: imports are emulated
# there, and hypothesis's alone costs tens of seconds of start-up.
LEAN_PLUGINS = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:anyio")


class L1Error(Exception):
    """The L1 could not be started (tools or images missing); the message says what to do."""


# What the L1's own kernel prints when it panics (`panic=-1` and `-no-reboot` then end QEMU).
# Seen on these hosts in runs that boot several Linux guests at once: a stack overflow in
# the L1's KVM (`shutdown_interception` -> `kvm_vcpu_reset`, `error_entry`) under QEMU's
# emulated SVM, whatever the test did; the L1 also resets without a word at times (QEMU
# ends, `-no-reboot`). docs/testing.md, "The hwvirt tier".
L1_CRASH_SIGNS = ("Kernel panic - not syncing", "corrupted stack end detected")
# The L1's init (deploy/images/build-initramfs --hwvirt-l1) says this before the command.
L1_RUNNING = "flotilla-l1: running "
# How many times the test tier runs a command again after such a crash (within its timeout).
L1_CRASH_RETRIES = 2
# The L1's init writes its uptime to <run>/alive every 5 s of its time. No pulse for this
# long and the L1 is stopped (seen: its clock stopped, every L2 guest and the command with
# it, QEMU idle): it is ended and counts as dead, as a panic does.
# A healthy run's longest silence, its fleet of Linux guests booting included, was 5.2 s
# (5.4 s with the e2e suite looping beside two L1s): 30 s is over five times that.
L1_PULSE_FILE = "alive"
L1_SILENT_S = 30.0
MONITOR_SOCKET = "monitor.sock"
# What the harness asks QEMU's monitor about a silent L1 (each vCPU: halted or not, where it
# stands — its RIP and CR3 tell the L1's kernel from an L2 guest's code — its flags and its
# local APIC's timer), once before an NMI and once after.
EXAMINE_COMMANDS = ("info cpus", "info registers -a", "info lapic", "info irq")
NMI_WAIT_S = 10.0
# The freezes (QEMU TCG: the L1's vCPU halted with its timer's vector waiting in the IRR) end
# when another interrupt reaches its local APIC: a key press through QEMU's monitor woke
# every one it was tried on. A pulse silent this long (over twice a healthy run's longest)
# gets one, and the run goes on instead of being ended and run again in a fresh L1.
NUDGE_AFTER_S = 12.0
SILENT_ENV = "FLOTILLA_HWVIRT_SILENT_S"  # another bound (the harness's own test)
# The L1's vCPUs. One by default: with two, TCG's vCPUs disagree on the TSC (the L1 takes it as
# unsynchronized and its KVM re-offsets each guest's), and in the runs of December 1 one L1
# run in three failed (its kernel dying under the emulated SVM, or its Linux guests standing
# still); with one, the tier passes run after run (docs/testing.md, what still fails).
CPUS_ENV = "FLOTILLA_HWVIRT_CPUS"


def default_cpus() -> int:
    raw = os.environ.get(CPUS_ENV, "1")
    if not raw.isdigit() or not 1 <= int(raw) <= 8:
        raise L1Error(f"{CPUS_ENV} must be 1..8, not {raw!r}")
    return int(raw)


STOPPED_SIGN = "[harness] the L1 stopped:"


@dataclass(frozen=True)
class L1Result:
    """How one command in the L1 ended.

    `status` is the command's exit status, None when it never finished (timeout, or the L1
    died first: `console` then says why). `output` is its stdout and stderr together.
    `crashes` says, for each earlier run of the same command whose L1 died under it
    (`retries`), how it died and how its console ended: this result is the run after them.
    """

    status: int | None
    timed_out: bool
    seconds: float
    output: str
    console: str
    crashes: tuple[str, ...] = ()
    # The longest the L1's pulse was silent while the command ran (it beats every 5 s of the
    # L1's time): how near a healthy run comes to `L1_SILENT_S`.
    longest_silence: float = 0.0
    # How many silences a key press ended (`NUDGE_AFTER_S`): freezes the run went on after.
    woken: int = 0

    @property
    def l1_crashed(self) -> bool:
        """The L1 died under the command: its init started the command, and QEMU ended
        before the command's status was written, within the time bound (its kernel
        panicked, or the machine reset). The rig failed, not the command: a command that
        fails still writes its status, and an L2 guest's crash is on that guest's own
        console. An L1 whose init gave up before the command is no crash."""
        return self.status is None and not self.timed_out and L1_RUNNING in self.console

    @property
    def l1_panicked(self) -> bool:
        return any(sign in self.console for sign in L1_CRASH_SIGNS)

    @property
    def how_the_l1_died(self) -> str:
        if self.l1_panicked:
            return "its kernel panicked"
        if STOPPED_SIGN in self.console:
            return "it stopped: no pulse"
        return "it reset"

    def console_tail(self, lines: int = CONSOLE_TAIL_LINES) -> str:
        """The console's last lines; when the L1's kernel reported trouble (an oops, a
        warning, a lockup, a panic) before them, its first report's head too: a panic's
        stack fills the tail and hides what went wrong. The harness's report on an L1 it
        took for stopped (QEMU's monitor: `_examine`) follows whole, never cut."""
        console, sign, report = self.console.partition(STOPPED_SIGN)
        text = console.replace("\r", "").splitlines()
        tail_from = max(len(text) - lines, 0)
        for i, line in enumerate(text[:tail_from]):
            if any(sign in line for sign in L1_TROUBLE_SIGNS):
                head = text[max(i - 2, 0) : min(i + lines // 2, tail_from)]
                text = [*head, "[...]", *text[tail_from:]]
                break
        else:
            text = text[tail_from:]
        return "\n".join([*text, sign + report] if sign else text)


def inside_l1() -> bool:
    return os.environ.get(INSIDE_ENV) == "1"


def host_has_hardware_virtualization(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True where the CPU shows vmx or svm: Linux guests run on /dev/kvm directly."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags") and {"vmx", "svm"} & set(line.split(":", 1)[-1].split()):
            return True
    return False


def runs_directly() -> bool:
    """True inside the L1 and on hosts with vmx/svm: hwvirt tests need no L1 there."""
    return inside_l1() or host_has_hardware_virtualization()


def default_timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise L1Error(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise L1Error(f"{TIMEOUT_ENV} must be positive, not {raw!r}")
    return value


def ensure_tools() -> None:
    """QEMU and virtiofsd, installed with apt-get (as root) when missing."""
    if shutil.which(QEMU) and VIRTIOFSD.is_file():
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "qemu-system-x86"],
            env=env,
            stdout=subprocess.DEVNULL,
            check=False,
        )
    if not (shutil.which(QEMU) and VIRTIOFSD.is_file()):
        raise L1Error(
            f"the hwvirt tier needs {QEMU} and {VIRTIOFSD}: apt-get install qemu-system-x86"
        )


def l1_images(timeout: float = 600) -> tuple[Path, Path]:
    """(bzImage, L1 initramfs): fetched and built into the image cache, reused when done.

    Also builds the guest initramfs, so tests in the L1 find the cache complete.
    """
    found: dict[str, str] = {}
    for flags in ([], ["--hwvirt-l1"]):
        try:
            proc = subprocess.run(
                [str(BUILD_INITRAMFS), *flags],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise L1Error(f"build-initramfs: {exc}") from exc
        if proc.returncode != 0:
            raise L1Error(f"build-initramfs {' '.join(flags)} failed:\n{proc.stderr.strip()}")
        for line in proc.stdout.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                found[key] = value
    return Path(found["vmlinuz"]), Path(found["initramfs"])


def l1_environment(base: Mapping[str, str], run_dir: Path) -> dict[str, str]:
    """The command's environment in the L1: the caller's locale, FLOTILLA_* and PYTEST_*
    settings (no host URLs), PATH with this Python's bin first, a tmpfs TMPDIR and HOME,
    the host's image cache, no bytecode written into the checkout."""
    env = {
        k: v
        for k, v in base.items()
        if (k in PASSED_NAMES or k.startswith(PASSED_PREFIXES)) and k not in NOT_PASSED
    }
    tmp = run_dir / "tmp"
    path = base.get("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin")
    env.update(
        {
            INSIDE_ENV: "1",
            "PATH": f"{Path(sys.executable).parent}:{path}",
            "TMPDIR": str(tmp),
            "HOME": str(tmp / "home"),
            "FLOTILLA_IMAGE_CACHE": str(cache_root().resolve()),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def run_script(argv: Sequence[str], cwd: Path, env: Mapping[str, str], run_dir: Path) -> str:
    """The shell script the L1's init runs chrooted into the host's root: the command with its
    output in <run>/output and its exit status written last to <run>/status."""
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    out, status = run_dir / "output", run_dir / "status"
    return (
        "# Written by tests/hwvirt/l1.py; run by the L1's init, chrooted into the host's root.\n"
        f"{exports}\n"
        'mkdir -p "$HOME"\n'
        f"cd {shlex.quote(str(cwd))} || exit 1\n"
        f"{shlex.join(argv)} >{shlex.quote(str(out))} 2>&1 </dev/null\n"
        f"echo $? >{shlex.quote(str(status))}.part\n"
        f"mv {shlex.quote(str(status))}.part {shlex.quote(str(status))}\n"
    )


def user_network(forwards: Sequence[int]) -> list[str]:
    """QEMU arguments for a NIC on which HOST_ALIAS:<port> reaches 127.0.0.1:<port> on the
    host, for each port in `forwards`; `restrict=on`: nothing else is reachable."""
    if not forwards:
        return []
    rules = ",".join(
        f"guestfwd=tcp:{HOST_ALIAS}:{port}-cmd:{sys.executable} -S {RELAY} {port}"
        for port in forwards
    )
    return [
        "-netdev",
        f"user,id=net0,restrict=on,{rules}",
        "-device",
        "virtio-net-pci,netdev=net0",
    ]


def qemu_argv(
    kernel: Path,
    initrd: Path,
    run_dir: Path,
    memory_mib: int,
    cpus: int,
    *,
    forwards: Sequence[int] = (),
) -> list[str]:
    return [
        QEMU,
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "EPYC",  # TCG's SVM with nested paging: the L1's KVM is hardware-virt KVM
        "-smp",
        str(cpus),
        "-m",
        f"{memory_mib}M",
        # virtiofs (vhost-user) needs the guest's RAM in shared memory
        "-object",
        f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on",
        "-numa",
        "node,memdev=mem",
        "-chardev",
        f"socket,id=vfs,path={run_dir / 'vfs.sock'}",
        "-device",
        "vhost-user-fs-pci,chardev=vfs,tag=host",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        f"file:{run_dir / 'console.log'}",
        # The harness asks it how a silent L1's vCPUs stand before ending it (`_examine`).
        "-monitor",
        f"unix:{run_dir / MONITOR_SOCKET},server=on,wait=off",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        # Not tsc=reliable: TCG's vCPUs do not agree on the TSC (with it, the L1's printk
        # stamps went from 55 s on one CPU to 8 s on the other), so the L1 is right to take
        # its TSC as unsynchronized, and its KVM keeps each L2 vCPU's TSC going its way.
        f"console=ttyS0 panic=-1 loglevel=5 flotilla.run={run_dir}",
        *user_network(forwards),
    ]


def _kill(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


class _Follower:
    """Copies what a growing file gained since the last call to a stream (live output)."""

    def __init__(self, path: Path, stream: TextIO | None) -> None:
        self.path = path
        self.stream = stream
        self.offset = 0

    def pump(self) -> None:
        if self.stream is None:
            return
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return
        if chunk:
            self.offset += len(chunk)
            self.stream.write(chunk.decode(errors="replace"))
            self.stream.flush()


@dataclass
class _Watched:
    timed_out: bool = False
    stopped: str = ""  # why the L1 was taken for stopped, when it was
    longest_silence: float = 0.0  # seconds, while the command ran
    woken: int = 0  # silences a key press ended (NUDGE_AFTER_S)


def _watch(
    qemu: subprocess.Popen[bytes],
    run_dir: Path,
    follower: _Follower,
    deadline: float,
    cancel: threading.Event | None = None,
) -> _Watched:
    """Follow the L1 until QEMU ends, or end it: the deadline passed, `cancel` was set, or
    the L1's pulse stopped (`L1_SILENT_S`)."""
    status_file = run_dir / "status"
    pulse = run_dir / L1_PULSE_FILE
    silent_bound = float(os.environ.get(SILENT_ENV, L1_SILENT_S))
    nudge_after = min(NUDGE_AFTER_S, silent_bound / 2)
    nudged: float | None = None  # the beat (pulse mtime) a key press was sent after
    finished_at: float | None = None
    watched = _Watched()
    while qemu.poll() is None:
        follower.pump()
        now = time.monotonic()
        if finished_at is None and status_file.exists():
            finished_at = now
        if cancel is not None and cancel.is_set():
            watched.timed_out = finished_at is None
            watched.stopped = f"{STOPPED_SIGN} its run was cancelled; ended by the harness"
            return watched
        # A finished command whose L1 does not power off is not worth waiting long for.
        if now > deadline or (finished_at is not None and now > finished_at + 30):
            watched.timed_out = finished_at is None
            return watched
        silent = _silent_for(pulse)
        if finished_at is None:
            watched.longest_silence = max(watched.longest_silence, silent)
        beat = _beat(pulse)
        if nudged is not None and beat != nudged:
            watched.woken += 1  # it beat again after the key press
            nudged = None
        if finished_at is None and beat is not None and nudged is None and silent > nudge_after:
            _monitor(run_dir / MONITOR_SOCKET, ("sendkey shift",))
            nudged = beat
        if finished_at is None and silent > silent_bound:
            report = _examine(run_dir, pulse)
            if nudged is not None:  # the key press above came and went, the pulse silent
                woke = f"a key press at {nudge_after:.0f} s of silence did not wake it"
                report = f"{woke}; {report}"
            if follower.stream is not None:
                follower.stream.write(f"\nhwvirt: the L1 is silent; {report}\n")
                follower.stream.flush()
            watched.stopped = (
                f"{STOPPED_SIGN} no pulse for {silent:.0f} s; ended by the harness\n{report}"
            )
            return watched
        time.sleep(0.1)
    return watched


def _examine(run_dir: Path, pulse: Path) -> str:
    """What QEMU's monitor says of a silent L1's vCPUs, before and after an NMI, and whether
    the NMI brought its pulse back (within `NMI_WAIT_S`): the freezes seen so far left no
    word on the L1's console, so this is what tells a lost wake-up from a lost device."""
    before = _monitor(run_dir / MONITOR_SOCKET, EXAMINE_COMMANDS)
    if before.startswith(_NO_ANSWER):
        return f"QEMU's monitor did not answer either.\n{before}"
    beat = _beat(pulse)
    _monitor(run_dir / MONITOR_SOCKET, ("nmi",))
    deadline = time.monotonic() + NMI_WAIT_S
    while time.monotonic() < deadline and _beat(pulse) == beat:
        time.sleep(0.1)
    woke = _beat(pulse) != beat
    after = _monitor(run_dir / MONITOR_SOCKET, EXAMINE_COMMANDS)
    pulse_now = "came back" if woke else f"stayed silent for {NMI_WAIT_S:.0f} s"
    return (
        f"after an NMI its pulse {pulse_now}."
        f"\n[monitor, before the NMI]\n{before}\n[monitor, after]\n{after}"
    )


def _beat(pulse: Path) -> float | None:
    try:
        return pulse.stat().st_mtime
    except OSError:
        return None


def _monitor(path: Path, commands: Sequence[str], timeout: float = 5.0) -> str:
    """Runs HMP commands on QEMU's monitor socket; their output, or why there is none."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            reply = _HmpReader(sock)
            reply.next()  # the banner
            out = []
            for command in commands:
                sock.sendall(command.encode() + b"\n")
                # The monitor echoes the command line first: what follows it is the answer.
                text = _ANSI.sub("", reply.next()).replace("\r", "").partition("\n")[2]
                if command.startswith("info registers"):
                    text = "\n".join(
                        line for line in text.splitlines() if line.startswith(_REGISTER_LINES)
                    )
                out.append(f"(qemu) {command}\n{text.rstrip()}")
            return "\n".join(out)
    except OSError as exc:
        return f"{_NO_ANSWER}{exc})"


class _HmpReader:
    """Splits what the monitor says at its prompts."""

    PROMPT = b"(qemu) "

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def next(self) -> str:
        while self.PROMPT not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("the monitor closed")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(self.PROMPT)
        return head.decode(errors="replace")


# General registers, RIP and flags (HLT=), control registers, EFER: no FPU or vector state.
_REGISTER_LINES = ("CPU#", "RAX", "RSI", "R8 ", "R12", "RIP", "CS ", "CR0", "EFER")
_NO_ANSWER = "(the monitor did not answer: "
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _silent_for(pulse: Path) -> float:
    """Seconds since the L1 last wrote its pulse (host time); 0 before its first."""
    try:
        return max(0.0, time.time() - pulse.stat().st_mtime)
    except OSError:
        return 0.0


def _wait_for_socket(path: Path, daemon: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while not path.exists():
        if daemon.poll() is not None:
            raise L1Error(f"virtiofsd exited with {daemon.returncode}:\n{_read(log)}")
        if time.monotonic() > deadline:
            raise L1Error(f"virtiofsd made no socket within 10 s:\n{_read(log)}")
        time.sleep(0.02)


def run_in_l1(
    argv: Sequence[str],
    run_dir: Path,
    *,
    cwd: Path | None = None,
    timeout: float | None = None,
    echo: TextIO | None = None,
    memory_mib: int = 4096,
    cpus: int | None = None,
    broker: bool = False,
    retries: int = 0,
    cancel: threading.Event | None = None,
) -> L1Result:
    """Runs `argv` in a fresh L1 and returns how it ended.

    `run_dir` is an empty directory on the host's root file system (the L1 sees it at the same
    path): the command's output and status land there, and anything the caller asks the
    command to write there (a JUnit file) is read back from it. `echo` gets the output live.
    With `broker`, a private RabbitMQ node runs on the host for the run, and the command
    finds it through FLOTILLA_AMQP_URL (a port forwarded to HOST_ALIAS).
    Raises L1Error when the L1 cannot be started; a command that fails is a result, not an
    error. When the L1 dies under the command (`L1Result.l1_crashed`), the command runs
    again in a fresh L1, up to `retries` more times within the same `timeout` (`run_dir`
    emptied first); the result says how many died before it (`crashes`).
    `cancel`, when set, ends the L1 as a timeout does (a run on another thread whose caller
    was interrupted: only the main thread gets signals).
    """
    timeout = default_timeout() if timeout is None else timeout
    cpus = default_cpus() if cpus is None else cpus
    deadline = time.monotonic() + timeout
    common: dict[str, Any] = {
        "cwd": cwd,
        "echo": echo,
        "memory_mib": memory_mib,
        "cpus": cpus,
        "cancel": cancel,
    }
    crashes: list[str] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(terminate_as_interrupt())
        forwards: tuple[int, ...] = ()
        amqp_url = None
        if broker:
            rmq = stack.enter_context(tempfile.TemporaryDirectory(prefix="flotilla-hwvirt-rmq-"))
            port, amqp_url = stack.enter_context(forwarded_broker(Path(rmq)))
            forwards = (port,)
        while True:
            remaining = deadline - time.monotonic()
            result = _run(
                argv,
                run_dir,
                **common,
                timeout=remaining,
                forwards=forwards,
                amqp_url=amqp_url,
            )
            cancelled = cancel is not None and cancel.is_set()
            if not result.l1_crashed or len(crashes) >= retries or remaining < 60 or cancelled:
                return dataclasses.replace(result, crashes=tuple(crashes))
            how = result.how_the_l1_died
            crashes.append(
                f"the L1 died under the command after {result.seconds:.0f} s ({how}); "
                f"its console ended with:\n{result.console_tail()}"
            )
            if echo is not None:
                echo.write(
                    f"\nhwvirt: {crashes[-1]}\nhwvirt: running the command again in a fresh "
                    f"L1 ({len(crashes)} of {retries})\n"
                )
                echo.flush()
            _empty(run_dir)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a CI job's timeout, `timeout`, `kill`) ends the run as Ctrl-C does: through
    the `finally`s that end QEMU, virtiofsd and the broker by pid. By default it would end
    this process at once and leave them running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _empty(directory: Path) -> None:
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _run(
    argv: Sequence[str],
    run_dir: Path,
    *,
    cwd: Path | None,
    timeout: float,
    echo: TextIO | None,
    memory_mib: int,
    cpus: int,
    forwards: Sequence[int],
    amqp_url: str | None,
    cancel: threading.Event | None = None,
) -> L1Result:
    ensure_tools()
    kernel, initrd = l1_images()
    cwd = Path.cwd() if cwd is None else cwd
    (run_dir / "tmp").mkdir()
    env = l1_environment(os.environ, run_dir)
    if amqp_url is not None:
        env["FLOTILLA_AMQP_URL"] = amqp_url
    (run_dir / "run.sh").write_text(run_script(argv, cwd, env, run_dir))
    follower = _Follower(run_dir / "output", echo)
    console = run_dir / "console.log"
    daemon: subprocess.Popen[bytes] | None = None
    qemu: subprocess.Popen[bytes] | None = None
    started = time.monotonic()
    watched = _Watched()
    try:
        with (run_dir / "virtiofsd.log").open("wb") as log:
            daemon = subprocess.Popen(
                [
                    str(VIRTIOFSD),
                    f"--socket-path={run_dir / 'vfs.sock'}",
                    "-o",
                    "source=/",
                    "-o",
                    # The L1 may keep metadata for the run: nothing on the host changes
                    # what it reads meanwhile, and Python's start-up stats are slow there.
                    "cache=always",
                    "-o",
                    "sandbox=chroot",  # the namespace sandbox fails here (pivot_root: EBUSY)
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        _wait_for_socket(run_dir / "vfs.sock", daemon, run_dir / "virtiofsd.log")
        with (run_dir / "qemu.log").open("wb") as log:
            qemu = subprocess.Popen(
                qemu_argv(kernel, initrd, run_dir, memory_mib, cpus, forwards=forwards),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        watched = _watch(qemu, run_dir, follower, started + timeout, cancel)
    finally:
        # A second Ctrl-C or SIGTERM (or `timeout` passing one on) must not cut this short
        # and leave QEMU running: they wait until both are gone.
        blocked = threading.current_thread() is threading.main_thread()
        if blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            _kill(qemu)
            if daemon is not None:
                try:
                    daemon.wait(timeout=5)  # it ends by itself once QEMU has gone
                except subprocess.TimeoutExpired:
                    _kill(daemon)
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    follower.pump()
    raw_status = _read(run_dir / "status").strip()
    qemu_log = "\n".join(
        line
        for line in _read(run_dir / "qemu.log").splitlines()
        if "TCG doesn't support requested feature" not in line  # -cpu EPYC's extras
    ).strip()
    console_text = _read(console)
    if qemu_log:
        console_text += f"\n[qemu] {qemu_log}"
    if watched.stopped:
        console_text += f"\n{watched.stopped}"
    return L1Result(
        status=int(raw_status) if raw_status.lstrip("-").isdigit() else None,
        timed_out=watched.timed_out,
        seconds=time.monotonic() - started,
        output=_read(run_dir / "output"),
        console=console_text,
        longest_silence=watched.longest_silence,
        woken=watched.woken,
    )


def l1_amqp_url(host_url: str) -> str:
    """The host broker's URL as the L1 reaches it: HOST_ALIAS, and L1_AMQP_QUERY's timeouts."""
    url = host_url.replace("127.0.0.1", HOST_ALIAS)
    return f"{url}{'&' if '?' in url else '?'}{L1_AMQP_QUERY}"


@contextlib.contextmanager
def forwarded_broker(base: Path) -> Iterator[tuple[int, str]]:
    """A private RabbitMQ node on the host for a run in the L1: (its port, the URL the L1
    uses). Erlang's JIT under TCG does not start a node within ten minutes, so tests in the
    L1 that need a broker get this one through a forwarded port (FLOTILLA_AMQP_URL)."""
    node = PrivateBroker(base, name="flotilla-hwvirt")
    try:
        node.start()
    except (BrokerError, OSError) as exc:
        node.stop()
        raise L1Error(f"the host broker for the L1 did not start: {exc}") from exc
    try:
        yield node.port, l1_amqp_url(node.url)
    finally:
        node.stop()
