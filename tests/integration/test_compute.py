"""The compute node through AMQP, on a real broker and real KVM with the test guest: commands,
the exact event sequence seen by an independent subscriber, policies, capacity, restarts of the
worker and deaths of VMMs, broker outages, poison messages."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from compute_node.vmm_client import VmmClient
from protos import routing
from protos.commands import (
    DefineDomain,
    DestroyDomain,
    GetConsole,
    PauseDomain,
    RebootDomain,
    ResumeDomain,
    ShutdownDomain,
    StartDomain,
    UndefineDomain,
)
from protos.domain import BootSpec, DomainSpec, LifecycleAction, PowerState
from protos.events import DomainEvent
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
    assert not events.duplicates


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
