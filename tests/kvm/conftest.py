"""Fixtures for tests that boot real guests on /dev/kvm.

Every test here is skipped, with the reason, only when KVM_CREATE_VM fails on this host.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import native

pytestmark = pytest.mark.kvm


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/kvm" in str(item.fspath):
            item.add_marker(pytest.mark.kvm)


@pytest.fixture(scope="session")
def kvm() -> None:
    reason = native.kvm_unavailable_reason()
    if reason is not None:
        pytest.skip(f"KVM unavailable: {reason}")


@pytest.fixture(scope="session")
def test_guest() -> Path:
    """The PVH test guest built from native/guest/ (docs/machine.md).

    FLOTILLA_TEST_GUEST names a prebuilt ELF instead (to try another build of it).
    """
    override = os.environ.get("FLOTILLA_TEST_GUEST")
    if override:
        return Path(override)
    try:
        from native import testguest
    except ImportError as exc:
        pytest.skip(f"native.testguest is not available: {exc}")
    return testguest.build()


class Console:
    """Collects a guest's COM1 output from a pipe on a thread; lets tests wait for lines."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        in_r, in_w = os.pipe()
        self.input_fd, self._input_w = in_r, in_w
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while True:
            try:
                chunk = os.read(self.read_fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            with self._cond:
                self._buf += chunk
                self._cond.notify_all()

    @property
    def text(self) -> str:
        with self._cond:
            return self._buf.decode(errors="replace")

    def send(self, data: bytes) -> None:
        os.write(self._input_w, data)

    def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Waits for a regex to match the output; fails the test with the output if not."""
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self._buf.decode(errors="replace"))
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no {pattern!r} within {timeout}s; console:\n{self.text}")
                self._cond.wait(left)

    def close(self) -> None:
        for fd in (self.write_fd, self.input_fd, self._input_w):
            os.close(fd)
        self._thread.join(timeout=5)
        os.close(self.read_fd)


class Booted:
    def __init__(self, machine: native.Machine, console: Console) -> None:
        self.machine = machine
        self.console = console


@pytest.fixture
def boot(kvm: None) -> Iterator[Callable[..., Booted]]:
    """Factory: boot(kernel, cmdline, vcpus=1, memory_mib=64) -> a started machine."""
    started: list[Booted] = []

    def _boot(kernel: Path, cmdline: str = "", *, vcpus: int = 1, memory_mib: int = 64,
              start: bool = True) -> Booted:
        console = Console()
        try:
            machine = native.Machine(kernel, cmdline=cmdline, vcpus=vcpus,
                                     memory_mib=memory_mib, console_out=console.write_fd,
                                     console_in=console.input_fd)
        except BaseException:
            console.close()
            raise
        booted = Booted(machine, console)
        started.append(booted)
        if start:
            machine.start()
        return booted

    yield _boot
    for b in started:
        b.machine.close()
        b.console.close()
