"""The whole control plane with a real Linux guest: `flotilla up`, then `flotilla create` of
Debian's cloud kernel with the test initramfs, as a user would run them; the guest has a
storage-service volume, on which it makes ext4 and finds its file after `flotilla start`.

Needs hardware virtualization (a full Linux boot): on hosts without vmx/svm these run in the
nested L1 (tests/hwvirt/, docs/testing.md), where `flotilla up` starts its own broker.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from native.images import QUICK_BOOT_ARGS, ImageError, LinuxImages, fetch_images
from services.broker import available as broker_available
from tests.e2e.harness import domain_events, ok, wait_console, wait_domain, wait_gone

UP_TIMEOUT = 900.0  # the API, scheduler and compute node, emulated in a busy L1
BOOT_TIMEOUT = 600.0  # Linux to READY through the whole stack, in a busy L1
COMMAND_TIMEOUT = 300.0
POLL_S = 2.0  # each API request costs the L1 CPU the guest needs
VOLUME_BYTES = 32 << 20
DISK_ID_LEN = 20  # a volume's virtio-blk serial: its uuid's first 20 characters
# integration: it needs a broker, which the harness forwards into the L1 from the host
# (Erlang does not start in the L1 in useful time).
pytestmark = [
    pytest.mark.hwvirt,
    pytest.mark.hwvirt_stack,
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.timeout(UP_TIMEOUT + 2 * BOOT_TIMEOUT + 3 * COMMAND_TIMEOUT + 120),
]


@dataclass
class Up:
    """A running `flotilla up` and a client on its API."""

    state_dir: Path
    info: dict[str, Any]
    proc: subprocess.Popen[str]
    client: httpx.Client

    def flotilla(self, *args: str, timeout: float = 2 * BOOT_TIMEOUT) -> str:
        """Runs the `flotilla` CLI against this stack; returns its stdout, fails on error."""
        done = subprocess.run(
            [sys.executable, "-m", "services.cli.main", "--state-dir", str(self.state_dir), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=cli_env(),
        )
        assert done.returncode == 0, f"flotilla {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout


@dataclass
class Linux:
    """The module's one Linux guest and its storage volume, shared by the tests in order."""

    domain: dict[str, Any] = field(default_factory=dict)
    volume: dict[str, Any] = field(default_factory=dict)
    file_sum: str = ""


