"""Save, restore, managed save and snapshots through a compute node's queue on real KVM: the
worker's handlers (compute_node/saving.py) over the KVM driver's VMM operations, with the
test guest counting, an independent subscriber checking the events and their seq, and a
kill -9 of the worker between a managed save and the start that restores it."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import pytest

from protos.bindings import StateRef
from protos.commands import (
    CreateSnapshot,
    DefineDomain,
    DeleteState,
    DestroyDomain,
    GetConsole,
    RestoreDomain,
    RevertSnapshot,
    SaveDomain,
    StartDomain,
    UndefineDomain,
)
from protos.domain import BootSpec, DomainSpec, PowerState
from protos.replies import ConsoleOutput, SavedState
from services.bus import Bus
from tests.integration import test_compute
from tests.integration.compute_harness import ComputeProcess, EventLog, call

pytestmark = [pytest.mark.integration, pytest.mark.kvm, pytest.mark.slow]


# The KVM compute node, its client bus and an independent subscriber: test_compute.py's.
guest = test_compute.guest
node = test_compute.node


def _console(bus: Bus, queue: str, domain_id: uuid.UUID) -> str:
    reply = bus.call(queue, GetConsole(domain_id=domain_id), timeout=20)
    assert isinstance(reply, ConsoleOutput)
    return reply.data


def _counters(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"COUNTER (\d+)", text)]


def _wait_counter(bus: Bus, queue: str, domain_id: uuid.UUID, at_least: int) -> list[int]:
    deadline = time.monotonic() + 60
    while True:
        counts = _counters(_console(bus, queue, domain_id))
        if counts and counts[-1] >= at_least:
            return counts
        assert time.monotonic() < deadline, f"counter stuck at {counts[-1:]}"
        time.sleep(0.1)


def _continues(bus: Bus, queue: str, domain_id: uuid.UUID, last: int) -> None:
    """The restored machine counts on from about `last` (a new VMM's console holds only what
    the guest printed since): no boot, no count from 0."""
    counts = _wait_counter(bus, queue, domain_id, last + 3)
    text = _console(bus, queue, domain_id)
    assert "READY" not in text, text[:400]
    assert min(counts) >= last - 1, counts[:5]
    assert counts == list(range(counts[0], counts[0] + len(counts))), counts


def _details(events: EventLog, domain_id: uuid.UUID) -> list[tuple[str, str, int]]:
    return [(e.TYPE, str(getattr(e, "detail", "")), e.seq) for e in events.of(domain_id)]


def test_save_restore_managed_save_and_snapshot_revert_on_kvm(
    node: tuple[ComputeProcess, Bus, EventLog], guest: Path
) -> None:
    compute, bus, events = node
    q = compute.queue
    spec = DomainSpec(
        name=f"saver-{uuid.uuid4().hex[:6]}",
        vcpus=1,
        memory_mib=64,
        boot=BootSpec(kernel=str(guest), cmdline="ready counter"),
    )
    d = spec.uuid
    call(bus, q, DefineDomain(spec=spec, privileged=True))
    call(bus, q, StartDomain(domain_id=d))
    before = _wait_counter(bus, q, d, 3)[-1]

    # save: shut off with STOPPED/SAVED; restore: the same machine counts on, no new boot.
    state = StateRef(state_id=uuid.uuid4(), host=compute.host)
    saved = bus.call(q, SaveDomain(domain_id=d, state=state), timeout=60)
    assert isinstance(saved, SavedState), saved
    assert (saved.memory, saved.power, saved.domain.state) == (
        True,
        PowerState.RUNNING,
        PowerState.SHUTOFF,
    )
    assert saved.bytes > 0
    events.wait(d, lambda evs: any(e.TYPE == "domain.stopped" for e in evs))
    info = call(bus, q, RestoreDomain(domain_id=d, state=state), timeout=60)
    assert info.state is PowerState.RUNNING
    _continues(bus, q, d, before)
    bus.call(q, DeleteState(domain_id=d, state=state), timeout=20)

    # managed save, the worker killed -9 and restarted: start restores it, then drops it.
    managed = StateRef(state_id=uuid.uuid4(), host=compute.host)
    saved = bus.call(q, SaveDomain(domain_id=d, state=managed, managed=True), timeout=60)
    assert isinstance(saved, SavedState), saved
    assert saved.domain.managed_save
    at_save = _counters(_console(bus, q, d))[-1]
    compute.kill()
    compute.start(bus)
    info = call(bus, q, StartDomain(domain_id=d), timeout=60)
    assert info.state is PowerState.RUNNING
    assert not info.managed_save
    _continues(bus, q, d, at_save)

    # a snapshot while running leaves it running; destroy; revert brings that moment back.
    snap = StateRef(state_id=uuid.uuid4(), host=compute.host)
    before_snapshot = _counters(_console(bus, q, d))[-1]
    taken = bus.call(q, CreateSnapshot(domain_id=d, state=snap), timeout=60)
    assert isinstance(taken, SavedState), taken
    assert taken.memory
    assert taken.domain.state is PowerState.RUNNING
    at_destroy = _wait_counter(bus, q, d, before_snapshot + 30)[-1]
    call(bus, q, DestroyDomain(domain_id=d))
    info = call(bus, q, RevertSnapshot(domain_id=d, state=snap), timeout=60)
    assert info.state is PowerState.RUNNING
    # Back to the snapshot's moment: counting from between the read before it and the
    # destroy 30 counts later, not from where the destroyed machine was.
    _continues(bus, q, d, before_snapshot)
    first = _counters(_console(bus, q, d))[0]
    assert first < at_destroy - 10, (first, at_destroy)
    call(bus, q, DestroyDomain(domain_id=d))
    bus.call(q, DeleteState(domain_id=d, state=snap), timeout=20)
    bus.call(q, UndefineDomain(domain_id=d), timeout=20)

    # What a subscriber saw: seq without gap, each restore said so.
    seen = _details(events, d)
    assert [s for _, _, s in seen] == list(range(1, len(seen) + 1)), seen
    kinds = [(t, detail) for t, detail, _ in seen]
    assert ("domain.stopped", "saved") in kinds
    assert kinds.count(("domain.started", "restored")) == 2, kinds
    assert ("domain.started", "from_snapshot") in kinds, kinds
