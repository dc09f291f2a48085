"""Debian's cloud kernel with the project's initramfs on our VMM, where KVM has hardware
virtualization (docs/images.md): console, SMP, virtio-blk, power button, reboot and panic.

Each test boots Linux with `flotilla.shell`, so init runs a shell on COM1 and the test types
commands into it (the UART's receive interrupt) and reads their output (its THRE interrupt).
On a host without vmx/svm they run in the nested L1 (tests/hwvirt/, docs/testing.md).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import native
from compute_node.vmm_client import reap, spawn, wait_exit
from compute_node.vmm_proto import CONSOLE_LOG
from native.images import ImageError, LinuxImages, fetch_images
from native.machine import Disk, Event, EventKind, Nic
from tests.kvm.harness import Console
from tests.kvm.test_vmm_process import Domain, write_config

# Each test boots Linux once or twice: ~1-3 minutes each in the nested L1.
pytestmark = [pytest.mark.hwvirt, pytest.mark.slow, pytest.mark.timeout(2400)]

MIB = 1 << 20
MEMORY_MIB = 256
BOOT_TIMEOUT = 900.0  # ~1 minute in the nested L1 on a quiet host, many on a busy one
COMMAND_TIMEOUT = 300.0
SPAWN_TIMEOUT = 120.0  # Python starts slowly in the emulated L1
PROMPT = "flotilla-linux# "
# quiet: every console byte Linux prints is a port exit, and those are slow in the L1.
BASE_CMDLINE = "console=ttyS0 quiet flotilla.shell"
PATTERN = b"flotilla-pattern\n"


@pytest.fixture(scope="module")
def images() -> LinuxImages:
    try:
        found = fetch_images(initramfs=True)
    except ImageError as exc:
        pytest.fail(f"cannot fetch the Linux guest images: {exc}", pytrace=False)
    assert found.initramfs is not None
    return found


class LinuxShell:
    """A Linux guest booted into the initramfs shell, driven through its console."""

    def __init__(self, machine: native.Machine, console: Console) -> None:
        self.machine = machine
        self.console = console
        self.commands = 0

    def wait_shell(self) -> None:
        self.console.wait_for(r"^flotilla-linux: READY", BOOT_TIMEOUT)
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
        end = self.console.wait_for(rf"^>{n}> rc=(\d+)\r?$", timeout)
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
        event = self.machine.wait_event(timeout)
        text = self.console.drain()
        assert event is not None, f"no event within {timeout}s; console:\n{text}"
        assert event.kind is kind, f"{event}; console:\n{text}"
        return event


@pytest.fixture
def boot_linux(images: LinuxImages) -> Iterator[Callable[..., LinuxShell]]:
    started: list[tuple[native.Machine, Console]] = []

    def _boot(
        *,
        vcpus: int = 1,
        disks: tuple[Disk, ...] = (),
        nics: tuple[Nic, ...] = (),
        cmdline: str = "",
    ) -> LinuxShell:
        console = Console()
        try:
            machine = native.Machine(
                images.vmlinuz,
                initrd=images.initramfs,
                cmdline=f"{BASE_CMDLINE} {cmdline}".strip(),
                memory_mib=MEMORY_MIB,
                vcpus=vcpus,
                console_out=console.write_fd,
                console_in=console.input_fd,
                disks=disks,
                nics=nics,
            )
        except BaseException:
            console.close()
            raise
        started.append((machine, console))
        machine.start()
        shell = LinuxShell(machine, console)
        shell.wait_shell()
        return shell

    yield _boot
    for machine, console in started:
        machine.stop()
        machine.close()
        console.close()


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


def test_console_smp_and_disks(boot_linux: Callable[..., LinuxShell], tmp_path: Path) -> None:
    raw = disk_file(tmp_path / "raw.img", 64)
    ro = disk_file(tmp_path / "ro.img", 8)
    ro.write_bytes(b"read-only" * 1000 + b"\0" * (8 * MIB - 9000))
    ro_before = ro.read_bytes()
    shell = boot_linux(
        vcpus=2,
        disks=(Disk(str(raw), id="raw"), Disk(str(ro), read_only=True, id="ro")),
    )
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
    # SMP: both vCPUs online.
    assert shell.check("cat /sys/devices/system/cpu/online") == "0-1"
    # virtio-blk: a pattern written with O_DIRECT and fsync is on the host file at once.
    vda = device_of(shell, "raw")
    shell.check(
        "yes flotilla-pattern | head -c 1048576 > /tmp/p && "
        f"dd if=/tmp/p of={vda} bs=65536 seek=16 oflag=direct conv=fsync"
    )
    expected = (PATTERN * (MIB // len(PATTERN) + 1))[:MIB]
    with raw.open("rb") as f:
        f.seek(MIB)
        assert f.read(MIB) == expected
    # A read-only disk: Linux sees it read-only and a direct write fails; the file is intact.
    vdb = device_of(shell, "ro")
    assert shell.check(f"cat /sys/block/{vdb[5:]}/ro") == "1"
    assert shell.check(f"dd if={vdb} bs=9 count=1 2>/dev/null") == "read-only"
    rc, out = shell.run(f"dd if=/dev/zero of={vdb} bs=4096 count=1 oflag=direct")
    assert rc != 0, out
    shell.console.send(b"exit\n")
    shell.end(EventKind.POWEROFF)
    assert ro.read_bytes() == ro_before


def test_ext4_file_survives_a_restart_and_four_vcpus_come_up(
    boot_linux: Callable[..., LinuxShell], tmp_path: Path
) -> None:
    image = disk_file(tmp_path / "ext4.img", 16)
    shell = boot_linux(vcpus=1, disks=(Disk(str(image), id="fs"),))
    dev = device_of(shell, "fs")
    shell.check(f"mkfs.ext4 -q -F {dev}", timeout=3 * COMMAND_TIMEOUT)  # ~2 MiB of metadata
    shell.check(f"mount -t ext4 {dev} /mnt && echo kept-$((20 + 22)) > /mnt/file && umount /mnt")
    shell.console.send(b"exit\n")
    shell.end(EventKind.POWEROFF)
    # The host's own fsck finds a clean ext4 file system.
    fsck = subprocess.run(
        ["e2fsck", "-fn", str(image)], check=False, capture_output=True, text=True
    )
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    shell = boot_linux(vcpus=4, disks=(Disk(str(image), id="fs"),))
    assert shell.check("cat /sys/devices/system/cpu/online") == "0-3"
    dev = device_of(shell, "fs")
    assert shell.check(f"mount -t ext4 {dev} /mnt && cat /mnt/file") == "kept-42"
    shell.check("umount /mnt")
    shell.console.send(b"exit\n")
    shell.end(EventKind.POWEROFF)


def test_a_flushed_write_survives_kill_9_of_the_vmm(images: LinuxImages, tmp_path: Path) -> None:
    image = disk_file(tmp_path / "d.img", 16)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "native.run",
            "--kernel", str(images.vmlinuz), "--initrd", str(images.initramfs),
            "--memory", str(MEMORY_MIB), "--disk", str(image),
            "--cmdline", BASE_CMDLINE,
        ],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdin is not None
    assert proc.stdout is not None
    out = b""
    try:
        out = read_until(proc, PROMPT.encode(), BOOT_TIMEOUT)
        proc.stdin.write(
            b"yes flotilla-pattern | head -c 262144 > /tmp/p && "
            b"dd if=/tmp/p of=/dev/vda bs=4096 oflag=direct conv=fsync && echo FLUSHED-$((1+1))\n"
        )
        proc.stdin.flush()
        out += read_until(proc, b"FLUSHED-2\r\n", COMMAND_TIMEOUT)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the VMM this test started
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    expected = (PATTERN * (262144 // len(PATTERN) + 1))[:262144]
    assert image.read_bytes()[:262144] == expected, out.decode(errors="replace")


def read_until(proc: subprocess.Popen[bytes], marker: bytes, timeout: float) -> bytes:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    buf = b""
    deadline = time.monotonic() + timeout
    while marker not in buf:
        if time.monotonic() > deadline or proc.poll() is not None:
            pytest.fail(f"no {marker!r} within {timeout}s; output:\n{buf.decode(errors='replace')}")
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.1)
            continue
        buf += chunk
    return buf


# The per-guest VMM process (compute_node.vmm), as the compute node runs it: its journal is
# what becomes domain.shutdown / domain.rebooted / domain.crashed.


@pytest.fixture
def start_linux_vmm(images: LinuxImages, tmp_path: Path) -> Iterator[Callable[..., Domain]]:
    pids: list[int] = []

    def _start(name: str, cmdline: str = BASE_CMDLINE, **overrides: Any) -> Domain:
        path = tmp_path / name
        path.mkdir()
        write_config(
            path,
            images.vmlinuz,
            cmdline,
            initrd=str(images.initramfs),
            memory_mib=MEMORY_MIB,
            console_ring_bytes=1 << 20,
            **overrides,
        )
        pid = spawn(path, timeout=SPAWN_TIMEOUT)
        pids.append(pid)
        return Domain(path, pid)

    yield _start
    for pid in pids:
        try:
            if reap(pid) is None:
                os.kill(pid, signal.SIGKILL)  # only the VMMs this test spawned
                wait_exit(pid, 5.0)
        except (ChildProcessError, ProcessLookupError):
            pass


def type_line(d: Domain, line: str) -> None:
    """Types a line on the console; returns once the shell echoed it."""
    with d.client.attach() as stream:
        stream.settimeout(COMMAND_TIMEOUT)
        stream.sendall(line.encode() + b"\n")
        got = b""
        while line.encode() not in got:
            chunk = stream.recv(4096)
            assert chunk, f"attach stream closed; got {got!r}"
            got += chunk


def test_acpi_shutdown_powers_linux_off(start_linux_vmm: Callable[..., Domain]) -> None:
    d = start_linux_vmm("acpi", on_poweroff="destroy")
    d.wait_console(re.escape(PROMPT), timeout=BOOT_TIMEOUT)
    d.client.shutdown("acpi")
    assert d.wait_exit(COMMAND_TIMEOUT) == 0
    assert "flotilla-linux: power button" in (d.path / CONSOLE_LOG).read_text(errors="replace")
    assert d.kinds()[1:] == [("shutdown", "acpi_s5", "host"), ("stopped", "shutdown", "poweroff")]


def test_reboot_inside_linux_is_a_reboot(start_linux_vmm: Callable[..., Domain]) -> None:
    d = start_linux_vmm("reboot", on_reboot="restart")
    d.wait_console(re.escape(PROMPT), timeout=BOOT_TIMEOUT)
    type_line(d, "reboot -f")
    rebooted = d.wait_record("rebooted", COMMAND_TIMEOUT)
    assert rebooted["detail"] == "guest"
    d.wait_console("flotilla-linux: READY", count=2, timeout=BOOT_TIMEOUT)
    d.client.destroy()
    assert d.wait_exit() == 0


def test_kernel_panic_is_a_crash(start_linux_vmm: Callable[..., Domain]) -> None:
    d = start_linux_vmm("panic", on_crash="preserve")
    d.wait_console(re.escape(PROMPT), timeout=BOOT_TIMEOUT)
    type_line(d, "echo c > /proc/sysrq-trigger")
    crashed = d.wait_record("crashed", COMMAND_TIMEOUT)
    assert crashed["reason"] == "pvpanic"
    assert d.client.status()["state"] == "crashed"
    assert "Kernel panic" in d.console_text()
    d.client.destroy()
    assert d.wait_exit() == 0


# virtio-net: two Linux guests and a namespace of the test's own on one bridge, over taps.
SUBNET = "10.77.0"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def bridge_with_namespace() -> Iterator[tuple[str, str]]:
    """(bridge, netns): a bridge with a veth into a fresh netns at SUBNET.1; all removed."""
    tag = f"{os.getpid() % 100000}"
    br, ns, veth = f"flbr{tag}", f"flns{tag}", f"flv{tag}"
    ip("netns", "add", ns)
    try:
        ip("link", "add", br, "type", "bridge")
        ip("link", "set", br, "up")
        ip("link", "add", f"{veth}h", "type", "veth", "peer", "name", f"{veth}n")
        ip("link", "set", f"{veth}h", "master", br, "up")
        ip("link", "set", f"{veth}n", "netns", ns)
        ip("-n", ns, "addr", "add", f"{SUBNET}.1/24", "dev", f"{veth}n")
        ip("-n", ns, "link", "set", f"{veth}n", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        yield br, ns
    finally:
        for name in (f"{veth}h", br):
            subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


@pytest.fixture
def taps(bridge_with_namespace: tuple[str, str]) -> Iterator[list[int]]:
    """Two taps on the bridge, opened for the guests; deleted afterwards."""
    br, _ = bridge_with_namespace
    names = [f"{br}t{i}" for i in range(2)]
    fds: list[int] = []
    try:
        for name in names:
            fds.append(native.open_tap(name))
            ip("link", "set", name, "master", br, "up")
        yield fds
    finally:
        for fd in fds:
            os.close(fd)
        for name in names:
            subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)


def test_virtio_net_ping_and_a_checksummed_tcp_transfer(
    boot_linux: Callable[..., LinuxShell],
    bridge_with_namespace: tuple[str, str],
    taps: list[int],
) -> None:
    _, ns = bridge_with_namespace
    guests = [
        boot_linux(nics=(Nic(tap_fd=fd, mac=f"52:54:00:77:00:0{i + 2}"),))
        for i, fd in enumerate(taps)
    ]
    for i, shell in enumerate(guests):
        shell.check(f"ip addr add {SUBNET}.{i + 2}/24 dev eth0 && ip link set eth0 up")
    # Guest -> namespace, namespace -> guest, guest -> guest.
    shell_a, shell_b = guests
    shell_a.check(f"ping -c 3 -W 10 {SUBNET}.1", timeout=COMMAND_TIMEOUT)
    ping = subprocess.run(
        ["ip", "netns", "exec", ns, "busybox", "ping", "-c", "3", "-W", "10", f"{SUBNET}.3"],
        check=False, capture_output=True, text=True,
    )  # fmt: skip
    assert ping.returncode == 0, ping.stdout + ping.stderr
    shell_b.check(f"ping -c 3 -W 10 {SUBNET}.2")
    # 1 MiB from the namespace to guest A over TCP, checksummed on both ends.
    data = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(MIB // 32))
    shell_a.check("nc -l -p 5000 > /tmp/rx & echo listening")
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
        ["ip", "netns", "exec", ns, sys.executable, "-c", sender],
        input=data, check=False, capture_output=True, timeout=COMMAND_TIMEOUT,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr.decode(errors="replace")
    shell_a.check("wait")
    got = shell_a.check("sha256sum /tmp/rx")
    assert got.split()[0] == hashlib.sha256(data).hexdigest(), got
    for shell in guests:
        shell.console.send(b"exit\n")
        shell.end(EventKind.POWEROFF)
