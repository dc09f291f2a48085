"""Debian's cloud kernel with the project's initramfs on our VMM, where KVM has hardware
virtualization (docs/images.md): console, SMP, virtio-blk, ext4, virtio-net, reboot, power
button, panic and kill -9.

A Linux boot costs minutes in the nested L1 (tests/hwvirt/, docs/testing.md), so the module
boots one fleet of four guests at once and every test checks its behaviour on them, in file
order (the later tests end guests the earlier ones use):
- `shell2`: `native.Machine`, 2 vCPUs, a raw disk, a read-only disk, an ext4 disk, a NIC;
- `shell4`: `python -m native.run` (a VMM process of its own, for kill -9), 4 vCPUs, a disk,
  a NIC;
- `vmm_reboot`, `vmm_panic`: the per-guest VMM process the compute node runs
  (`compute_node.vmm`), whose journal becomes domain.rebooted / .shutdown / .crashed;
  `vmm_panic` is saved and restored into a new VMM process before it panics; `vmm_reboot`
  has a NIC and migrates live into a new VMM process (its NIC re-plugged on a new tap)
  before it reboots.
Each boots with `flotilla.shell`: init runs a shell on COM1, and the tests type commands into
it (the UART's receive interrupt) and read their output (its THRE interrupt). The NICs are taps
on a bridge with a veth into a namespace of the module's own (10.77.0.0/24).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import native
from compute_node.vmm import protocol
from compute_node.vmm.client import VmmClient, VmmGone, reap, spawn, wait_exit
from compute_node.vmm.frames import CONFIG_FILE, CONSOLE_LOG
from native.images import QUICK_BOOT_ARGS, ImageError, LinuxImages, fetch_images
from native.machine import Disk, Event, EventKind, Nic
from tests.hwvirt import stall
from tests.kvm.harness import Console
from tests.kvm.test_vmm_process import Domain, save_and_restore, write_config

# One fleet boot and one more Linux boot: minutes each in the nested L1.
pytestmark = [pytest.mark.hwvirt, pytest.mark.slow, pytest.mark.timeout(1800)]

MIB = 1 << 20
MEMORY_MIB = 256
BOOT_TIMEOUT = 900.0  # four guests booting at once in the L1, on a busy host
# The fleet boots in 22-27 s in the L1 (62 s on a busy host): one that has not reached its
# shells in this long stands still, and the failure says where (stall.py).
STALL_S = 240.0
# A command that has not answered in this long is stuck, not slow (they take seconds on a
# quiet host): failing it with its console leaves the rest of the tier its time.
COMMAND_TIMEOUT = 150.0
SPAWN_TIMEOUT = 120.0  # Python starts slowly in the emulated L1
POLL_S = 0.5  # console polling: every wake-up costs CPU the guests need in the L1
PROMPT = "flotilla-linux# "
# quiet: every console byte Linux prints is a port exit, and those are slow in the L1.
BASE_CMDLINE = f"console=ttyS0 quiet flotilla.shell {QUICK_BOOT_ARGS}"
PATTERN = b"flotilla-pattern\n"
SUBNET = "10.77.0"
REBOOT_MAC = "52:54:00:77:00:05"
PINGS = 300  # at 0.2 s: a minute of pings, the migration in the L1 well within it


@pytest.fixture(scope="module")
def images() -> LinuxImages:
    try:
        found = fetch_images(initramfs=True)
    except ImageError as exc:
        pytest.fail(f"cannot fetch the Linux guest images: {exc}", pytrace=False)
    assert found.initramfs is not None
    return found


class LinuxShell:
    """A Linux guest's initramfs shell, driven through its console."""

    def __init__(self, console: Console, machine: native.Machine | None = None) -> None:
        self.machine = machine
        self.console = console
        self.commands = 0

    def wait_shell(self, timeout: float = STALL_S) -> None:
        """Waits for the shell's prompt; a boot that stands still fails after `timeout`,
        with where its vCPUs are when this is an in-process machine."""
        try:
            self.console.wait_for(r"^flotilla-linux: READY", timeout)
        except pytest.fail.Exception as exc:
            if self.machine is None:
                raise
            pytest.fail(f"{exc}\n{stall.describe_machine(self.machine)}")
        self.console.wait_for(re.escape(PROMPT), COMMAND_TIMEOUT)

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT) -> tuple[int, str]:
        """(exit status, output) of one shell command typed on the console."""
        self.commands += 1
        n = self.commands
        # The shell echoes the typed line (wrapped, with escapes) with `$((n))` unexpanded:
        # only its answers have the digits in the markers.
        # The end marker starts a line of its own even after output without a newline.
        self.console.send(
            f"echo \"<$(({n}))<\"; {command}; printf '\\n>%s> rc=%s\\n' $(({n})) $?\n".encode()
        )
        try:
            end = self.console.wait_for(rf"^>{n}> rc=(\d+)\r?$", timeout)
        except pytest.fail.Exception as exc:
            if self.machine is None:
                raise
            c = self.machine.counters()
            pytest.fail(
                f"{exc}\nconsole bytes in {c.console_in_bytes} out {c.console_out_bytes}, "
                f"exits {c.exits}\n{stall.describe_machine(self.machine)}"
            )
        text = self.console.text
        begin = re.compile(rf"^<{n}<\r?$", re.MULTILINE).search(text)
        assert begin is not None, text
        out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", text[begin.end() : end.start()])
        return int(end.group(1)), out.strip("\n")

    def check(self, command: str, timeout: float = COMMAND_TIMEOUT) -> str:
        rc, out = self.run(command, timeout)
        assert rc == 0, f"{command!r} exited with {rc}:\n{out}\nconsole:\n{self.console.text}"
        return out

    def end(self, kind: EventKind, timeout: float = COMMAND_TIMEOUT) -> Event:
        assert self.machine is not None
        event = self.machine.wait_event(timeout)
        text = self.console.drain()
        assert event is not None, f"no event within {timeout}s; console:\n{text}"
        assert event.kind is kind, f"{event}; console:\n{text}"
        return event


