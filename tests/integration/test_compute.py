"""The compute node through AMQP, on a real broker and real KVM with the test guest: commands,
the exact event sequence seen by an independent subscriber, policies, capacity, restarts of the
worker and deaths of VMMs, broker outages, poison messages."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from compute_node.vmm.client import VmmClient, read_journal
from protos import routing
from protos.base import Message
from protos.codec import Envelope
from protos.commands import (
    DefineDomain,
    DestroyDomain,
    GetConsole,
    GetDomainInfo,
    PauseDomain,
    RebootDomain,
    RebootMode,
    ResumeDomain,
    ShutdownDomain,
    StartDomain,
    UndefineDomain,
)
from protos.domain import BootSpec, DomainSpec, LifecycleAction, PowerState
from protos.events import DomainEvent
from protos.host import HostHeartbeat, KvmKind, Resources
from protos.replies import ConsoleOutput, Done
from services.bus import Bus, RemoteError
from tests.brokers import BrokerHandle, find_dead_letter
from tests.integration.compute_harness import ComputeProcess, EventLog, call
from tests.integration.conftest import MakeBus

pytestmark = [pytest.mark.integration, pytest.mark.kvm]


@pytest.fixture(scope="module")
def guest() -> Path:
    import native
    import native.testguest

    reason = native.kvm_unavailable_reason()
    if reason is not None:
        pytest.skip(f"KVM unavailable: {reason}")
    return native.testguest.build()


@pytest.fixture
def node(
    amqp_url: str, tmp_path: Path, make_bus: MakeBus, guest: Path
) -> Iterator[tuple[ComputeProcess, Bus, EventLog]]:
    host = f"kvm-{uuid.uuid4().hex[:6]}"
    bus = make_bus("test-client")
    events = EventLog(make_bus("test-watcher"))
    compute = ComputeProcess(amqp_url, tmp_path / "state", host)
    (tmp_path / "state").mkdir()
    compute.start(bus)
    yield compute, bus, events
    compute.stop()
    events.subscription.close()
    # Guests a failed test left behind: end them by the pids their VMMs recorded.
    for pid_file in (tmp_path / "state" / "domains").glob("*/vmm.pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ValueError, ProcessLookupError):
            pass


def spec(guest: Path, cmdline: str = "ready", **kw: object) -> DomainSpec:
    return DomainSpec.model_validate(
        {
            "name": f"g-{uuid.uuid4().hex[:8]}",
            "boot": BootSpec(kernel=str(guest), cmdline=cmdline),
            "memory_mib": 32,
            **kw,
        }
    )


def wait_console(bus: Bus, queue: str, domain_id: uuid.UUID, text: str, count: int = 1) -> str:
    deadline = time.monotonic() + 15
    data = ""
    while time.monotonic() < deadline:
        reply = bus.call(queue, GetConsole(domain_id=domain_id), timeout=10)
        assert isinstance(reply, ConsoleOutput)
        data = reply.data
        if data.count(text) >= count:
            return data
        time.sleep(0.05)
    raise AssertionError(f"{text!r} x{count} not on the console: {data[-500:]!r}")


def assert_rising(events: list[DomainEvent]) -> None:
    seqs = [e.seq for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


def test_lifecycle_through_amqp_with_the_exact_event_sequence(
    node: tuple[ComputeProcess, Bus, EventLog], guest: Path
) -> None:
    compute, bus, events = node
    q = compute.queue
    s = spec(guest)
    d = s.uuid
    assert call(bus, q, DefineDomain(spec=s)).state is PowerState.SHUTOFF
    assert call(bus, q, StartDomain(domain_id=d)).state is PowerState.RUNNING
    wait_console(bus, q, d, "READY vcpus=1 memory_mib=32")
    assert call(bus, q, PauseDomain(domain_id=d)).state is PowerState.PAUSED
    assert call(bus, q, ResumeDomain(domain_id=d)).state is PowerState.RUNNING
    assert call(bus, q, RebootDomain(domain_id=d)).state is PowerState.RUNNING
    wait_console(bus, q, d, "READY", count=2)
    assert call(bus, q, ShutdownDomain(domain_id=d, timeout_s=15)).state is PowerState.SHUTOFF
    assert call(bus, q, StartDomain(domain_id=d)).state is PowerState.RUNNING
    assert call(bus, q, DestroyDomain(domain_id=d)).state is PowerState.SHUTOFF
    assert isinstance(bus.call(q, UndefineDomain(domain_id=d)), Done)
    expected = [
        ("domain.defined", "added"),
        ("domain.started", "booted"),
        ("domain.suspended", "paused"),
        ("domain.resumed", "unpaused"),
        ("domain.rebooted", ""),
        ("domain.shutdown", "host"),
        ("domain.stopped", "shutdown"),
        ("domain.started", "booted"),
        ("domain.stopped", "destroyed"),
        ("domain.undefined", "removed"),
    ]
    got = events.wait(d, lambda evs: len(evs) >= len(expected))
    assert events.kinds(d) == expected
    assert [e.seq for e in got] == list(range(1, 11))
    assert {e.host for e in got} == {compute.host}
    assert not events.duplicates


def test_refusals_answer_with_the_state(
    node: tuple[ComputeProcess, Bus, EventLog], guest: Path
) -> None:
    compute, bus, _ = node
    s = spec(guest)
    call(bus, compute.queue, DefineDomain(spec=s))
    with pytest.raises(RemoteError) as err:
        bus.call(compute.queue, PauseDomain(domain_id=s.uuid), timeout=10)
    assert err.value.code == "conflict"
    assert err.value.details["state"] == "shutoff"


def test_on_crash_restart_after_a_guest_panic(
    node: tuple[ComputeProcess, Bus, EventLog], guest: Path
) -> None:
    compute, bus, events = node
    s = spec(guest, "ready panic", on_crash=LifecycleAction.RESTART)
    call(bus, compute.queue, DefineDomain(spec=s))
    call(bus, compute.queue, StartDomain(domain_id=s.uuid))
    # The restarted guest panics again (same command line): look at the first cycle.
    evs = events.wait(s.uuid, lambda evs: len(evs) >= 5)
    assert [(e.TYPE, str(getattr(e, "detail", ""))) for e in evs[:5]] == [
        ("domain.defined", "added"),
        ("domain.started", "booted"),
        ("domain.crashed", "panicked"),
        ("domain.stopped", "crashed"),
        ("domain.started", "booted"),
    ]
    call(bus, compute.queue, DestroyDomain(domain_id=s.uuid))
    events.wait(s.uuid, lambda evs: any(getattr(e, "detail", "") == "destroyed" for e in evs))
    assert_rising(events.of(s.uuid))


def test_the_vmm_boots_the_files_checked_even_if_the_path_changes_later(
    node: tuple[ComputeProcess, Bus, EventLog], guest: Path, tmp_path: Path
) -> None:
    """An admin's kernel outside the allowed dirs boots; replacing the file on disk afterwards
    changes nothing for the machine (a reset reloads from the descriptor the node checked)."""
    compute, bus, _ = node
    kernel = tmp_path / "guest.elf"
    kernel.write_bytes(guest.read_bytes())
    s = spec(kernel)
    call(bus, compute.queue, DefineDomain(spec=s, privileged=True))
    call(bus, compute.queue, StartDomain(domain_id=s.uuid))
    wait_console(bus, compute.queue, s.uuid, "READY")
    kernel.unlink()
    kernel.write_bytes(b"\x7fELF but not a kernel")
    assert call(bus, compute.queue, RebootDomain(domain_id=s.uuid)).state is PowerState.RUNNING
    wait_console(bus, compute.queue, s.uuid, "READY", count=2)
    call(bus, compute.queue, DestroyDomain(domain_id=s.uuid))


def test_a_member_cannot_boot_host_files_and_a_non_kernel_is_invalid(
    node: tuple[ComputeProcess, Bus, EventLog], guest: Path, tmp_path: Path
) -> None:
    compute, bus, _ = node
    s = spec(guest, boot=BootSpec(kernel=str(guest), initrd="/etc/shadow"))
    with pytest.raises(RemoteError) as err:
        bus.call(compute.queue, DefineDomain(spec=s), timeout=10)
    assert (err.value.code, err.value.details["field"]) == ("forbidden", "boot.initrd")
    assert "allowed_boot_dirs" in err.value.message
    assert not (compute.state_dir / "domains" / str(s.uuid)).exists()
    # What only the VMM finds (no kernel image) is the spec's fault too, with the path given.
    junk = tmp_path / "junk"
    junk.write_bytes(bytes(4096))
    j = spec(junk)
    call(bus, compute.queue, DefineDomain(spec=j, privileged=True))
    with pytest.raises(RemoteError) as err:
        bus.call(compute.queue, StartDomain(domain_id=j.uuid), timeout=20)
    assert err.value.code == "invalid"
    assert f"kernel {junk}: not a kernel image" in err.value.message, err.value.message
    assert "/proc/self/fd" not in err.value.message


def test_a_spawn_beyond_capacity_is_refused(
    node: tuple[ComputeProcess, Bus, EventLog], guest: Path
) -> None:
    compute, bus, events = node
    s = spec(guest, memory_mib=1024 * 1024)
    call(bus, compute.queue, DefineDomain(spec=s))
    with pytest.raises(RemoteError) as err:
        bus.call(compute.queue, StartDomain(domain_id=s.uuid), timeout=10)
    assert err.value.code == "no_capacity"
    assert "memory" in err.value.message
    time.sleep(0.3)
    assert events.kinds(s.uuid) == [("domain.defined", "added")]


def test_worker_kill_9_and_restart_adopts_running_guests(
    node: tuple[ComputeProcess, Bus, EventLog], guest: Path
) -> None:
    compute, bus, events = node
    specs = [spec(guest) for _ in range(3)]
    for s in specs:
        call(bus, compute.queue, DefineDomain(spec=s))
        call(bus, compute.queue, StartDomain(domain_id=s.uuid))
    compute.kill()
    compute.start(bus)
    for s in specs:
        info = call(bus, compute.queue, PauseDomain(domain_id=s.uuid))
        assert info.state is PowerState.PAUSED
        assert info.pid is not None
    for s in specs:
        evs = events.wait(s.uuid, lambda evs: len(evs) >= 3)
        assert [(e.TYPE, e.seq) for e in evs] == [
            ("domain.defined", 1),
            ("domain.started", 2),
            ("domain.suspended", 3),
        ]
        call(bus, compute.queue, DestroyDomain(domain_id=s.uuid))
    # No event was emitted twice: the sequences above are exact. A kill -9 between the
    # broker's confirm and the outbox row's delete may publish one again under its same
    # message id (at-least-once); the log drops those by id, as any consumer should.


def test_worker_kill_9_right_after_a_guest_event_loses_nothing(
    node: tuple[ComputeProcess, Bus, EventLog], guest: Path
) -> None:
    # The worker commits a journaled event without an fsync and publishes it at once: a kill
    # -9 anywhere on that way (before the commit, before the publish, before the confirm or
    # the row's delete) must still deliver every event, in order, duplicates only by id.
    compute, bus, events = node
    specs = [spec(guest, "ready echo") for _ in range(3)]
    for s in specs:
        call(bus, compute.queue, DefineDomain(spec=s))
        call(bus, compute.queue, StartDomain(domain_id=s.uuid))
    for s in specs:
        journal = compute.state_dir / "domains" / str(s.uuid) / "journal"
        bus.call(compute.queue, ShutdownDomain(domain_id=s.uuid, wait=False), timeout=10)
        deadline = time.monotonic() + 10
        while not any(r["kind"] == "shutdown" for r in read_journal(journal)):
            assert time.monotonic() < deadline, "the guest did not power off"
            time.sleep(0.0002)
        compute.kill()
        compute.start(bus)
    for s in specs:
        evs = events.wait(s.uuid, lambda evs: len(evs) >= 4)
        time.sleep(0.2)  # anything more (a second copy under another id) would show here
        assert [(e.TYPE, e.seq) for e in events.of(s.uuid)] == [
            ("domain.defined", 1),
            ("domain.started", 2),
            ("domain.shutdown", 3),
            ("domain.stopped", 4),
        ], evs
        assert call(bus, compute.queue, GetDomainInfo(domain_id=s.uuid)).state is (
            PowerState.SHUTOFF
        )


def test_vmm_kill_9_is_stopped_failed_within_a_second(
    node: tuple[ComputeProcess, Bus, EventLog], guest: Path
) -> None:
    compute, bus, events = node
    s = spec(guest)
    call(bus, compute.queue, DefineDomain(spec=s))
    info = call(bus, compute.queue, StartDomain(domain_id=s.uuid))
    assert info.pid is not None
    killed = time.monotonic()
    os.kill(info.pid, signal.SIGKILL)
    stopped = events.wait_type(s.uuid, "domain.stopped")
    assert time.monotonic() - killed < 1.0
    assert stopped.model_dump()["detail"] == "failed"


def test_event_produced_while_the_broker_connection_is_cut_arrives_after(
    node: tuple[ComputeProcess, Bus, EventLog], guest: Path, broker: BrokerHandle
) -> None:
    compute, bus, events = node
    s = spec(guest)
    call(bus, compute.queue, DefineDomain(spec=s))
    call(bus, compute.queue, StartDomain(domain_id=s.uuid))
    events.wait_type(s.uuid, "domain.started")
    broker.close_all_connections()
    # Power the guest off behind the broker's back, through its VMM's control socket.
    VmmClient(compute.state_dir / "domains" / str(s.uuid)).shutdown("ctrl-alt-del")
    stopped = events.wait_type(s.uuid, "domain.stopped")
    assert stopped.model_dump()["detail"] == "shutdown"
    assert_rising(events.of(s.uuid))


def test_undecodable_message_is_dead_lettered_and_the_node_keeps_serving(
    node: tuple[ComputeProcess, Bus, EventLog], guest: Path, amqp_url: str
) -> None:
    compute, bus, _ = node
    marker = f"garbage-{uuid.uuid4()}".encode()
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        conn.channel().basic_publish(
            routing.COMMANDS_EXCHANGE,
            compute.queue,
            b"\xc1" + marker,
            pika.BasicProperties(content_type="application/msgpack"),
        )
    finally:
        conn.close()
    s = spec(guest)
    assert call(bus, compute.queue, DefineDomain(spec=s)).name == s.name
    props, _ = find_dead_letter(amqp_url, lambda _p, body: body.endswith(marker))
    assert props.headers["x-flotilla-queue"] == compute.queue
    assert "not msgpack" in props.headers["x-flotilla-reason"]


# ---- heartbeat, autostart, the command line, child processes ---------------------------------


def test_heartbeat_carries_capacity_usage_domains_by_state_and_kvm_kind(
    node: tuple[ComputeProcess, Bus, EventLog], guest: Path, make_bus: MakeBus
) -> None:
    compute, bus, _ = node
    beats: queue.SimpleQueue[HostHeartbeat] = queue.SimpleQueue()

    def on_beat(_envelope: Envelope, message: Message) -> None:
        if isinstance(message, HostHeartbeat):
            beats.put(message)

    sub = make_bus("test-heartbeat").subscribe(
        [routing.event_key("host", "heartbeat", compute.host)], on_beat
    )
    try:
        s = spec(guest)
        call(bus, compute.queue, DefineDomain(spec=s))
        call(bus, compute.queue, StartDomain(domain_id=s.uuid))

        def next_beat(predicate: object) -> HostHeartbeat:
            deadline = time.monotonic() + 10  # the node beats every second here
            while time.monotonic() < deadline:
                beat = beats.get(timeout=max(0.1, deadline - time.monotonic()))
                if callable(predicate) and predicate(beat):
                    return beat
            raise AssertionError("no matching heartbeat within 10 s")

        beat = next_beat(lambda b: b.usage.vcpus > 0)
        assert beat.host == compute.host
        assert beat.version
        assert beat.interval_s == 1.0
        assert beat.inventory.kvm in (KvmKind.PVM, KvmKind.HARDWARE)
        assert beat.inventory.capacity.vcpus == os.cpu_count()
        assert beat.inventory.capacity.memory_mib > 0
        assert beat.inventory.cpu_allocation_ratio == 4.0
        assert beat.inventory.pools == ["default"]  # its one `dir` pool, unconfigured
        assert beat.usage == Resources(vcpus=1, memory_mib=32)
        assert beat.domains_by_state == {PowerState.RUNNING: 1}
        call(bus, compute.queue, DestroyDomain(domain_id=s.uuid))
        beat = next_beat(lambda b: b.usage.vcpus == 0)
        assert beat.usage == Resources(vcpus=0, memory_mib=0)
        assert beat.domains_by_state == {PowerState.SHUTOFF: 1}
    finally:
        sub.close()


def test_autostart_domains_start_when_the_node_starts(
    node: tuple[ComputeProcess, Bus, EventLog], guest: Path
) -> None:
    compute, bus, events = node
    q = compute.queue
    auto, plain = spec(guest, autostart=True), spec(guest)
    call(bus, q, DefineDomain(spec=auto))
    call(bus, q, DefineDomain(spec=plain))
    # Defining does not start it; only a node start does.
    assert call(bus, q, GetDomainInfo(domain_id=auto.uuid)).state is PowerState.SHUTOFF
    compute.stop()
    compute.start(bus)
    events.wait_type(auto.uuid, "domain.started")
    info = call(bus, q, GetDomainInfo(domain_id=auto.uuid))
    assert info.state is PowerState.RUNNING
    assert info.pid is not None
    wait_console(bus, q, auto.uuid, "READY vcpus=1")
    assert call(bus, q, GetDomainInfo(domain_id=plain.uuid)).state is PowerState.SHUTOFF
    assert events.kinds(auto.uuid) == [("domain.defined", "added"), ("domain.started", "booted")]
    assert events.kinds(plain.uuid) == [("domain.defined", "added")]
    call(bus, q, DestroyDomain(domain_id=auto.uuid))


def test_flotilla_compute_help_names_its_settings() -> None:
    script = Path(sys.executable).with_name("flotilla-compute")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "compute_node.main"]
    done = subprocess.run(
        [*argv, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    for name in (
        "--config",
        "--host",
        "--state-dir",
        "--amqp-url",
        "--driver",
        "--cpu-allocation-ratio",
        "--ram-allocation-ratio",
        "--reserved-host-memory-mib",
        "--heartbeat-interval-s",
        "--allowed-boot-dir",
        "FLOTILLA_ALLOWED_BOOT_DIRS",
        "FLOTILLA_HOST",
        "FLOTILLA_STATE_DIR",
        "FLOTILLA_AMQP_URL",
    ):
        assert name in done.stdout, name


def children_of(pid: int) -> dict[int, str]:
    """pid → state letter of every process whose parent is `pid` (from /proc), but the
    node's idle warm spare VMM (docs/compute.md "Warm VMMs": its pid file still there)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        spare = b"--spare" in argv and Path(os.fsdecode(argv[-2])).exists()
        if int(fields[1]) == pid and not spare:
            found[int(entry.name)] = fields[0]
    return found