class FollowShell:
    """The guest's shell through `flotilla console DOMAIN --follow` (the API's WebSocket)."""

    def __init__(self, up: Up, name: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "services.cli.main", "--state-dir", str(up.state_dir),
                "console", name, "--follow",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cli_env(),
        )  # fmt: skip
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.out = b""
        self.commands = 0

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\r")
        self.proc.stdin.flush()

    def wait_for(
        self, pattern: bytes, timeout: float, retype: str | None = None
    ) -> re.Match[bytes]:
        """Reads until `pattern` is in the output; types `retype` every 30 s meanwhile (the
        CLI attaches only after its slow start-up, and Linux may still be booting)."""
        assert self.proc.stdout is not None
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        next_try = 0.0
        while (found := rx.search(self.out)) is None:
            if self.proc.poll() is not None:
                assert self.proc.stderr is not None
                pytest.fail(f"the console CLI ended: {self.out!r} {self.proc.stderr.read()!r}")
            assert time.monotonic() < deadline, self.out[-1500:]
            if retype is not None and time.monotonic() >= next_try:
                self.send(retype)
                next_try = time.monotonic() + 30
            chunk = self.proc.stdout.read()
            if chunk:
                self.out += chunk
            else:
                time.sleep(0.2)
        return found

    def check(self, command: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Runs `command`; returns what came after the typed line, fails unless it exits 0.
        The end marker is computed by the shell, so the echoed line never matches it."""
        self.commands += 1
        n, start = self.commands, len(self.out)
        self.send(f'{command}; echo "=$(({n}))= rc=$?"')
        found = self.wait_for(rb"^=%d= rc=(\d+)\r?$" % n, timeout)
        text = self.out[start : found.start()].decode(errors="replace")
        assert found.group(1) == b"0", f"{command!r} failed ({found.group(1)!r}):\n{text}"
        return text

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)  # the CLI this test started
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def cli_env() -> dict[str, str]:
    # The state dir's URL and token, never a caller's settings; the broker is the caller's
    # when it names one (in the L1: the host's, forwarded), else `flotilla up` starts its own.
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FLOTILLA_") or k == "FLOTILLA_AMQP_URL"
    }


@pytest.fixture(scope="module")
def images() -> LinuxImages:
    try:
        return fetch_images(initramfs=True)
    except ImageError as exc:
        pytest.fail(f"cannot fetch the Linux guest images: {exc}", pytrace=False)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    assert broker_available() or os.environ.get("FLOTILLA_AMQP_URL"), (
        "flotilla up needs rabbitmq-server: apt-get install rabbitmq-server"
    )
    state = tmp_path_factory.mktemp("up")
    log = (state.parent / "up.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "services.cli.main", "up", "--json",
            "--state-dir", str(state), "--listen", "127.0.0.1:0", "--host", "hwvirt-l1",
            "--timeout", str(UP_TIMEOUT),
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        # A VMM's Python starts in seconds in the L1, not milliseconds.
        env={**cli_env(), "FLOTILLA_VMM_SPAWN_TIMEOUT_S": str(BOOT_TIMEOUT)},
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        started = time.monotonic()
        line = proc.stdout.readline()
        assert line, f"flotilla up ended: {(state.parent / 'up.log').read_text()}" + "".join(
            f"\n--- {f.name} ---\n{f.read_text()[-3000:]}" for f in state.glob("logs/*.log")
        )
        print(f"flotilla up ready in {time.monotonic() - started:.1f} s")
        info = json.loads(line)
        with httpx.Client(
            base_url=info["api_url"],
            headers={"Authorization": f"Bearer {info['token']}"},
            timeout=60,
        ) as client:
            yield Up(state, info, proc, client)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def linux() -> Linux:
    return Linux()


def create_linux(
    up: Up, images: LinuxImages, cmdline: str, vcpus: int, volume_id: str
) -> dict[str, Any]:
    """`flotilla create` with the volume as disk vdb (the spec's `disks`, through `-f`)."""
    assert images.initramfs is not None
    name = f"linux-{uuid.uuid4().hex[:6]}"
    spec = up.state_dir.parent / f"{name}.json"
    spec.write_text(json.dumps({"disks": [{"target": "vdb", "volume_id": volume_id}]}))
    up.flotilla(
        "create", "-f", str(spec), "--name", name, "--vcpus", str(vcpus), "--memory", "256",
        "--kernel", str(images.vmlinuz), "--initrd", str(images.initramfs),
        "--cmdline", cmdline, "--timeout", str(BOOT_TIMEOUT),
    )  # fmt: skip
    found = [d for d in ok(up.client.get("/v1/domains"), 200)["domains"] if d["name"] == name]
    assert len(found) == 1, found
    return dict(found[0])


def volume_device(volume_id: str) -> str:
    """A shell expression for the volume's /dev/vdX, found by its virtio-blk serial."""
    serial = volume_id[:DISK_ID_LEN]
    return f"/dev/$(grep -lx {serial} /sys/block/vd*/serial | cut -d/ -f4)"


def test_flotilla_create_boots_linux_and_console_follow_is_its_shell(
    up: Up, images: LinuxImages, linux: Linux
) -> None:
    # One Linux boot for all of it (minutes in the L1): READY through the API's console, an
    # interactive shell through `flotilla console --follow`, ext4 made on a storage-service
    # volume attached at create, then the shell's `exit` powers Linux off.
    linux.volume = ok(
        up.client.post(
            "/v1/volumes", json={"name": f"ext4-{uuid.uuid4().hex[:6]}", "size": VOLUME_BYTES}
        ),
        201,
    )
    started = time.monotonic()
    d = create_linux(
        up,
        images,
        f"console=ttyS0 panic=-1 flotilla.shell {QUICK_BOOT_ARGS}",
        vcpus=2,
        volume_id=linux.volume["id"],
    )
    linux.domain = d
    console = wait_console(
        up.client, d["id"], "flotilla-linux: shell", timeout=BOOT_TIMEOUT, interval=POLL_S
    )
    print(f"flotilla create to the shell in {time.monotonic() - started:.1f} s")
    assert "flotilla-linux: READY" in console
    assert not re.search(r"flotilla-linux: (module \S+ absent|insmod \S+ failed)", console)
    shell = FollowShell(up, d["name"])
    try:
        # The shell computes the answer: what comes back is its output, not our echo.
        shell.wait_for(rb"flotilla-42-shell", BOOT_TIMEOUT, retype="echo flotilla-$((6 * 7))-shell")
        # ext4 on the volume: a file and its sha256 on it.
        dev = volume_device(linux.volume["id"])
        started = time.monotonic()
        shell.check(f"mkfs.ext4 -q -F {dev}", timeout=3 * COMMAND_TIMEOUT)
        shell.check(
            f"mount -t ext4 {dev} /mnt && echo volume-$((40 + 2)) > /mnt/file && "
            "sha256sum /mnt/file > /mnt/file.sum"
        )
        out = shell.check("cat /mnt/file.sum && umount /mnt")
        found = re.search(r"^([0-9a-f]{64})  /mnt/file\r?$", out, re.MULTILINE)
        assert found is not None, out
        assert found.group(1) == hashlib.sha256(b"volume-42\n").hexdigest()
        linux.file_sum = found.group(1)
        print(f"mkfs.ext4, a file and its sum on the volume in {time.monotonic() - started:.1f} s")
        shell.send("exit")
        # The initramfs powers the guest off when its shell ends; the domain stays defined.
        wait_domain(up.client, d["id"], "shutoff", timeout=COMMAND_TIMEOUT, interval=POLL_S)
    finally:
        shell.close()
    expected = [
        ("domain.defined", "added"),
        ("domain.started", "booted"),
        ("domain.shutdown", "guest"),
        ("domain.stopped", "shutdown"),
    ]
    assert domain_events(up.client, d["id"], until=len(expected)) == expected


def test_ext4_on_a_storage_volume_survives_flotilla_start(up: Up, linux: Linux) -> None:
    # The guest powered off by itself above; started again, it mounts the volume and finds
    # its file and the file's sum.
    d, volume = linux.domain, linux.volume
    assert d, "the create test did not create the domain"
    assert linux.file_sum, "the create test did not write the file"
    started = time.monotonic()
    up.flotilla("start", d["name"], "--timeout", str(BOOT_TIMEOUT))
    shell = FollowShell(up, d["name"])
    try:
        shell.wait_for(rb"flotilla-49-again", BOOT_TIMEOUT, retype="echo flotilla-$((7 * 7))-again")
        print(f"flotilla start to the shell in {time.monotonic() - started:.1f} s")
        dev = volume_device(volume["id"])
        out = shell.check(
            f"mount -t ext4 {dev} /mnt && cat /mnt/file.sum && sha256sum -c /mnt/file.sum && "
            "cat /mnt/file && umount /mnt"
        )
        assert re.search(rf"^{linux.file_sum}  /mnt/file\r?$", out, re.MULTILINE), out
        assert re.search(r"^/mnt/file: OK\r?$", out, re.MULTILINE), out
        assert re.search(r"^volume-42\r?$", out, re.MULTILINE), out
        shell.send("exit")
        wait_domain(up.client, d["id"], "shutoff", timeout=COMMAND_TIMEOUT, interval=POLL_S)
    finally:
        shell.close()
    events = domain_events(up.client, d["id"], until=7)
    assert events[4:] == [
        ("domain.started", "booted"),
        ("domain.shutdown", "guest"),
        ("domain.stopped", "shutdown"),
    ], events
    ok(up.client.delete(f"/v1/domains/{d['id']}"), (200, 202, 204))
    wait_gone(up.client, d["id"])
    # The volume outlives the domain (it was attached, not made for it), then detached.
    deadline = time.monotonic() + COMMAND_TIMEOUT
    while (got := ok(up.client.get(f"/v1/volumes/{volume['id']}"), 200))["attachment"]:
        assert time.monotonic() < deadline, got
        time.sleep(POLL_S)
    ok(up.client.delete(f"/v1/volumes/{volume['id']}"), 204)
