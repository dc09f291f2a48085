"""The whole control plane with a real Linux guest: `flotilla up`, then `flotilla create` of
Debian's cloud kernel with the test initramfs, as a user would run them.

Needs hardware virtualization (a full Linux boot): on hosts without vmx/svm these run in the
nested L1 (tests/hwvirt/, docs/testing.md), where `flotilla up` starts its own broker.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
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
# integration: it needs a broker, which the harness forwards into the L1 from the host
# (Erlang does not start in the L1 in useful time).
pytestmark = [
    pytest.mark.hwvirt,
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.timeout(UP_TIMEOUT + 2 * BOOT_TIMEOUT + COMMAND_TIMEOUT + 120),
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


def create_linux(up: Up, images: LinuxImages, cmdline: str, vcpus: int) -> dict[str, Any]:
    assert images.initramfs is not None
    name = f"linux-{uuid.uuid4().hex[:6]}"
    up.flotilla(
        "create", "--name", name, "--vcpus", str(vcpus), "--memory", "256",
        "--kernel", str(images.vmlinuz), "--initrd", str(images.initramfs),
        "--cmdline", cmdline, "--timeout", str(BOOT_TIMEOUT),
    )  # fmt: skip
    found = [d for d in ok(up.client.get("/v1/domains"), 200)["domains"] if d["name"] == name]
    assert len(found) == 1, found
    return dict(found[0])


def test_flotilla_create_boots_linux_and_console_follow_is_its_shell(
    up: Up, images: LinuxImages
) -> None:
    # One Linux boot for both (minutes in the L1): READY through the API's console, an
    # interactive shell through `flotilla console --follow`, whose `exit` powers Linux off.
    started = time.monotonic()
    d = create_linux(
        up, images, f"console=ttyS0 panic=-1 flotilla.shell {QUICK_BOOT_ARGS}", vcpus=2
    )
    console = wait_console(
        up.client, d["id"], "flotilla-linux: shell", timeout=BOOT_TIMEOUT, interval=POLL_S
    )
    print(f"flotilla create to the shell in {time.monotonic() - started:.1f} s")
    assert "flotilla-linux: READY" in console
    assert not re.search(r"flotilla-linux: (module \S+ absent|insmod \S+ failed)", console)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "services.cli.main", "--state-dir", str(up.state_dir),
            "console", d["name"], "--follow",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )  # fmt: skip
    try:
        assert proc.stdin is not None
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        # The shell computes the answer: what comes back is its output, not our echo. Typed
        # again until it answers: the CLI attaches only after its (slow) start-up.
        out = b""
        deadline = time.monotonic() + BOOT_TIMEOUT
        next_try = 0.0
        while b"flotilla-42-shell" not in out:
            assert proc.poll() is None, (out, proc.stderr.read() if proc.stderr else b"")
            assert time.monotonic() < deadline, out[-500:]
            if time.monotonic() >= next_try:
                proc.stdin.write(b"echo flotilla-$((6 * 7))-shell\r")
                proc.stdin.flush()
                next_try = time.monotonic() + 30
            chunk = proc.stdout.read()
            if chunk:
                out += chunk
            else:
                time.sleep(0.2)
        proc.stdin.write(b"exit\r")
        proc.stdin.flush()
        # The initramfs powers the guest off when its shell ends; the domain stays defined.
        wait_domain(up.client, d["id"], "shutoff", timeout=COMMAND_TIMEOUT, interval=POLL_S)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)  # the CLI this test started
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
    expected = [
        ("domain.defined", "added"),
        ("domain.started", "booted"),
        ("domain.shutdown", "guest"),
        ("domain.stopped", "shutdown"),
    ]
    assert domain_events(up.client, d["id"], until=len(expected)) == expected
    ok(up.client.delete(f"/v1/domains/{d['id']}"), (200, 202, 204))
    wait_gone(up.client, d["id"])