def wait_no_children(pid: int, timeout: float = 3.0) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while (left := children_of(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def test_the_worker_reaps_its_vmm_processes(
    node: tuple[ComputeProcess, Bus, EventLog], guest: Path
) -> None:
    compute, bus, events = node
    assert compute.proc is not None
    worker = compute.proc.pid
    q = compute.queue
    for _ in range(4):  # destroyed by the host
        s = spec(guest)
        call(bus, q, DefineDomain(spec=s))
        info = call(bus, q, StartDomain(domain_id=s.uuid))
        assert info.pid in children_of(worker)
        call(bus, q, DestroyDomain(domain_id=s.uuid))
        bus.call(q, UndefineDomain(domain_id=s.uuid), timeout=20)
    for _ in range(3):  # guests that power off by themselves (on_poweroff=destroy)
        s = spec(guest, "ready poweroff")
        call(bus, q, DefineDomain(spec=s))
        bus.call(q, StartDomain(domain_id=s.uuid), timeout=20)
        events.wait_type(s.uuid, "domain.stopped")
    assert wait_no_children(worker) == {}, "VMM processes left as children (zombies?)"


def test_adopted_vmms_are_watched_without_being_the_workers_children(
    node: tuple[ComputeProcess, Bus, EventLog], guest: Path
) -> None:
    compute, bus, events = node
    q = compute.queue
    a, b = spec(guest), spec(guest)
    for s in (a, b):
        call(bus, q, DefineDomain(spec=s))
        call(bus, q, StartDomain(domain_id=s.uuid))
    compute.kill()
    compute.start(bus)
    assert compute.proc is not None
    worker = compute.proc.pid
    pid_a = call(bus, q, GetDomainInfo(domain_id=a.uuid)).pid
    pid_b = call(bus, q, GetDomainInfo(domain_id=b.uuid)).pid
    assert pid_a is not None
    assert pid_b is not None
    assert not {pid_a, pid_b} & set(children_of(worker))  # reparented, not ours to reap
    # A destroy of an adopted guest completes on its journal and socket alone...
    began = time.monotonic()
    assert call(bus, q, DestroyDomain(domain_id=a.uuid)).state is PowerState.SHUTOFF
    assert time.monotonic() - began < 2.0
    # ...and the domain starts again at once, now as the new worker's child.
    info = call(bus, q, StartDomain(domain_id=a.uuid))
    assert info.pid in children_of(worker)
    # A kill -9 of an adopted VMM is noticed through the subscription's EOF.
    killed = time.monotonic()
    os.kill(pid_b, signal.SIGKILL)
    stopped = events.wait_type(b.uuid, "domain.stopped")
    assert time.monotonic() - killed < 1.0
    assert stopped.model_dump()["detail"] == "failed"
    call(bus, q, DestroyDomain(domain_id=a.uuid))
    assert wait_no_children(worker) == {}
    assert events.kinds(a.uuid) == [
        ("domain.defined", "added"),
        ("domain.started", "booted"),
        ("domain.stopped", "destroyed"),
        ("domain.started", "booted"),
        ("domain.stopped", "destroyed"),
    ]
    assert_rising(events.of(a.uuid))
    # Exact (above): a redelivery after the kill -9 has its same message id and is dropped.


def test_console_relay_attaches_with_a_one_time_ticket(
    node: tuple[ComputeProcess, Bus, EventLog], guest: Path
) -> None:
    import socket

    from protos.commands import OpenConsole
    from protos.replies import ConsoleTicket

    compute, bus, _ = node
    s = spec(guest, "ready echo")
    call(bus, compute.queue, DefineDomain(spec=s))
    call(bus, compute.queue, StartDomain(domain_id=s.uuid))
    wait_console(bus, compute.queue, s.uuid, "READY")
    ticket = bus.call(compute.queue, OpenConsole(domain_id=s.uuid), timeout=10)
    assert isinstance(ticket, ConsoleTicket)
    with socket.create_connection((ticket.address, ticket.port), timeout=10) as conn:
        conn.sendall(ticket.ticket.encode() + b"\n")
        conn.sendall(b"hello relay\r")
        seen = b""
        deadline = time.monotonic() + 10
        while b"flotilla-guest: hello relay" not in seen and time.monotonic() < deadline:
            seen += conn.recv(4096)
        assert b"flotilla-guest: hello relay" in seen
    # A ticket is good once; a wrong one gets the door shut.
    for bad in (ticket.ticket, "0" * 64):
        with socket.create_connection((ticket.address, ticket.port), timeout=10) as conn:
            conn.sendall(bad.encode() + b"\n")
            assert conn.recv(100) == b""
    call(bus, compute.queue, DestroyDomain(domain_id=s.uuid))
    with pytest.raises(RemoteError) as err:
        bus.call(compute.queue, OpenConsole(domain_id=s.uuid), timeout=10)
    assert err.value.code == "conflict"


def _kept_vmm(compute: ComputeProcess, domain_id: uuid.UUID) -> int:
    """The pid of the VMM a preserve policy kept for a shut-off domain."""
    status = VmmClient(compute.state_dir / "domains" / str(domain_id)).status()
    assert status.state == "shutoff"
    return status.pid


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


class Beats:
    """The node's heartbeats, from a subscription of their own."""

    def __init__(self, make_bus: MakeBus, host: str) -> None:
        self.queue: queue.SimpleQueue[HostHeartbeat] = queue.SimpleQueue()
        self.sub = make_bus("test-heartbeat").subscribe(
            [routing.event_key("host", "heartbeat", host)], self._on_beat
        )

    def _on_beat(self, _envelope: Envelope, message: Message) -> None:
        if isinstance(message, HostHeartbeat):
            self.queue.put(message)

    def usage_when_shut_off(self) -> Resources:
        """The usage in a beat taken after now that sees the one domain shut off."""
        while not self.queue.empty():
            self.queue.get()
        self.queue.get(timeout=5)  # one may have been on its way already
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            beat = self.queue.get(timeout=max(0.1, deadline - time.monotonic()))
            if beat.domains_by_state == {PowerState.SHUTOFF: 1}:
                return beat.usage
        raise AssertionError("no heartbeat with the domain shut off within 10 s")


def test_a_vmm_kept_by_on_poweroff_preserve_is_counted_and_ended_by_start_destroy_undefine(
    node: tuple[ComputeProcess, Bus, EventLog], guest: Path, make_bus: MakeBus
) -> None:
    compute, bus, events = node
    q = compute.queue
    beats = Beats(make_bus, compute.host)
    usage_when_shut_off = beats.usage_when_shut_off
    try:
        # The guest powers itself off at once; its VMM stays.
        s = spec(guest, "ready poweroff", on_poweroff=LifecycleAction.PRESERVE)
        call(bus, q, DefineDomain(spec=s))
        call(bus, q, StartDomain(domain_id=s.uuid))
        events.wait_type(s.uuid, "domain.stopped")
        first = _kept_vmm(compute, s.uuid)
        assert usage_when_shut_off() == Resources(vcpus=1, memory_mib=32)
        # start ends the kept VMM before the new one.
        call(bus, q, StartDomain(domain_id=s.uuid))
        assert _gone(first)
        events.wait_type(s.uuid, "domain.stopped", count=2)
        second = _kept_vmm(compute, s.uuid)
        assert second != first
        # destroy ends it (no event: the machine had stopped); usage drops.
        info = call(bus, q, DestroyDomain(domain_id=s.uuid))
        assert info.state is PowerState.SHUTOFF
        assert _gone(second)
        with pytest.raises(RemoteError) as err:  # nothing left to destroy
            bus.call(q, DestroyDomain(domain_id=s.uuid), timeout=10)
        assert err.value.code == "conflict"
        assert "not running" in err.value.message
        assert usage_when_shut_off() == Resources(vcpus=0, memory_mib=0)
        # undefine ends it too, before the domain dir goes.
        call(bus, q, StartDomain(domain_id=s.uuid))
        events.wait_type(s.uuid, "domain.stopped", count=3)
        third = _kept_vmm(compute, s.uuid)
        bus.call(q, UndefineDomain(domain_id=s.uuid), timeout=20)
        assert _gone(third)
        assert not (compute.state_dir / "domains" / str(s.uuid)).exists()
        events.wait_type(s.uuid, "domain.undefined")
        assert [k for k in events.kinds(s.uuid) if k[0] != "domain.shutdown"] == [
            ("domain.defined", "added"),
            ("domain.started", "booted"),
            ("domain.stopped", "shutdown"),
            ("domain.started", "booted"),
            ("domain.stopped", "shutdown"),
            ("domain.started", "booted"),
            ("domain.stopped", "shutdown"),
            ("domain.undefined", "removed"),
        ]
    finally:
        beats.sub.close()


def test_a_restarted_node_still_counts_a_kept_vmm(
    node: tuple[ComputeProcess, Bus, EventLog], guest: Path, make_bus: MakeBus
) -> None:
    compute, bus, events = node
    q = compute.queue
    s = spec(guest, "ready poweroff", on_poweroff=LifecycleAction.PRESERVE)
    call(bus, q, DefineDomain(spec=s))
    call(bus, q, StartDomain(domain_id=s.uuid))
    events.wait_type(s.uuid, "domain.stopped")
    kept = _kept_vmm(compute, s.uuid)
    compute.kill()
    compute.start(bus)
    beats = Beats(make_bus, compute.host)
    try:
        assert beats.usage_when_shut_off() == Resources(vcpus=1, memory_mib=32)
        call(bus, q, DestroyDomain(domain_id=s.uuid))  # adopted: ended through its socket
        assert _gone(kept)
        assert beats.usage_when_shut_off() == Resources(vcpus=0, memory_mib=0)
    finally:
        beats.sub.close()


def test_a_crashed_domain_accepts_reset_and_refuses_ctrl_alt_del(
    node: tuple[ComputeProcess, Bus, EventLog], guest: Path
) -> None:
    compute, bus, events = node
    q = compute.queue
    s = spec(guest, "ready panic", on_crash=LifecycleAction.PRESERVE)
    call(bus, q, DefineDomain(spec=s))
    call(bus, q, StartDomain(domain_id=s.uuid))
    events.wait_type(s.uuid, "domain.crashed")
    with pytest.raises(RemoteError) as err:
        bus.call(q, RebootDomain(domain_id=s.uuid, mode=RebootMode.CTRL_ALT_DEL), timeout=10)
    assert err.value.code == "conflict"
    assert err.value.details["state"] == "crashed"
    # A reset is a fresh machine: this guest boots and panics again.
    call(bus, q, RebootDomain(domain_id=s.uuid, mode=RebootMode.RESET))
    events.wait_type(s.uuid, "domain.crashed", count=2)
    assert events.kinds(s.uuid) == [
        ("domain.defined", "added"),
        ("domain.started", "booted"),
        ("domain.crashed", "panicked"),
        ("domain.rebooted", ""),
        ("domain.crashed", "panicked"),
    ]
    assert wait_console(bus, q, s.uuid, "PANIC", count=2)
    call(bus, q, DestroyDomain(domain_id=s.uuid))


def test_a_vmm_that_died_while_the_worker_was_down_is_reported_so(
    node: tuple[ComputeProcess, Bus, EventLog], guest: Path
) -> None:
    compute, bus, events = node
    s = spec(guest)
    call(bus, compute.queue, DefineDomain(spec=s))
    info = call(bus, compute.queue, StartDomain(domain_id=s.uuid))
    assert info.pid is not None
    compute.kill()
    os.kill(info.pid, signal.SIGKILL)
    compute.start(bus)
    stopped = events.wait_type(s.uuid, "domain.stopped").model_dump()
    assert (stopped["detail"], stopped["reason"]) == (
        "failed",
        "the VMM process died while the compute node was down",
    )
    assert call(bus, compute.queue, GetDomainInfo(domain_id=s.uuid)).state is PowerState.SHUTOFF
