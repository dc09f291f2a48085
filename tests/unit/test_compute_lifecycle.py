"""The compute node's dispatcher, transition checks, events and policies, on the FakeDriver
(no broker: handlers are called the way the consumer runtime calls them)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from compute_node.boot_sources import BootSources
from compute_node.causes import PendingCauses
from compute_node.driver import GuestEvent, GuestEventKind
from compute_node.fake import FakeDriver
from compute_node.lifecycle import Lifecycle
from compute_node.resources import Claims
from compute_node.store import Store
from protos.base import Message
from protos.codec import Envelope, decode, envelope_for, parse_body
from protos.commands import (
    DefineDomain,
    DestroyDomain,
    GetConsole,
    ListDomains,
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
from protos.host import HostInventory, KvmKind, Resources
from protos.replies import DomainInfo, ErrorReply
from services.bus import Cause, Context, Expired, ServiceError
from services.bus.service import dispatch
from tests.bootfiles import BOOT_DIR, KERNEL

CTX = Context(Envelope(type="t", body={}, source="test"))


class Node:
    """A Lifecycle on a FakeDriver with a store in a temp dir; `events()` drains the outbox."""

    def __init__(self, path: Path, vcpus: int = 8, memory_mib: int = 8192) -> None:
        self.path = path
        self.driver = FakeDriver(vcpus, memory_mib)
        self.store = Store(path / "compute.db", host="node-1", source="compute:node-1")
        inventory = HostInventory(
            capacity=self.driver.host_resources(),
            cpu_allocation_ratio=1.0,
            ram_allocation_ratio=1.0,
            kvm=KvmKind.NONE,
        )
        self.claims = Claims(inventory, reserved_memory_mib=0)
        self.service = Lifecycle(
            "node-1", self.store, self.driver, self.claims, BootSources([BOOT_DIR])
        )

    def do(self, command: Message) -> Message:
        return dispatch(self.service, command, CTX)

    def ok(self, command: Message) -> DomainInfo:
        reply = self.do(command)
        assert isinstance(reply, DomainInfo), reply
        return reply

    def events(self) -> list[tuple[str, str, int]]:
        """(type, detail, seq) of every event published since the last call."""
        items = self.store.outbox()
        if items:
            self.store.outbox_done(items[-1].row)
        out = []
        for item in items:
            event = parse_body(decode(item.body))
            assert isinstance(event, DomainEvent)
            assert item.routing_key == f"domain.{event.EVENT}.{event.domain_id}"
            out.append((event.TYPE, str(getattr(event, "detail", "")), event.seq))
        return out


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    yield n
    n.store.close()


def spec(name: str = "web-1", **kw: object) -> DomainSpec:
    return DomainSpec.model_validate(
        {"name": name, "boot": BootSpec(kernel=KERNEL), "memory_mib": 256, **kw}
    )


def types(events: list[tuple[str, str, int]]) -> list[tuple[str, str]]:
    return [(t, d) for t, d, _ in events]


def test_full_lifecycle_emits_libvirt_events_with_rising_seq(node: Node) -> None:
    s = spec()
    d = s.uuid
    assert node.ok(DefineDomain(spec=s)).state is PowerState.SHUTOFF
    assert node.ok(StartDomain(domain_id=d)).state is PowerState.RUNNING
    assert node.ok(PauseDomain(domain_id=d)).state is PowerState.PAUSED
    assert node.ok(ResumeDomain(domain_id=d)).state is PowerState.RUNNING
    assert node.ok(RebootDomain(domain_id=d)).state is PowerState.RUNNING
    assert node.ok(ShutdownDomain(domain_id=d)).state is PowerState.SHUTOFF
    assert node.ok(StartDomain(domain_id=d)).state is PowerState.RUNNING
    assert node.ok(DestroyDomain(domain_id=d)).state is PowerState.SHUTOFF
    assert node.do(UndefineDomain(domain_id=d)) is not None
    events = node.events()
    assert types(events) == [
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
    assert [seq for *_, seq in events] == list(range(1, 11))


def test_refused_actions_answer_conflict_with_the_state(node: Node) -> None:
    s = spec()
    node.ok(DefineDomain(spec=s))
    reply = node.do(DestroyDomain(domain_id=s.uuid))
    assert reply.model_dump()["code"] == "conflict"
    assert reply.model_dump()["details"]["state"] == "shutoff"
    node.ok(StartDomain(domain_id=s.uuid))
    reply = node.do(UndefineDomain(domain_id=s.uuid))
    assert reply.model_dump()["code"] == "conflict"
    assert "destroy it first" in reply.model_dump()["message"]


def test_no_op_actions_emit_nothing(node: Node) -> None:
    s = spec()
    node.ok(DefineDomain(spec=s))
    node.ok(DefineDomain(spec=s))  # the same definition again
    node.ok(StartDomain(domain_id=s.uuid))
    node.ok(PauseDomain(domain_id=s.uuid))
    node.events()
    node.ok(PauseDomain(domain_id=s.uuid))
    node.ok(DefineDomain(spec=s.model_copy(update={"vcpus": 2})))
    assert types(node.events()) == [("domain.defined", "updated")]


def test_unknown_domain_is_not_found(node: Node) -> None:
    reply = node.do(StartDomain(domain_id=uuid.uuid4()))
    assert reply.model_dump()["code"] == "not_found"


def test_name_clash_is_a_conflict(node: Node) -> None:
    node.ok(DefineDomain(spec=spec("same")))
    reply = node.do(DefineDomain(spec=spec("same")))
    assert reply.model_dump()["code"] == "conflict"


def test_capacity_refusal_says_what_is_short(tmp_path: Path) -> None:
    node = Node(tmp_path, vcpus=2, memory_mib=1024)
    a, b = spec("a", memory_mib=768), spec("b", memory_mib=768)
    for s in (a, b):
        node.ok(DefineDomain(spec=s))
    node.ok(StartDomain(domain_id=a.uuid))
    reply = node.do(StartDomain(domain_id=b.uuid)).model_dump()
    assert reply["code"] == "no_capacity"
    assert "memory: 768 MiB wanted, 256 free" in reply["message"]
    assert reply["details"]["free"] == {"vcpus": 1, "memory_mib": 256}
    # Stopping the first frees its claim.
    node.ok(DestroyDomain(domain_id=a.uuid))
    assert node.ok(StartDomain(domain_id=b.uuid)).state is PowerState.RUNNING


def test_spawn_failure_is_reported_and_releases_the_claim(node: Node) -> None:
    s = spec()
    node.ok(DefineDomain(spec=s))
    node.events()
    node.driver.fail_next_spawn = "kernel /guest.elf is not a file"
    reply = node.do(StartDomain(domain_id=s.uuid)).model_dump()
    assert reply["code"] == "spawn_failed"
    assert "not a file" in reply["message"]
    assert node.events() == []
    assert not node.claims.holds(s.uuid)


@pytest.mark.parametrize(
    ("policy", "expected", "state"),
    [
        (
            LifecycleAction.RESTART,
            [
                ("domain.crashed", "panicked"),
                ("domain.stopped", "crashed"),
                ("domain.started", "booted"),
            ],
            PowerState.RUNNING,
        ),
        (
            LifecycleAction.DESTROY,
            [("domain.crashed", "panicked"), ("domain.stopped", "crashed")],
            PowerState.SHUTOFF,
        ),
        (LifecycleAction.PRESERVE, [("domain.crashed", "panicked")], PowerState.CRASHED),
    ],
)
def test_on_crash_policies(
    node: Node, policy: LifecycleAction, expected: list[tuple[str, str]], state: PowerState
) -> None:
    s = spec(on_crash=policy)
    node.ok(DefineDomain(spec=s))
    node.ok(StartDomain(domain_id=s.uuid))
    node.events()
    node.driver.guest_panic(s.uuid)
    assert types(node.events()) == expected
    record = node.store.get(s.uuid)
    assert record is not None
    assert record.state is state


def test_a_crashed_domain_is_reset_but_not_rebooted(node: Node) -> None:
    s = spec(on_crash=LifecycleAction.PRESERVE)
    node.ok(DefineDomain(spec=s))
    node.ok(StartDomain(domain_id=s.uuid))
    node.driver.guest_panic(s.uuid)
    node.events()
    with pytest.raises(ServiceError) as err:
        node.service.reboot(RebootDomain(domain_id=s.uuid, mode=RebootMode.CTRL_ALT_DEL), CTX)
    assert err.value.code == "conflict"
    assert "crashed" in err.value.message
    info = node.ok(RebootDomain(domain_id=s.uuid, mode=RebootMode.RESET))
    assert info.state is PowerState.RUNNING
    assert types(node.events()) == [("domain.rebooted", "")]


def test_on_poweroff_restart_and_on_reboot_destroy(node: Node) -> None:
    a = spec("a", on_poweroff=LifecycleAction.RESTART)
    b = spec("b", on_reboot=LifecycleAction.DESTROY)
    for s in (a, b):
        node.ok(DefineDomain(spec=s))
        node.ok(StartDomain(domain_id=s.uuid))
    node.events()
    node.driver.guest_poweroff(a.uuid)
    assert types(node.events()) == [
        ("domain.shutdown", "guest"),
        ("domain.stopped", "shutdown"),
        ("domain.started", "booted"),
    ]
    node.driver.guest_reboot(b.uuid)
    assert types(node.events()) == [("domain.stopped", "shutdown")]


def test_machine_death_is_stopped_failed(node: Node) -> None:
    s = spec()
    node.ok(DefineDomain(spec=s))
    node.ok(StartDomain(domain_id=s.uuid))
    node.events()
    node.driver.machine_dies(s.uuid)
    assert types(node.events()) == [("domain.stopped", "failed")]


def test_a_driver_event_already_consumed_is_ignored(node: Node) -> None:
    s = spec()
    node.ok(DefineDomain(spec=s))
    node.ok(StartDomain(domain_id=s.uuid))
    node.ok(PauseDomain(domain_id=s.uuid))
    node.events()
    record = node.store.get(s.uuid)
    assert record is not None
    node.service.on_guest_event(GuestEvent(s.uuid, record.driver_n, GuestEventKind.RESUMED))
    assert node.events() == []


def test_seq_and_definitions_survive_a_restart(tmp_path: Path) -> None:
    first = Node(tmp_path)
    s = spec()
    first.ok(DefineDomain(spec=s))
    first.ok(StartDomain(domain_id=s.uuid))
    assert [seq for *_, seq in first.events()] == [1, 2]
    first.store.close()
    second = Node(tmp_path)
    second.driver = first.driver  # the machines outlived the worker
    second.service = Lifecycle(
        "node-1", second.store, first.driver, second.claims, BootSources([BOOT_DIR])
    )
    listed = second.do(ListDomains()).model_dump()
    assert [d["name"] for d in listed["domains"]] == ["web-1"]
    assert second.ok(PauseDomain(domain_id=s.uuid)).seq == 3
    assert [seq for *_, seq in second.events()] == [3]


def test_console_and_list(node: Node) -> None:
    s = spec()
    node.ok(DefineDomain(spec=s))
    node.ok(StartDomain(domain_id=s.uuid))
    console = node.do(GetConsole(domain_id=s.uuid)).model_dump()
    assert "READY" in console["data"]
    running = node.do(ListDomains(states=[PowerState.RUNNING])).model_dump()
    assert [d["name"] for d in running["domains"]] == ["web-1"]
    assert node.do(ListDomains(states=[PowerState.PAUSED])).model_dump()["domains"] == []


def test_a_started_domain_says_at_which_claim_count_its_host_took_it(node: Node) -> None:
    s = spec()
    assert node.ok(DefineDomain(spec=s)).claim_seq is None  # defined: holds nothing yet
    before = node.service.claims.usage_at()[1]
    started = node.ok(StartDomain(domain_id=s.uuid))
    usage, count = node.service.claims.usage_at()
    assert started.claim_seq == count == before + 1
    assert usage.vcpus == s.vcpus
    node.ok(DestroyDomain(domain_id=s.uuid))
    usage, after = node.service.claims.usage_at()
    assert (usage.vcpus, after) == (0, count + 1)  # a release counts too
    # Counts start past any earlier process's (time-based), so they grow across restarts.
    again = Claims(node.service.claims.inventory, reserved_memory_mib=0)
    assert again.usage_at()[1] > after


def test_claims_limits_apply_overcommit_and_reserve() -> None:
    inventory = HostInventory(
        capacity=Resources(vcpus=4, memory_mib=4096),
        cpu_allocation_ratio=4.0,
        ram_allocation_ratio=1.5,
        kvm=KvmKind.PVM,
    )
    claims = Claims(inventory, reserved_memory_mib=1024)
    assert claims.limits() == Resources(vcpus=16, memory_mib=4608)
    with pytest.raises(ServiceError, match="vCPUs: 17 wanted, 16 free"):
        claims.claim(spec(vcpus=17))


def test_a_disabled_host_says_so(node: Node) -> None:
    from protos.replies import Done
    from protos.scheduler import SetHostEnabled

    assert node.do(SetHostEnabled(enabled=False, reason="maintenance")) == Done()
    assert node.service.enabled is False
    assert node.service.disabled_reason == "maintenance"
    assert node.service.host_switch() == (False, 1)  # a 1.0 sender: the next generation
    node.do(SetHostEnabled(enabled=True, generation=50))
    assert node.service.host_switch() == (True, 50)
    # One asked before the last taken, delivered late, changes nothing.
    assert node.do(SetHostEnabled(enabled=False, generation=40)) == Done()
    assert node.service.host_switch() == (True, 50)
    node.do(SetHostEnabled(enabled=False, reason="disk swap", generation=60))
    # A restart keeps the switch (Nova keeps a disabled service in its database).
    again = Lifecycle(
        "h1", node.service.store, node.service.driver, node.service.claims, node.service.sources
    )
    assert (again.enabled, again.disabled_reason, again.enabled_generation) == (
        False,
        "disk swap",
        60,
    )


def test_events_carry_the_cause_of_the_command_that_made_them(node: Node) -> None:
    s = spec("caused", on_poweroff=LifecycleAction.RESTART)
    d = s.uuid

    def do(command: Message, correlation: str) -> Envelope:
        envelope = Envelope(type=command.TYPE, body={}, source="api", correlation_id=correlation)
        reply = dispatch(node.service, command, Context(envelope))
        assert not isinstance(reply, ErrorReply), reply
        return envelope

    def causes() -> list[tuple[str, str | None, str | None]]:
        items = node.store.outbox()
        node.store.outbox_done(items[-1].row)
        return [(e.type, e.correlation_id, e.causation_id) for e in (decode(i.body) for i in items)]

    define = do(DefineDomain(spec=s), "req-1")
    start = do(StartDomain(domain_id=d), "req-2")
    pause = do(PauseDomain(domain_id=d), "req-3")
    resume = do(ResumeDomain(domain_id=d), "req-4")
    assert causes() == [
        ("domain.defined", "req-1", define.id),
        ("domain.started", "req-2", start.id),
        ("domain.suspended", "req-3", pause.id),
        ("domain.resumed", "req-4", resume.id),
    ]
    # What the guest does by itself has no cause, even right after a command.
    node.driver.guest_poweroff(d)
    assert causes() == [
        ("domain.shutdown", None, None),
        ("domain.stopped", None, None),
        ("domain.started", None, None),
    ]
    shutdown = do(ShutdownDomain(domain_id=d, wait=False), "req-5")
    assert causes() == [
        ("domain.shutdown", "req-5", shutdown.id),
        ("domain.stopped", "req-5", shutdown.id),
        ("domain.started", "req-5", shutdown.id),  # on_poweroff=restart, after the command
    ]
    destroy = do(DestroyDomain(domain_id=d), "req-7")
    undefine = do(UndefineDomain(domain_id=d), "req-8")
    assert causes() == [
        ("domain.stopped", "req-7", destroy.id),
        ("domain.undefined", "req-8", undefine.id),
    ]


def test_a_members_host_path_outside_the_allowed_dirs_is_refused_at_define(node: Node) -> None:
    s = spec(boot=BootSpec(kernel=KERNEL, initrd="/etc/shadow"))
    reply = node.do(DefineDomain(spec=s)).model_dump()
    assert (reply["code"], reply["details"]) == ("forbidden", {"field": "boot.initrd"})
    assert "allowed_boot_dirs" in reply["message"]
    assert node.store.get(s.uuid) is None
    assert node.events() == []


def test_an_admins_definition_keeps_its_privilege_across_a_restart(tmp_path: Path) -> None:
    outside = tmp_path / "vmlinuz"
    outside.write_bytes(b"k")
    s = spec(boot=BootSpec(kernel=str(outside)))
    first = Node(tmp_path)
    first.ok(DefineDomain(spec=s, privileged=True))
    first.store.close()
    second = Node(tmp_path)
    assert second.ok(StartDomain(domain_id=s.uuid)).state is PowerState.RUNNING
    # A member's identical definition of another domain is refused at define and at start.
    m = spec("member-1", boot=BootSpec(kernel=str(outside)))
    assert second.do(DefineDomain(spec=m)).model_dump()["code"] == "forbidden"
    second.store.define(m, [])  # as if defined before the rule
    reply = second.do(StartDomain(domain_id=m.uuid)).model_dump()
    assert (reply["code"], reply["details"]) == ("forbidden", {"field": "boot.kernel"})
    assert not second.claims.holds(m.uuid)
    second.store.close()


def test_a_boot_file_gone_before_start_is_refused_without_a_claim(tmp_path: Path) -> None:
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "k").write_bytes(b"k")
    n = Node(tmp_path)
    n.service.sources = BootSources([allowed])
    s = spec(boot=BootSpec(kernel=str(allowed / "k")))
    n.ok(DefineDomain(spec=s))
    (allowed / "k").unlink()
    reply = n.do(StartDomain(domain_id=s.uuid)).model_dump()
    assert reply["code"] == "forbidden"  # a member is not told whether it exists
    assert not n.claims.holds(s.uuid)
    n.store.close()


def test_a_store_from_before_the_privilege_column_opens(tmp_path: Path) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / "compute.db")
    db.execute(
        "CREATE TABLE domains (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, spec TEXT NOT "
        "NULL, state TEXT NOT NULL, seq INTEGER NOT NULL DEFAULT 0, driver_n INTEGER NOT NULL "
        "DEFAULT 0, updated REAL NOT NULL)"
    )
    s = spec()
    db.execute(
        "INSERT INTO domains (id, name, spec, state, updated) VALUES (?, ?, ?, 'shutoff', 0)",
        (str(s.uuid), s.name, s.model_dump_json()),
    )
    db.commit()
    db.close()
    n = Node(tmp_path)
    record = n.store.get(s.uuid)
    assert record is not None
    assert record.privileged is False
    assert n.ok(StartDomain(domain_id=s.uuid)).state is PowerState.RUNNING
    n.store.close()


def test_a_command_that_failed_leaves_no_cause_for_later_events() -> None:
    causes = PendingCauses()
    domain = uuid.uuid4()
    cause = Cause(correlation_id="req-1", causation_id="m-1")
    with pytest.raises(RuntimeError), causes.expecting(domain, cause, {GuestEventKind.PAUSED}):
        raise RuntimeError("the driver refused")
    # The guest pausing itself later is no consequence of the failed command.
    assert causes.take(domain, GuestEventKind.PAUSED) is None
    with causes.expecting(domain, cause, {GuestEventKind.PAUSED}):
        pass
    assert causes.take(domain, GuestEventKind.PAUSED) == cause


def test_a_start_that_expires_while_it_waits_for_the_domains_lock_does_not_run(
    node: Node,
) -> None:
    """The lock orders a start with the clean-up its sender sends once it gives up: a start
    that gets the lock only after its expiry is dropped (Expired: the runner dead-letters it),
    so it cannot run after that clean-up."""
    defined = node.ok(DefineDomain(spec=spec(), privileged=True))
    envelope = envelope_for(StartDomain(domain_id=defined.domain_id), source="s", expires_in=0.2)
    ctx = Context(envelope)
    outcome: list[object] = []

    def start() -> None:
        try:
            outcome.append(dispatch(node.service, StartDomain(domain_id=defined.domain_id), ctx))
        except Expired as exc:
            outcome.append(exc)

    with node.service._lock(defined.domain_id):  # a command under way holds it
        worker = threading.Thread(target=start)
        worker.start()
        time.sleep(0.4)
    worker.join(10)
    assert len(outcome) == 1
    assert isinstance(outcome[0], Expired)
    assert node.store.get(defined.domain_id).state is PowerState.SHUTOFF  # type: ignore[union-attr]
    # Taken in time, the same start runs.
    fresh = Context(
        envelope_for(StartDomain(domain_id=defined.domain_id), source="s", expires_in=30)
    )
    reply = dispatch(node.service, StartDomain(domain_id=defined.domain_id), fresh)
    assert isinstance(reply, DomainInfo)
    assert reply.state is PowerState.RUNNING


def test_define_and_start_in_one_command(tmp_path: Path) -> None:
    """DefineDomain(start, and_start) defines and starts (defined/added, then started/booted,
    seq in order) and answers the running domain; a start refused for room answers the
    refusal and keeps the definition, shut off, its start still pending; a redefinition of a
    domain that runs starts nothing more."""
    node = Node(tmp_path, vcpus=2, memory_mib=1024)
    first = spec("first", memory_mib=768)
    info = node.ok(DefineDomain(spec=first, start=True, and_start=True))
    assert info.state is PowerState.RUNNING
    assert [(t, d) for t, d, _ in node.events()] == [
        ("domain.defined", "added"),
        ("domain.started", "booted"),
    ]
    assert not node.store.get(first.uuid).start_pending  # type: ignore[union-attr]
    again = node.ok(DefineDomain(spec=first, start=True, and_start=True))
    assert again.state is PowerState.RUNNING
    assert node.events() == []  # nothing changed, nothing started twice
    second = spec("second", memory_mib=768)
    refused = node.do(DefineDomain(spec=second, start=True, and_start=True)).model_dump()
    assert refused["code"] == "no_capacity"
    kept = node.store.get(second.uuid)
    assert kept is not None
    assert kept.state is PowerState.SHUTOFF
    assert kept.start_pending
    # Without `and_start` (a sender older than 1.7's): defined only, as before.
    third = spec("third", memory_mib=128)
    assert node.ok(DefineDomain(spec=third, start=True)).state is PowerState.SHUTOFF
    node.store.close()


def test_a_requested_start_is_kept_with_the_definition_until_the_domain_runs(
    tmp_path: Path,
) -> None:
    """DefineDomain.start is kept (across a restart) and StartDomain(if_pending) starts only
    a domain whose requested start has not happened; older senders (None) change nothing."""
    node = Node(tmp_path)
    asked = node.ok(DefineDomain(spec=spec("asked"), privileged=True, start=True))
    plain = node.ok(DefineDomain(spec=spec("plain"), privileged=True))
    not_asked = node.ok(DefineDomain(spec=spec("no"), privileged=True, start=False))
    node.store.close()
    node = Node(tmp_path)  # the worker restarted meanwhile
    try:
        assert node.store.get(asked.domain_id).start_pending  # type: ignore[union-attr]
        # A redefinition that does not say keeps it.
        kept = node.store.get(asked.domain_id).spec  # type: ignore[union-attr]
        node.ok(DefineDomain(spec=kept.model_copy(update={"vcpus": 2}), privileged=True))
        assert node.store.get(asked.domain_id).start_pending  # type: ignore[union-attr]
        for info in (plain, not_asked):
            reply = node.ok(StartDomain(domain_id=info.domain_id, if_pending=True))
            assert reply.state is PowerState.SHUTOFF
        reply = node.ok(StartDomain(domain_id=asked.domain_id, if_pending=True))
        assert reply.state is PowerState.RUNNING
        assert not node.store.get(asked.domain_id).start_pending  # type: ignore[union-attr]
        # Once it ran, a later finishing start does nothing: the user's stop stands.
        node.ok(DestroyDomain(domain_id=asked.domain_id))
        reply = node.ok(StartDomain(domain_id=asked.domain_id, if_pending=True))
        assert reply.state is PowerState.SHUTOFF
    finally:
        node.store.close()