def disk_file(path: Path, mib: int) -> Path:
    with path.open("wb") as f:
        f.truncate(mib * MIB)
    return path


def device_of(shell: LinuxShell, serial: str) -> str:
    """/dev/vdX of the virtio disk whose id (virtio-blk GET_ID) is `serial`."""
    found = shell.check(f"grep -lx {serial} /sys/block/vd*/serial")
    out = found.removeprefix("/sys/block/").removesuffix("/serial")
    assert re.fullmatch(r"vd[a-z]", out), found
    return f"/dev/{out}"


def stalled_fleet(
    machine: native.Machine,
    run4: subprocess.Popen[bytes],
    console4: Console,
    pids: list[int],
) -> str:
    """Where the fleet's guests stand: the in-process machine's vCPUs and devices (or how
    it ended), `native.run`'s status and last words (its vCPUs and devices too: SIGUSR1),
    every VMM process's threads, and the L1's counters and log (tests/hwvirt/stall.py)."""
    parts = ["the 2-vCPU guest:", stall.describe_machine(machine)]
    parts.append(f"the 4-vCPU guest (native.run): exit status {run4.poll()}")
    if run4.poll() is None:
        os.kill(run4.pid, signal.SIGUSR1)  # native.run prints its vCPUs and devices
        time.sleep(2.0)
    parts.append(console4.text[-4000:])
    parts += [stall.describe_process(pid) for pid in [run4.pid, *pids]]
    parts.append(stall.describe_l1())
    return "\n".join(parts)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def console_log(d: Domain) -> str:
    return (d.path / CONSOLE_LOG).read_text(errors="replace")


def wait_log(d: Domain, pattern: str, count: int = 1, timeout: float = BOOT_TIMEOUT) -> str:
    """Waits for `count` matches in a VMM's console log file (read every POLL_S)."""
    rx = re.compile(pattern, re.MULTILINE)
    deadline = time.monotonic() + timeout
    while True:
        text = console_log(d)
        if len(rx.findall(text)) >= count:
            return text
        if time.monotonic() > deadline or reap(d.pid) is not None:
            pytest.fail(f"{pattern!r} x{count} not in the console; journal {d.kinds()}:\n{text}")
        time.sleep(POLL_S)


