"""KvmDriver.save / snapshot / restore on real guests (docs/snapshots.md, "On the host").

The test guest runs `memtest` (a region whose checksum the host can recompute from guest
RAM) and `counter` (a line every 10 ms): a restored guest must count on without a re-boot,
with its memory intact, from any driver that can reach the state's directory.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import native
from compute_node.boot_sources import BootFiles, HostFile
from compute_node.driver import DriverError, GuestEvent
from compute_node.kvm import KvmDriver
from compute_node.vmm.client import VmmClient, VmmRequestError, VmmSpawnError, spawn
from compute_node.vmm.config import LaunchConfig, RestoreConfig
from protos.domain import BootSpec, DomainSpec, PowerState
from tests.kvm.test_snapshot import SECTION, memtest_checksum, sections

MIB = 1 << 20
MEMTEST = re.compile(r"MEMTEST mib=(\d+) base=0x([0-9a-f]+) checksum=0x([0-9a-f]{16})")


class Host:
    """One KvmDriver with its own state dir and the events it reported."""

    def __init__(self, root: Path, guest: Path) -> None:
        self.driver = KvmDriver(root / "domains")
        self.guest = guest
        self.events: list[GuestEvent] = []
        self._lock = threading.Lock()
        self.driver.set_event_sink(self._sink)
        self.files: list[BootFiles] = []

    def _sink(self, event: GuestEvent) -> None:
        with self._lock:
            self.events.append(event)

    def kinds(self, domain_id: uuid.UUID) -> list[tuple[str, str, str]]:
        with self._lock:
            return [
                (e.kind.value, e.reason, e.detail) for e in self.events if e.domain_id == domain_id
            ]

    def boot_files(self) -> BootFiles:
        fd = os.open(self.guest, os.O_RDONLY | os.O_CLOEXEC)
        files = BootFiles([HostFile("boot.kernel", str(self.guest), fd)])
        self.files.append(files)
        return files

    def console(self, domain_id: uuid.UUID) -> str:
        return self.driver.console(domain_id, 1 << 20)[0].decode(errors="replace")

    def wait_console(self, domain_id: uuid.UUID, pattern: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.console(domain_id)
            if re.search(pattern, text):
                return text
            time.sleep(0.01)
        raise AssertionError(f"no {pattern!r} in:\n{self.console(domain_id)[-2000:]}")

    def close(self) -> None:
        for domain_id in {e.domain_id for e in self.events}:
            if self.driver.get_info(domain_id).state is not PowerState.SHUTOFF:
                self.driver.destroy(domain_id)
        self.driver.close()
        for files in self.files:
            files.close()


def make_spec(guest: Path, cmdline: str, memory_mib: int = 64, vcpus: int = 2) -> DomainSpec:
    return DomainSpec.model_validate(
        {
            "name": f"s-{uuid.uuid4().hex[:8]}",
            "boot": BootSpec(kernel=str(guest), cmdline=cmdline),
            "memory_mib": memory_mib,
            "vcpus": vcpus,
        }
    )


def counters(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"COUNTER (\d+)", text)]


def saved_checksum(directory: Path, base: int, mib: int) -> int:
    """The memtest checksum of the guest RAM a state holds (restored here, never run)."""
    machine = native.Machine.restore(directory)
    try:
        return memtest_checksum(machine, base, mib)
    finally:
        machine.close()


@pytest.fixture
def hosts(kvm: None, test_guest: Path, tmp_path: Path) -> Iterator[Callable[[str], Host]]:
    made: list[Host] = []

    def _host(name: str) -> Host:
        h = Host(tmp_path / name, test_guest)
        made.append(h)
        return h

    yield _host
    for h in made:
        h.close()


@pytest.fixture
def counting(hosts: Callable[[str], Host], test_guest: Path) -> tuple[Host, DomainSpec, int, int]:
    """A 2-vCPU guest that ran memtest=16 and counts: (host, spec, memtest base, checksum)."""
    host = hosts("a")
    spec = make_spec(test_guest, "ready echo memtest=16 counter")
    host.driver.spawn(spec, host.boot_files())
    text = host.wait_console(spec.uuid, r"COUNTER 3\b")
    m = MEMTEST.search(text)
    assert m is not None, text
    return host, spec, int(m.group(2), 16), int(m.group(3), 16)


def test_save_then_restore_counts_on_with_the_same_memory(
    counting: tuple[Host, DomainSpec, int, int], tmp_path: Path
) -> None:
    host, spec, base, checksum = counting
    assert host.driver.capabilities().save_restore is True
    state = tmp_path / "saved"
    state.mkdir()
    saved = host.driver.save(spec.uuid, state)
    assert (saved.memory, saved.power) == (True, PowerState.RUNNING)
    assert 0 < saved.pause_ms < 10_000
    # The machine is gone, its stopped/saved event reported before save returned.
    assert host.kinds(spec.uuid)[-1] == ("stopped", "saved", "running")
    assert host.driver.get_info(spec.uuid).state is PowerState.SHUTOFF
    before = counters((host.driver.directory(spec.uuid) / "console.log").read_text())[-1]
    assert saved_checksum(state, base, 16) == checksum

    host.driver.restore(spec, host.boot_files(), state)
    assert host.kinds(spec.uuid)[-1] == ("started", "", "restored")
    assert host.driver.get_info(spec.uuid).state is PowerState.RUNNING
    text = host.wait_console(spec.uuid, rf"COUNTER {before + 5}\b")
    # It counted on from where it was: no boot, no memtest, no counter from 0. (A save that
    # paused the guest mid-line leaves that line's head in the old ring: +2.)
    assert "READY" not in text, text[:300]
    assert "MEMTEST" not in text, text[:300]
    assert counters(text)[0] in (before, before + 1, before + 2), text[:300]
    # The log holds both machines' output as one stream: one boot, the counter unbroken.
    log = (host.driver.directory(spec.uuid) / "console.log").read_text()
    assert log.count("READY") == 1
    seen = counters(log)
    assert seen == list(range(seen[0], seen[0] + len(seen)))
    # Its RAM is the saved RAM: saved again, the memtest region sums the same.
    again = tmp_path / "again"
    again.mkdir()
    host.driver.save(spec.uuid, again)
    assert saved_checksum(again, base, 16) == checksum


def test_a_second_driver_restores_the_same_state(
    counting: tuple[Host, DomainSpec, int, int],
    hosts: Callable[[str], Host],
    tmp_path: Path,
) -> None:
    """What a shared pool gives: another compute node, its own state dir, the same files."""
    host, spec, _, _ = counting
    state = tmp_path / "shared"
    state.mkdir()
    host.driver.save(spec.uuid, state)
    before = counters((host.driver.directory(spec.uuid) / "console.log").read_text())[-1]
    other = hosts("b")
    info = other.driver.restore(spec, other.boot_files(), state, paused=True)
    assert info.state is PowerState.PAUSED
    assert other.kinds(spec.uuid) == [
        ("started", "", "restored"),
        ("paused", "start_paused", "restored"),
    ]
    time.sleep(0.1)
    assert counters(other.console(spec.uuid)) == []  # nothing ran while paused
    other.driver.resume(spec.uuid)
    text = other.wait_console(spec.uuid, rf"COUNTER {before + 2}\b")
    assert counters(text)[0] in (before, before + 1, before + 2)


def test_snapshot_goes_on_and_restores_later(
    counting: tuple[Host, DomainSpec, int, int], tmp_path: Path
) -> None:
    host, spec, base, checksum = counting
    snap = tmp_path / "snap"
    snap.mkdir()
    seen: dict[str, object] = {}

    def during() -> None:
        # Paused while the worker copies disks: the guest does not count meanwhile.
        seen["state"] = host.driver.get_info(spec.uuid).state
        first = counters(host.console(spec.uuid))[-1]
        time.sleep(0.2)
        seen["still"] = counters(host.console(spec.uuid))[-1] == first
        seen["at"] = first

    events_before = len(host.kinds(spec.uuid))
    machine = host.driver.snapshot(spec.uuid, snap, during)
    assert (machine.memory, machine.power) == (True, PowerState.RUNNING)
    assert machine.pause_ms >= 200
    assert seen["state"] is PowerState.PAUSED
    assert seen["still"] is True
    assert len(host.kinds(spec.uuid)) == events_before  # no paused/resumed events
    at = int(str(seen["at"]))
    host.wait_console(spec.uuid, rf"COUNTER {at + 20}\b")  # it went on
    assert host.driver.get_info(spec.uuid).state is PowerState.RUNNING

    host.driver.destroy(spec.uuid)
    host.driver.restore(spec, host.boot_files(), snap, detail="from_snapshot")
    assert host.kinds(spec.uuid)[-1] == ("started", "", "from_snapshot")
    text = host.wait_console(spec.uuid, r"COUNTER \d+")
    # Back at the snapshot's moment, not where the destroyed guest had got to.
    assert counters(text)[0] in (at, at + 1, at + 2), text[:300]
    assert saved_checksum(snap, base, 16) == checksum


def test_a_failing_during_leaves_the_guest_running_and_nothing_valid(
    counting: tuple[Host, DomainSpec, int, int], tmp_path: Path
) -> None:
    host, spec, _, _ = counting
    snap = tmp_path / "snap"
    snap.mkdir()

    def during() -> None:
        raise RuntimeError("the disk copy failed")

    with pytest.raises(RuntimeError, match="disk copy"):
        host.driver.snapshot(spec.uuid, snap, during)
    assert list(snap.iterdir()) == []
    assert host.driver.get_info(spec.uuid).state is PowerState.RUNNING
    at = counters(host.console(spec.uuid))[-1]
    host.wait_console(spec.uuid, rf"COUNTER {at + 3}\b")
    # A disk-only snapshot writes nothing but still pauses for `during`.
    machine = host.driver.snapshot(spec.uuid, None, lambda: None)
    assert (machine.memory, machine.power) == (False, PowerState.RUNNING)


def test_a_snapshot_client_that_goes_quiet_does_not_keep_the_guest_paused(
    counting: tuple[Host, DomainSpec, int, int], tmp_path: Path
) -> None:
    host, spec, _, _ = counting
    client = VmmClient(host.driver.directory(spec.uuid))
    held = client.snapshot(None, hold_s=0.3)
    assert held.held.power == "running"
    assert client.status().state == "paused"
    with pytest.raises(VmmRequestError) as refused:
        client.pause()  # nothing changes the machine while a snapshot holds it
    assert refused.value.code == "busy"
    time.sleep(0.5)
    assert client.status().state == "running"  # the hold expired
    with pytest.raises(VmmRequestError) as late:
        held.proceed()
    assert late.value.code == "state"
    # A client that hangs up is as good as done.
    held = client.snapshot(None, hold_s=60)
    held.close()
    deadline = time.monotonic() + 5
    while client.status().state != "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_damaged_state_is_refused_before_anything_runs(
    counting: tuple[Host, DomainSpec, int, int], tmp_path: Path
) -> None:
    host, spec, _, _ = counting
    state = tmp_path / "saved"
    state.mkdir()
    host.driver.save(spec.uuid, state)
    good = (state / "state").read_bytes()
    n_events = len(host.kinds(spec.uuid))
    secs = sections(good)
    assert len(secs) >= 7
    for _, _, off, length in secs:  # one byte of each section's payload
        damaged = bytearray(good)
        damaged[off + SECTION + length // 2] ^= 0x40
        (state / "state").write_bytes(damaged)
        with pytest.raises(DriverError) as exc:
            host.driver.restore(spec, host.boot_files(), state)
        assert exc.value.code == "invalid"
        assert re.search(r"checksum|section", exc.value.message), exc.value.message
    (state / "state").write_bytes(good)
    # Another machine's shape is refused too, by the driver...
    bigger = spec.model_copy(update={"memory_mib": 128})
    with pytest.raises(DriverError, match="another machine") as other:
        host.driver.restore(bigger, host.boot_files(), state)
    assert other.value.code == "invalid"
    # ...and a damaged memory file by the VMM itself, which then runs nothing.
    memory = bytearray((state / "memory").read_bytes())
    memory[-72] ^= 0x01  # the trailer's magic
    (state / "memory").write_bytes(memory)
    with pytest.raises(DriverError) as vmm_refused:
        host.driver.restore(spec, host.boot_files(), state)
    assert vmm_refused.value.code == "invalid"
    assert host.kinds(spec.uuid)[n_events:] == []  # no event for any refusal
    assert host.driver.get_info(spec.uuid).state is PowerState.SHUTOFF


def test_the_vmm_refuses_a_state_of_another_machine_config(
    counting: tuple[Host, DomainSpec, int, int], tmp_path: Path
) -> None:
    """The launch config's own check, for a caller that skipped the driver's."""
    host, spec, _, _ = counting
    state = tmp_path / "saved"
    state.mkdir()
    host.driver.save(spec.uuid, state)
    domain = tmp_path / "direct"
    domain.mkdir()
    LaunchConfig(
        domain_id="direct",
        name="direct",
        kernel=str(host.guest),
        initrd=None,
        cmdline="",
        disks=[],
        memory_mib=32,
        vcpus=2,
        on_poweroff="destroy",
        on_reboot="restart",
        on_crash="destroy",
        console_ring_bytes=65536,
        console_log=False,
        start_paused=False,
        cgroup=None,
        restore=RestoreConfig(str(state), False, "restored"),
    ).write(str(domain))
    with pytest.raises(VmmSpawnError, match="32 MiB") as exc:
        spawn(domain)
    assert exc.value.code == "invalid"


def test_kill_9_of_the_vmm_mid_save_leaves_the_domain_recoverable(
    hosts: Callable[[str], Host], test_guest: Path, tmp_path: Path
) -> None:
    host = hosts("a")
    spec = make_spec(test_guest, "ready memtest=200 counter", memory_mib=256)
    host.driver.spawn(spec, host.boot_files())
    host.wait_console(spec.uuid, r"COUNTER 1\b", timeout=60)
    pid = host.driver.get_info(spec.uuid).pid
    assert pid is not None
    state = tmp_path / "saved"
    state.mkdir()
    failure: list[BaseException] = []

    def save() -> None:
        try:
            host.driver.save(spec.uuid, state)
        except BaseException as exc:
            failure.append(exc)

    saver = threading.Thread(target=save)
    saver.start()
    deadline = time.monotonic() + 30
    while not any(".tmp-" in p.name for p in state.iterdir()):
        assert time.monotonic() < deadline, "no save in progress seen"
        assert saver.is_alive(), failure
        time.sleep(0.0005)
    os.kill(pid, signal.SIGKILL)  # the VMM this test started
    saver.join(30)
    assert len(failure) == 1, failure
    assert isinstance(failure[0], DriverError), failure
    assert "died" in str(failure[0])
    assert list(state.iterdir()) == []  # nothing left that could pass as a state
    assert host.kinds(spec.uuid)[-1][:2] == ("stopped", "failed")
    assert host.driver.get_info(spec.uuid).state is PowerState.SHUTOFF
    host.driver.spawn(spec, host.boot_files())  # and it starts again
    host.wait_console(spec.uuid, r"READY")


def test_a_full_disk_mid_save_keeps_the_guest_running(
    counting: tuple[Host, DomainSpec, int, int], small_fs: Path
) -> None:
    host, spec, _, _ = counting
    state = small_fs / "saved"
    state.mkdir()
    with pytest.raises(DriverError) as exc:
        host.driver.save(spec.uuid, state)
    assert exc.value.code == "no_space", exc.value
    assert list(state.iterdir()) == []
    assert host.driver.get_info(spec.uuid).state is PowerState.RUNNING
    assert host.kinds(spec.uuid)[-1] == ("started", "", "booted")  # no event at all
    at = counters(host.console(spec.uuid))[-1]
    host.wait_console(spec.uuid, rf"COUNTER {at + 3}\b")


def test_a_paused_guest_is_saved_and_restored_paused(
    counting: tuple[Host, DomainSpec, int, int], tmp_path: Path
) -> None:
    host, spec, _, _ = counting
    host.driver.pause(spec.uuid)
    state = tmp_path / "saved"
    state.mkdir()
    assert host.driver.save(spec.uuid, state).power is PowerState.PAUSED
    assert host.kinds(spec.uuid)[-1] == ("stopped", "saved", "paused")
    assert host.driver.restore(spec, host.boot_files(), state).state is PowerState.PAUSED
    assert host.kinds(spec.uuid)[-2:] == [
        ("started", "", "restored"),
        ("paused", "start_paused", "restored"),
    ]
    host.driver.resume(spec.uuid)
    assert host.kinds(spec.uuid)[-1] == ("resumed", "host", "")
    host.wait_console(spec.uuid, r"COUNTER \d+")


def test_a_relative_state_directory_is_the_callers(
    counting: tuple[Host, DomainSpec, int, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VMM runs in its domain dir: a relative name must still mean the caller's."""
    host, spec, _, _ = counting
    monkeypatch.chdir(tmp_path)
    Path("rel").mkdir()
    host.driver.save(spec.uuid, Path("rel"))
    assert (tmp_path / "rel" / "state").is_file()
    assert not (host.driver.directory(spec.uuid) / "rel").exists()
    host.driver.restore(spec, host.boot_files(), Path("rel"))
    host.wait_console(spec.uuid, r"COUNTER \d+")
