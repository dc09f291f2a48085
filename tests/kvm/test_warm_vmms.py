"""Warm VMMs on real guests (docs/compute.md, "Warm VMMs"): a start and a restore through the
KVM driver run on the spare it kept, and the guest runs; a killed spare costs one cold start
and is replaced; a driver that takes over a state dir ends the spare its predecessor left and
adopts the VMM a spare became like any other."""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from compute_node.boot_sources import BootFiles, HostFile
from compute_node.driver import GuestEvent
from compute_node.kvm import KvmDriver
from protos.domain import BootSpec, DomainSpec, PowerState


class Node:
    def __init__(self, domains: Path, guest: Path, warm_vmms: int = 1) -> None:
        self.driver = KvmDriver(domains, warm_vmms=warm_vmms)
        self.events: list[GuestEvent] = []
        self.driver.set_event_sink(self.events.append)
        self.guest = guest
        self.files: list[BootFiles] = []

    def boot_files(self) -> BootFiles:
        fd = os.open(self.guest, os.O_RDONLY | os.O_CLOEXEC)
        files = BootFiles([HostFile("boot.kernel", str(self.guest), fd)])
        self.files.append(files)
        return files

    def spare(self, not_: int | None = None) -> int:
        """The pid of its ready spare (another than `not_`)."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pids = self.driver.warm.pids()
            if pids and pids[0] != not_:
                return pids[0]
            time.sleep(0.01)
        raise AssertionError("no spare VMM got ready")

    def wait_console(self, domain_id: uuid.UUID, pattern: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.driver.console(domain_id, 1 << 20)[0].decode(errors="replace")
            if re.search(pattern, text):
                return text
            time.sleep(0.01)
        raise AssertionError(f"no {pattern!r} on the console")

    def close(self) -> None:
        for domain_id in {e.domain_id for e in self.events}:
            if self.driver.get_info(domain_id).state is not PowerState.SHUTOFF:
                self.driver.destroy(domain_id)
        self.driver.close()
        for files in self.files:
            files.close()


def spec_of(guest: Path, cmdline: str = "ready counter") -> DomainSpec:
    return DomainSpec.model_validate(
        {
            "name": f"w-{uuid.uuid4().hex[:8]}",
            "boot": BootSpec(kernel=str(guest), cmdline=cmdline),
            "memory_mib": 32,
            "vcpus": 1,
        }
    )


def gone(pid: int, timeout: float = 5.0) -> bool:
    """Whether `pid` has exited (a zombie counts) within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


@pytest.fixture
def nodes(kvm: None, test_guest: Path, tmp_path: Path) -> Iterator[Callable[..., Node]]:
    made: list[Node] = []

    def make(warm_vmms: int = 1) -> Node:
        node = Node(tmp_path / "domains", test_guest, warm_vmms)
        made.append(node)
        return node

    yield make
    for node in reversed(made):
        node.close()


def test_a_start_and_a_restore_run_on_spares(
    nodes: Callable[..., Node], test_guest: Path, tmp_path: Path
) -> None:
    node = nodes()
    spare = node.spare()
    spec = spec_of(test_guest)
    info = node.driver.spawn(spec, node.boot_files())
    assert info.pid == spare
    assert info.state is PowerState.RUNNING
    node.wait_console(spec.uuid, r"COUNTER 3\b")
    assert [(e.kind.value, e.detail) for e in node.events] == [("started", "booted")]
    # The next spare comes once the start returned; the restore runs on it.
    second = node.spare(not_=spare)
    state = tmp_path / "saved"
    state.mkdir()
    node.driver.save(spec.uuid, state)
    restored = node.driver.restore(spec, node.boot_files(), state)
    assert restored.pid == second
    assert restored.state is PowerState.RUNNING
    text = node.wait_console(spec.uuid, r"COUNTER \d+\b(.|\n)*COUNTER \d+\b(.|\n)*COUNTER")
    assert text.count("READY") <= 1  # counted on, no second boot
    assert node.events[-1].kind.value == "started"
    assert node.events[-1].detail == "restored"
    assert (node.driver.warm.warm_starts, node.driver.warm.cold_starts) == (2, 0)


def test_a_killed_spare_costs_one_cold_start_and_is_replaced(
    nodes: Callable[..., Node], test_guest: Path
) -> None:
    node = nodes()
    spare = node.spare()
    os.kill(spare, signal.SIGKILL)
    spec = spec_of(test_guest)
    info = node.driver.spawn(spec, node.boot_files())
    assert info.pid not in (None, spare)
    assert info.state is PowerState.RUNNING
    node.wait_console(spec.uuid, r"COUNTER 2\b")
    assert (node.driver.warm.warm_starts, node.driver.warm.cold_starts) == (0, 1)
    node.spare(not_=spare)


def test_a_new_driver_ends_the_old_spare_and_adopts_the_vmm_a_spare_became(
    nodes: Callable[..., Node], test_guest: Path
) -> None:
    old = nodes()
    first = old.spare()
    spec = spec_of(test_guest)
    vmm = old.driver.spawn(spec, old.boot_files()).pid
    assert vmm == first
    leftover = old.spare(not_=first)
    n = old.events[-1].n
    # The old node "dies" without its clean stop: its spare is left for the new one.
    new = nodes()
    assert gone(leftover)
    assert not gone(vmm, timeout=0)
    old.driver.close()  # only its watch goes now (the leftover is ended already)
    old.events.clear()
    adopted = new.driver.adopt(spec.uuid, n)
    assert adopted is not None
    assert (adopted.state, adopted.pid) == (PowerState.RUNNING, vmm)
    new.driver.pause(spec.uuid)
    assert [(e.kind.value, e.reason) for e in new.events] == [("paused", "host")]
    new.driver.resume(spec.uuid)
    assert new.spare() not in (first, leftover)
    new.driver.destroy(spec.uuid)
    assert gone(vmm)
    assert new.events[-1].kind.value == "stopped"