def type_line(d: Domain, line: str, *, echoed: bool = True) -> None:
    """Types a line on a VMM's console; returns once the shell echoed it (or at once when not
    `echoed`). The line and the prompt must fit in 80 columns (the shell wraps a longer one
    as it echoes it)."""
    assert len(line) <= 60, f"{line!r} is too long to come back as typed"
    before = console_counters(d)
    with d.client.attach() as stream:
        stream.settimeout(COMMAND_TIMEOUT)
        stream.sendall(line.encode() + b"\n")
        if not echoed:
            return
        got = b""
        while line.encode() not in got:
            try:
                chunk = stream.recv(4096)
            except TimeoutError:
                pytest.fail(
                    f"{line!r} not echoed in {COMMAND_TIMEOUT:.0f} s; got {got!r}; console "
                    f"bytes in/out and exits before {before}, now {console_counters(d)}\n"
                    f"{stall.describe_process(d.pid)}\n{stall.describe_l1()}"
                )
            assert chunk, f"attach stream closed; got {got!r}"
            got += chunk


def console_counters(d: Domain) -> tuple[int, int, int]:
    """The VMM's console bytes in (taken by the UART), out, and the guest's exits so far."""
    c = d.client.stats()
    return c["console_in_bytes"], c["console_out_bytes"], c["exits"]


@dataclass
class Fleet:
    """The module's guests and what they were given; see the module docstring."""

    shell2: LinuxShell
    shell4: LinuxShell
    run4: subprocess.Popen[bytes]
    vmm_reboot: Domain
    vmm_panic: Domain
    netns: str
    raw: Path
    ro: Path
    ro_before: bytes
    ext4: Path
    flushed: Path
    # Shared with the fixture, which stops and closes them all: a test may add a guest.
    machines: list[native.Machine] = field(default_factory=list)
    consoles: list[Console] = field(default_factory=list)
    vmm_pids: list[int] = field(default_factory=list)  # every VMM process to reap at the end
    net: Network | None = None
    reboots: int = 0
    # Linux boots in vmm_reboot's current console log before the reboot test (0 once it
    # migrated: the target's log starts after the switch).
    reboot_boots: int = 1


class Network:
    """A bridge with a veth into a fresh namespace at SUBNET.1, and taps on the bridge."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]  # not the pid: pids repeat from L1 to L1 (names <= 12)
        self.bridge, self.netns, self.veth = f"flbr{tag}", f"flns{tag}", f"flv{tag}"
        self.links: list[str] = []
        self.fds: list[int] = []
        ip("netns", "add", self.netns)
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            self.links.append(self.bridge)
            ip("link", "set", self.bridge, "up")
            ip("link", "add", f"{self.veth}h", "type", "veth", "peer", "name", f"{self.veth}n")
            self.links.append(f"{self.veth}h")
            ip("link", "set", f"{self.veth}h", "master", self.bridge, "up")
            ip("link", "set", f"{self.veth}n", "netns", self.netns)
            ip("-n", self.netns, "addr", "add", f"{SUBNET}.1/24", "dev", f"{self.veth}n")
            ip("-n", self.netns, "link", "set", f"{self.veth}n", "up")
            ip("-n", self.netns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def tap_fd(self, name: str) -> int:
        """A tap opened here (for a Machine in this process), on the bridge."""
        fd = self.vmm_tap(name)
        self.fds.append(fd)
        return fd

    def vmm_tap(self, name: str) -> int:
        """A tap on the bridge for a VMM process to inherit; the caller closes its fd once
        the VMM has it, so the tap goes when that VMM exits (as the compute node's port)."""
        fd = native.open_tap(name, vnet_hdr=True)  # checksum offload and TSO, as a node's
        self.links.append(name)
        try:
            ip("link", "set", name, "master", self.bridge, "up")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def adopt_tap(self, name: str, timeout: float) -> None:
        """A tap another process creates (native.run --tap), put on the bridge once it is."""
        self.links.append(name)
        deadline = time.monotonic() + timeout
        while subprocess.run(
            ["ip", "link", "show", name], check=False, capture_output=True
        ).returncode:
            assert time.monotonic() < deadline, f"no tap {name} within {timeout}s"
            time.sleep(POLL_S)
        ip("link", "set", name, "master", self.bridge, "up")

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        for name in self.links:
            subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], check=False, capture_output=True)


