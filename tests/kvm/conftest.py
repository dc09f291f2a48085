"""Fixtures for tests that boot real guests on /dev/kvm.

Every test here is skipped, with the reason, only when KVM_CREATE_VM fails on this host.
"""

from __future__ import annotations

import importlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import native
from tests.kvm.harness import Booted, Console

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
        testguest = importlib.import_module("native.testguest")
    except ImportError as exc:
        pytest.skip(f"native.testguest is not available: {exc}")
    return Path(testguest.build())


@pytest.fixture
def boot(kvm: None) -> Iterator[Callable[..., Booted]]:
    """Factory: boot(kernel, cmdline, vcpus=1, memory_mib=64, initrd=None) -> a started
    machine."""
    started: list[Booted] = []

    def _boot(
        kernel: Path,
        cmdline: str = "",
        *,
        vcpus: int = 1,
        memory_mib: int = 64,
        start: bool = True,
        initrd: Path | None = None,
    ) -> Booted:
        console = Console()
        try:
            machine = native.Machine(
                kernel,
                initrd=initrd,
                cmdline=cmdline,
                vcpus=vcpus,
                memory_mib=memory_mib,
                console_out=console.write_fd,
                console_in=console.input_fd,
            )
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


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of this test's own (root only)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "flotilla-test", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)