def vmm_domain(path: Path, images: LinuxImages, net: Network, pids: list[int]) -> Domain:
    """A compute node VMM process booting Linux in `path` (`reboot`: restarted on reboot,
    with a NIC; `panic`: no NIC); its pid is added to `pids`."""
    path.mkdir()
    policy = {"on_reboot": "restart"} if path.name == "reboot" else {}
    tap = net.vmm_tap(f"{net.bridge}r") if path.name == "reboot" else None
    nics = [] if tap is None else [{"fd": tap, "mac": REBOOT_MAC}]
    try:
        write_config(
            path, images.vmlinuz, BASE_CMDLINE, initrd=str(images.initramfs),
            memory_mib=MEMORY_MIB, console_ring_bytes=1 << 20, nics=nics,
            on_poweroff="destroy", on_crash="preserve", **policy,
        )  # fmt: skip
        pid = spawn(path, timeout=SPAWN_TIMEOUT, pass_fds=[] if tap is None else [tap])
    finally:
        if tap is not None:
            os.close(tap)  # the VMM has its own
    pids.append(pid)
    return Domain(path, pid)


@pytest.fixture(scope="module")
def fleet(images: LinuxImages, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Four Linux guests booted at once, each at its shell prompt."""
    tmp = tmp_path_factory.mktemp("linux")
    assert images.initramfs is not None
    raw, ro = disk_file(tmp / "raw.img", 64), tmp / "ro.img"
    ro.write_bytes(b"read-only" * 1000 + b"\0" * (8 * MIB - 9000))
    ext4, flushed = disk_file(tmp / "ext4.img", 16), disk_file(tmp / "flushed.img", 16)
    net = Network()
    consoles: list[Console] = []
    machines: list[native.Machine] = []
    pids: list[int] = []
    run4: subprocess.Popen[bytes] | None = None
    try:
        # The VMM processes first: their Python start-up overlaps the other boots.
        domains = [vmm_domain(tmp / n, images, net, pids) for n in ("reboot", "panic")]
        console4 = Console()
        consoles.append(console4)
        run4 = subprocess.Popen(
            [
                sys.executable, "-m", "native.run",
                "--kernel", str(images.vmlinuz), "--initrd", str(images.initramfs),
                "--memory", str(MEMORY_MIB), "--vcpus", "4", "--disk", str(flushed),
                "--tap", f"{net.bridge}t4", "--cmdline", BASE_CMDLINE,
            ],
            stdin=console4.input_fd, stdout=console4.write_fd, stderr=subprocess.STDOUT,
        )  # fmt: skip
        console2 = Console()
        consoles.append(console2)
        machine = native.Machine(
            images.vmlinuz,
            initrd=images.initramfs,
            cmdline=BASE_CMDLINE,
            memory_mib=MEMORY_MIB,
            vcpus=2,
            console_out=console2.write_fd,
            console_in=console2.input_fd,
            disks=(
                Disk(str(raw), id="raw"),
                Disk(str(ro), read_only=True, id="ro"),
                Disk(str(ext4), id="fs"),
            ),
            nics=(Nic(tap_fd=net.tap_fd(f"{net.bridge}t2"), mac="52:54:00:77:00:02"),),
        )
        machines.append(machine)
        machine.start()
        net.adopt_tap(f"{net.bridge}t4", SPAWN_TIMEOUT)
        shell2, shell4 = LinuxShell(console2, machine), LinuxShell(console4)
        fleet = Fleet(
            shell2, shell4, run4, domains[0], domains[1], net.netns, raw, ro, ro.read_bytes(),
            ext4, flushed, machines, consoles, pids, net,
        )  # fmt: skip
        try:
            shell2.wait_shell(STALL_S)
            shell4.wait_shell(STALL_S)
            for d in domains:
                wait_log(d, re.escape(PROMPT), timeout=STALL_S)
        except pytest.fail.Exception as exc:
            pytest.fail(f"{exc}\n{stalled_fleet(machine, run4, console4, pids)}")
        yield fleet
    finally:
        for m in machines:
            m.stop()
            m.close()
        if run4 is not None and run4.poll() is None:
            os.kill(run4.pid, signal.SIGKILL)  # the VMM this fixture started
            run4.wait(10)
        for pid in pids:
            try:
                if reap(pid) is None:
                    os.kill(pid, signal.SIGKILL)  # only the VMMs this fixture spawned
                    wait_exit(pid, 5.0)
            except (ChildProcessError, ProcessLookupError):
                pass
        for c in consoles:
            c.close()
        net.close()


def test_console_and_a_clean_boot(fleet: Fleet) -> None:
    shell = fleet.shell2
    text = shell.console.text
    # Console: init's own output (tty writes, THRE interrupts) and a typed command's output.
    assert "flotilla-linux: modules " in text
    assert not re.search(r"flotilla-linux: (module \S+ absent|insmod \S+ failed)", text), text
    assert shell.check("echo typed-$((6 * 7))") == "typed-42"
    serial = shell.check("grep ttyS0 /proc/interrupts").split()
    assert sum(int(n) for n in serial[1:3]) > 0, serial  # one count per vCPU
    # A clean boot: CPUID leaf 0xD agrees with XCR0, the i8042 probes, no warning at all.
    # Only the lines that matter: the whole dmesg is slow to print through the L1.
    found = shell.check(
        "dmesg | grep -e 'XSAVE consistency problem' -e 'i8042: probe of i8042 failed'"
        " -e '\\[ cut here \\]' -e 'serio: i8042 KBD port'"
    )
    assert "serio: i8042 KBD port at 0x60,0x64 irq" in found, found
    assert len(found.splitlines()) == 1, found


def test_two_and_four_vcpus_all_online(fleet: Fleet) -> None:
    assert fleet.shell2.check("cat /sys/devices/system/cpu/online") == "0-1"
    assert fleet.shell4.check("cat /sys/devices/system/cpu/online") == "0-3"


def test_virtio_blk_direct_writes_and_a_read_only_disk(fleet: Fleet) -> None:
    shell = fleet.shell2
    # A pattern written with O_DIRECT and fsync is on the host file at once.
    vda = device_of(shell, "raw")
    shell.check(
        "yes flotilla-pattern | head -c 1048576 > /tmp/p && "
        f"dd if=/tmp/p of={vda} bs=65536 seek=16 oflag=direct conv=fsync"
    )
    expected = (PATTERN * (MIB // len(PATTERN) + 1))[:MIB]
    with fleet.raw.open("rb") as f:
        f.seek(MIB)
        assert f.read(MIB) == expected
    # A read-only disk: Linux sees it read-only and a direct write fails; the file is intact.
    vdb = device_of(shell, "ro")
    assert shell.check(f"cat /sys/block/{vdb[5:]}/ro") == "1"
    assert shell.check(f"dd if={vdb} bs=9 count=1 2>/dev/null") == "read-only"
    rc, out = shell.run(f"dd if=/dev/zero of={vdb} bs=4096 count=1 oflag=direct")
    assert rc != 0, out
    assert fleet.ro.read_bytes() == fleet.ro_before


def test_virtio_net_ping_and_a_checksummed_tcp_transfer(fleet: Fleet) -> None:
    a, b = fleet.shell2, fleet.shell4
    for i, shell in enumerate((a, b)):
        shell.check(f"ip addr add {SUBNET}.{i + 2}/24 dev eth0 && ip link set eth0 up")
    # Guest -> namespace, namespace -> guest, guest -> guest.
    a.check(f"ping -c 3 -W 10 {SUBNET}.1")
    ping = subprocess.run(
        ["ip", "netns", "exec", fleet.netns, "busybox", "ping", "-c", "3", "-W", "10",
         f"{SUBNET}.3"],
        check=False, capture_output=True, text=True,
    )  # fmt: skip
    assert ping.returncode == 0, ping.stdout + ping.stderr
    b.check(f"ping -c 3 -W 10 {SUBNET}.2")
    # 1 MiB from the namespace to guest A over TCP, checksummed on both ends.
    data = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(MIB // 32))
    # Its stdin not the tty: a background job reading the terminal (nc polls its stdin) is
    # stopped by SIGTTIN when the next typed line reaches the tty before the shell reads it.
    a.check("nc -l -p 5000 < /dev/null > /tmp/rx & echo listening")
    sender = (
        "import socket, sys, time\n"
        "data = sys.stdin.buffer.read()\n"
        "for _ in range(120):\n"
        "    try:\n"
        f"        s = socket.create_connection(('{SUBNET}.2', 5000), timeout=60)\n"
        "        break\n"
        "    except OSError:\n"
        "        time.sleep(0.5)\n"
        "s.sendall(data)\n"
        "s.close()\n"
    )
    sent = subprocess.run(
        ["ip", "netns", "exec", fleet.netns, sys.executable, "-c", sender],
        input=data, check=False, capture_output=True, timeout=COMMAND_TIMEOUT,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr.decode(errors="replace")
    a.check("wait")
    got = a.check("sha256sum /tmp/rx; wc -c < /tmp/rx; jobs")
    assert got.split()[0] == hashlib.sha256(data).hexdigest(), (got, len(data))
    # 2 MiB from guest B to the namespace over TCP: the guest's own segments (TSO and
    # checksum offload taken, its header passed to the tap), checksummed on both ends.
    receiver = (
        "import hashlib, socket\n"
        "srv = socket.create_server(('0.0.0.0', 5001))\n"
        "print('listening', flush=True)\n"
        "srv.settimeout(240)\n"
        "conn, _ = srv.accept()\n"
        "conn.settimeout(120)\n"
        "h, left = hashlib.sha256(), 2 << 20\n"
        "while left:\n"
        "    chunk = conn.recv(min(left, 1 << 16))\n"
        "    if not chunk:\n"
        "        break\n"
        "    h.update(chunk)\n"
        "    left -= len(chunk)\n"
        "conn.close()\n"
        "print(h.hexdigest(), left)\n"
    )
    listening = subprocess.Popen(
        ["ip", "netns", "exec", fleet.netns, sys.executable, "-c", receiver],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        b.check("dd if=/dev/urandom of=/tmp/tx bs=64k count=32 2>/dev/null && sync")
        sent_sum = b.check("sha256sum /tmp/tx").split()[0]
        # Not before the receiver listens: a Python start in the L1 can take seconds.
        assert listening.stdout is not None
        assert listening.stdout.readline().strip() == "listening", listening.poll()
        b.check(f"nc {SUBNET}.1 5001 < /tmp/tx")
        out, _ = listening.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        if listening.poll() is None:
            listening.kill()
            listening.wait()
    assert out.split() == [sent_sum, "0"], (out, sent_sum)


def test_a_flushed_write_survives_kill_9_of_the_vmm(fleet: Fleet) -> None:
    fleet.shell4.check(
        "yes flotilla-pattern | head -c 262144 > /tmp/p && "
        "dd if=/tmp/p of=/dev/vda bs=4096 oflag=direct conv=fsync"
    )
    os.kill(fleet.run4.pid, signal.SIGKILL)  # the VMM the fixture started
    assert fleet.run4.wait(10) == -signal.SIGKILL
    expected = (PATTERN * (262144 // len(PATTERN) + 1))[:262144]
    assert fleet.flushed.read_bytes()[:262144] == expected


def test_a_saved_and_restored_linux_keeps_its_shell_and_file_system(
    fleet: Fleet, tmp_path: Path
) -> None:
    # The compute node's save and restore (a new VMM process continues the machine);
    # the panic test then runs on the restored guest.
    # Lines short enough for the shell's 80 columns: a longer one comes back wrapped by the
    # line editor, never as the line typed, and type_line would wait for it in vain.
    d = fleet.vmm_panic
    type_line(d, "echo kept-$((6 * 7)) > /tmp/kept")
    type_line(d, "sha256sum /tmp/kept > /tmp/kept.sum")
    type_line(d, "echo saved-$((1 + 1))")
    wait_log(d, r"^saved-2\r?$", timeout=COMMAND_TIMEOUT)
    restored = save_and_restore(
        d, tmp_path / "state", tmp_path / "restored", fleet.vmm_pids, SPAWN_TIMEOUT
    )
    fleet.vmm_panic = restored
    type_line(restored, "sha256sum -c /tmp/kept.sum")
    type_line(restored, "cat /tmp/kept")
    type_line(restored, "echo restored-$((2 + 2))")
    text = wait_log(restored, r"^restored-4\r?$", timeout=COMMAND_TIMEOUT)
    assert re.search(r"^/tmp/kept: OK\r?$", text, re.MULTILINE), text
    assert re.search(r"^kept-42\r?$", text, re.MULTILINE), text
    assert "flotilla-linux: READY" not in text, text  # it went on; it did not boot again


def test_kernel_panic_is_a_crash(fleet: Fleet) -> None:
    d = fleet.vmm_panic
    # Not waited for as echoed: the echo is tty output, sent by the 8250's THRE interrupts
    # from the tty's buffer, and a panic right after the line ends stops the CPUs with it
    # still there (only printk reaches the console from a panicking kernel).
    type_line(d, "echo c > /proc/sysrq-trigger", echoed=False)
    crashed = d.wait_record("crashed", COMMAND_TIMEOUT)
    assert crashed["reason"] == "pvpanic"
    assert d.client.status().state == "crashed"  # on_crash=preserve
    assert "Kernel panic" in console_log(d)
    d.client.destroy()
    assert d.wait_exit() == 0


def uptime(d: Domain, tag: str) -> float:
    """The guest's /proc/uptime, printed by its shell after `tag-` (computed: the typed line
    has the command, not the number)."""
    type_line(d, f"echo {tag}-$(cut -d' ' -f1 /proc/uptime)")
    text = wait_log(d, rf"^{tag}-\d+\.\d+\r?$", timeout=COMMAND_TIMEOUT)
    found = re.search(rf"^{tag}-(\d+\.\d+)\r?$", text, re.MULTILINE)
    assert found is not None, text
    return float(found.group(1))


def incoming_vmm(d: Domain, into: Path, net: Network, pids: list[int]) -> tuple[Domain, int, str]:
    """The target of a live migration as the compute node prepares it (KvmDriver.
    prepare_incoming): a new VMM process with `d`'s vmm.json, its NIC re-plugged on a new
    tap on the same bridge with the same MAC, waiting with a one-time token on loopback.
    Returns it, its port and the token."""
    config = json.loads((d.path / CONFIG_FILE).read_text())
    token = secrets.token_hex(32)
    config["incoming"] = {
        "address": "127.0.0.1", "port": 0, "token": token, "paused": False, "timeout_s": 900.0,
    }  # fmt: skip
    into.mkdir()
    tap = net.vmm_tap(f"{net.bridge}m")
    try:
        config["nics"] = [{"fd": tap, "mac": nic["mac"]} for nic in config["nics"]]
        (into / CONFIG_FILE).write_text(json.dumps(config))
        pid = spawn(into, timeout=SPAWN_TIMEOUT, pass_fds=[tap])
    finally:
        os.close(tap)
    pids.append(pid)
    target = Domain(into, pid)
    port = target.client.status().incoming_port
    assert port is not None, target.kinds()
    assert target.kinds() == []  # nothing is journaled while it waits
    return target, port, token


def test_a_linux_guest_migrates_live_with_its_shell_and_a_running_ping(
    fleet: Fleet, tmp_path: Path
) -> None:
    # The compute node's live migration between two VMM processes (docs/migration.md, "The
    # control plane: the VMM and the driver"), over loopback: the reboot and power-button
    # tests then run on the target.
    d, net = fleet.vmm_reboot, fleet.net
    assert net is not None
    # The target first (a Python start in the L1): the ping need only span the migration.
    target, port, token = incoming_vmm(d, tmp_path / "target", net, fleet.vmm_pids)
    type_line(d, f"ip addr add {SUBNET}.5/24 dev eth0")
    type_line(d, "ip link set eth0 up")
    type_line(d, f"ping -c {PINGS} -i 0.2 {SUBNET}.1 > /tmp/p 2>&1 &")
    type_line(d, "sleep 3; echo replies-$(grep -c ttl= /tmp/p)")
    text = wait_log(d, r"^replies-\d+\r?$", timeout=COMMAND_TIMEOUT)
    found = re.search(r"^replies-(\d+)\r?$", text, re.MULTILINE)
    assert found is not None
    assert int(found.group(1)) > 0, text  # the ping runs before the switch
    before = uptime(d, "before")
    started = time.monotonic()
    reply = d.client.migrate_out(
        protocol.MigrateOut(
            address="127.0.0.1", port=port, token=token, timeout_s=600.0, timeout_action="pause"
        )
    )
    took = time.monotonic() - started
    assert reply.committed, reply
    assert reply.phase == "done", reply
    assert reply.error is None, reply
    print(
        f"migrated in {took:.1f} s: {reply.bytes_sent >> 20} MiB sent, "
        f"{reply.iteration} iterations, downtime {reply.downtime_ms} ms"
    )
    # The source VMM is gone; the target runs the guest on.
    assert d.wait_exit(COMMAND_TIMEOUT) == 0
    assert d.kinds()[-2:] == [("paused", "migrating", ""), ("stopped", "migrated", "")]
    with pytest.raises(VmmGone):
        VmmClient(d.path, timeout=1.0).status()
    fleet.vmm_reboot, fleet.reboot_boots = target, 0
    assert target.kinds() == [("started", "migrated", "")]
    # The same shell answers, computed there, and the guest's clock did not go back.
    type_line(target, "echo moved-$((6 * 7))")
    wait_log(target, r"^moved-42\r?$", timeout=COMMAND_TIMEOUT)
    after = uptime(target, "after")
    assert after >= before, (before, after)
    # The ping still runs after the switch (else it would not have crossed it).
    type_line(target, "echo running-$(grep -c ttl= /tmp/p)")
    text = wait_log(target, r"^running-\d+\r?$", timeout=COMMAND_TIMEOUT)
    found = re.search(r"^running-(\d+)\r?$", text, re.MULTILINE)
    assert found is not None
    assert int(found.group(1)) < PINGS, text
    # The ping that ran across the switch ends with at most a few replies lost.
    type_line(target, "wait; tail -n 2 /tmp/p")
    pattern = r"^(\d+) packets transmitted, (\d+) packets received"
    text = wait_log(target, pattern, timeout=COMMAND_TIMEOUT)
    found = re.search(pattern, text, re.MULTILINE)
    assert found is not None
    sent, received = int(found.group(1)), int(found.group(2))
    print(f"ping across the migration: {sent} sent, {sent - received} lost")
    assert sent == PINGS, text
    assert sent - received <= 5, text
    assert "flotilla-linux: READY" not in console_log(target), console_log(target)


def test_reboot_inside_linux_is_a_reboot(fleet: Fleet) -> None:
    # Linux's default path ends at the reset vector (docs/machine.md). The second boot runs
    # while the next test restarts another guest; the power-button test waits for it.
    d = fleet.vmm_reboot
    type_line(d, "reboot -f")
    rebooted = d.wait_record("rebooted", COMMAND_TIMEOUT)
    assert rebooted["detail"] == "guest"
    fleet.reboots += 1


def test_ext4_file_survives_a_restart(fleet: Fleet, images: LinuxImages) -> None:
    shell = fleet.shell2
    dev = device_of(shell, "fs")
    shell.check(f"mkfs.ext4 -q -F {dev}", timeout=2 * COMMAND_TIMEOUT)
    shell.check(f"mount -t ext4 {dev} /mnt && echo kept-$((20 + 22)) > /mnt/file && umount /mnt")
    shell.console.send(b"exit\n")
    shell.end(EventKind.POWEROFF)
    # A powered-off machine keeps its disks' locks until it is closed (docs/machine.md).
    assert shell.machine is not None
    fleet.machines.remove(shell.machine)
    shell.machine.close()
    # The host's own fsck finds a clean ext4 file system.
    fsck = subprocess.run(
        ["e2fsck", "-fn", str(fleet.ext4)], check=False, capture_output=True, text=True
    )
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # The guest again, on the same disk.
    console = Console()
    fleet.consoles.append(console)
    machine = native.Machine(
        images.vmlinuz,
        initrd=images.initramfs,
        cmdline=BASE_CMDLINE,
        memory_mib=MEMORY_MIB,
        console_out=console.write_fd,
        console_in=console.input_fd,
        disks=(Disk(str(fleet.ext4), id="fs"),),
    )
    fleet.machines.append(machine)
    machine.start()
    shell = LinuxShell(console, machine)
    shell.wait_shell()
    dev = device_of(shell, "fs")
    assert shell.check(f"mount -t ext4 {dev} /mnt && cat /mnt/file") == "kept-42"
    shell.check("umount /mnt")
    shell.console.send(b"exit\n")
    shell.end(EventKind.POWEROFF)


def test_acpi_power_button_powers_linux_off(fleet: Fleet) -> None:
    d = fleet.vmm_reboot
    # After the reboot test, this is Linux's second boot on the same VMM (the migration's
    # target: its console log has only the second).
    boots = fleet.reboot_boots + fleet.reboots
    wait_log(d, r"^flotilla-linux: READY", count=boots)
    wait_log(d, re.escape(PROMPT), count=boots, timeout=COMMAND_TIMEOUT)
    d.client.shutdown("acpi")
    assert d.wait_exit(COMMAND_TIMEOUT) == 0
    assert "flotilla-linux: power button" in console_log(d)
    assert d.kinds()[-2:] == [("shutdown", "acpi_s5", "host"), ("stopped", "shutdown", "poweroff")]
