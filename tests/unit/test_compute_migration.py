"""Migration between two compute nodes' lifecycle services in one process, on FakeDrivers that
stream over loopback TCP (no broker: each node's calls to the other are dispatched to it the
way the consumer runtime would)."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from compute_node.boot_sources import BootSources
from compute_node.driver import (
    DriverError,
    GuestEvent,
    GuestEventKind,
    IncomingMachine,
    MigrationStats,
)
from compute_node.fake import FakeDriver
from compute_node.fake_migration import read_line, send_line
from compute_node.lifecycle import Lifecycle
from compute_node.migrating import FINISH_ATTEMPTS
from compute_node.migration_jobs import Job
from compute_node.resources import Claims
from compute_node.storage.pool import Pool
from compute_node.storage_sources import StorageBindings, StorageSources
from compute_node.store import Store
from compute_node.translate import translate
from protos import routing
from protos.base import Message
from protos.bindings import DiskBinding, StateRef
from protos.codec import Envelope, decode, parse_body
from protos.commands import (
    Command,
    DefineDomain,
    DestroyDomain,
    GetDomainInfo,
    ListDomains,
    PauseDomain,
    StartDomain,
)
from protos.domain import BootSpec, DiskSpec, DomainSpec, NicSpec, PowerState
from protos.events import DomainEvent, DomainMigrationProgress
from protos.host import HostInventory, KvmKind
from protos.migration import (
    AbortMigration,
    FinishIncoming,
    GetMigrationJob,
    MigrationJob,
    MigrationParams,
    MigrationPhase,
    PrepareIncoming,
    SetMigrationParams,
    StartMigration,
    TimeoutAction,
)
from protos.network import BindPorts
from protos.replies import DomainInfo, Done, ErrorReply
from protos.volumes import LiveMoveVolume, MoveVolume
from services.bus import Cause, Context
from services.bus.cause import current_cause
from services.bus.errors import RemoteError, RpcTimeout
from services.bus.service import dispatch
from tests.bootfiles import BOOT_DIR, KERNEL
from tests.unit.test_compute_ports import port

CTX = Context(Envelope(type="t", body={}, source="test"))


class Host:
    """A Lifecycle on a FakeDriver, reaching the other hosts through `cluster`."""

    def __init__(self, path: Path, name: str, cluster: dict[str, Host]) -> None:
        self.name = name
        self.driver = FakeDriver(8, 8192)
        self.store = Store(path / name / "compute.db", host=name, source=f"compute:{name}")
        inventory = HostInventory(
            capacity=self.driver.host_resources(),
            cpu_allocation_ratio=1.0,
            ram_allocation_ratio=1.0,
            kvm=KvmKind.NONE,
        )
        self.claims = Claims(inventory, reserved_memory_mib=0)
        self.service = Lifecycle(
            name, self.store, self.driver, self.claims, BootSources([BOOT_DIR])
        )
        self.cluster = cluster
        self.sent: list[Command] = []  # every call this host made to another
        self.unreachable: set[type[Command]] = set()  # calls that get no answer
        self.answers_lost: dict[type[Command], int] = {}  # calls run, whose answer is lost
        self.service.peer_call = self.call
        self.service.incoming_check_s = 0.05  # the target asks its source often: races show
        cluster[name] = self

    def call(
        self, queue: str, command: Command, timeout: float, message_id: str | None = None
    ) -> Message:
        del timeout, message_id
        self.sent.append(command)
        if type(command) in self.unreachable:
            raise RpcTimeout(f"{command.TYPE} to {queue!r}: no reply")
        if queue == routing.NETWORK_QUEUE:
            return Done()  # the network service: what it was asked is in `sent`
        if queue == routing.STORAGE_QUEUE:  # none here: what it was asked is in `sent`
            raise RemoteError("not_found", "no storage service in this test")
        cause = current_cause() or Cause()  # as Bus.call sends it
        envelope = Envelope(
            type=command.TYPE,
            body={},
            source=f"compute:{self.name}",
            correlation_id=cause.correlation_id,
            causation_id=cause.causation_id,
        )
        target = self.cluster[queue.removeprefix("compute.")].service
        reply = dispatch(target, command, Context(envelope))
        if self.answers_lost.get(type(command), 0) > 0:
            self.answers_lost[type(command)] -= 1
            raise RpcTimeout(f"{command.TYPE} to {queue!r}: no reply")
        if isinstance(reply, ErrorReply):
            raise RemoteError(reply.code, reply.message, reply.details)
        return reply

    def do(self, command: Message) -> Message:
        return dispatch(self.service, command, CTX)

    def events(self) -> list[tuple[str, str, int]]:
        """(type, detail or phase, seq) of every event in the outbox since the last call."""
        items = self.store.outbox()
        if items:
            self.store.outbox_done(items[-1].row)
        out = []
        for item in items:
            event = parse_body(decode(item.body))
            assert isinstance(event, DomainEvent)
            detail = event.phase if isinstance(event, DomainMigrationProgress) else ""
            out.append((event.TYPE, str(getattr(event, "detail", detail)), event.seq))
        return out


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[Host, Host]]:
    cluster: dict[str, Host] = {}
    a, b = Host(tmp_path, "node-a", cluster), Host(tmp_path, "node-b", cluster)
    yield a, b
    for host in (a, b):
        host.service.stop_migrations()
        host.service.storage_steps.stop()
        host.store.close()


def spec(name: str = "web-1", memory_mib: int = 64) -> DomainSpec:
    return DomainSpec(name=name, boot=BootSpec(kernel=KERNEL), memory_mib=memory_mib)


def running(host: Host, s: DomainSpec, *, paused: bool = False) -> None:
    assert isinstance(host.do(DefineDomain(spec=s)), DomainInfo)
    assert isinstance(host.do(StartDomain(domain_id=s.uuid, paused=paused)), DomainInfo)


def wait_job(host: Host, domain_id: uuid.UUID, timeout: float = 20.0) -> MigrationJob:
    deadline = time.monotonic() + timeout
    while True:
        job = host.do(GetMigrationJob(domain_id=domain_id))
        assert isinstance(job, MigrationJob), job
        if job.phase in (MigrationPhase.DONE, MigrationPhase.FAILED, MigrationPhase.CANCELLED):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)


def start(host: Host, s: DomainSpec, params: MigrationParams) -> MigrationJob:
    reply = host.do(StartMigration(domain_id=s.uuid, target="node-b", params=params))
    assert isinstance(reply, MigrationJob), reply
    return reply


def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def lifecycle(events: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    return [e for e in events if e[0] != "domain.migration_progress"]


def test_live_migration_moves_the_guest_and_seq_continues(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    s = spec()
    running(a, s)
    a.driver.guest_reboot(s.uuid)  # a counter the guest keeps, carried over
    assert [e[:2] for e in lifecycle(a.events())] == [
        ("domain.defined", "added"),
        ("domain.started", "booted"),
        ("domain.rebooted", ""),
    ]
    reply = a.do(StartMigration(domain_id=s.uuid, target="node-b"))
    assert isinstance(reply, MigrationJob), reply
    assert (reply.source, reply.target, reply.live) == ("node-a", "node-b", True)
    job = wait_job(a, s.uuid)
    assert job.phase is MigrationPhase.DONE, job
    assert job.downtime_ms is not None
    assert job.paused_ms is not None
    assert job.bytes_sent >= 64 << 20
    time.sleep(0.05)
    again = a.do(GetMigrationJob(domain_id=s.uuid))
    assert isinstance(again, MigrationJob)
    assert again.elapsed_ms == job.elapsed_ms  # an ended job's time stands still

    source_events = a.events()
    assert lifecycle(source_events) == [
        ("domain.suspended", "migrated", 4),
        ("domain.stopped", "migrated", 5),
    ]
    progress = [e for e in source_events if e[0] == "domain.migration_progress"]
    assert progress[-1] == ("domain.migration_progress", "done", 5)
    assert b.events() == [("domain.started", "migrated", 6)]

    # The target lists it, the source does not; the claim moved; the guest's state came.
    assert a.store.get(s.uuid) is None
    info = b.do(GetDomainInfo(domain_id=s.uuid))
    assert isinstance(info, DomainInfo)
    assert (info.host, info.state, info.seq) == ("node-b", PowerState.RUNNING, 6)
    assert not a.claims.holds(s.uuid)
    assert b.claims.holds(s.uuid)
    assert b.driver._machines[s.uuid].counters == {"boots": 1, "resets": 1}
    assert b.driver.console(s.uuid, 100)[0] == b"flotilla-guest: READY\n"
    assert not a.driver.get_info(s.uuid).pid


def test_a_paused_guest_arrives_paused(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    s = spec()
    running(a, s, paused=True)
    a.events()
    assert isinstance(a.do(StartMigration(domain_id=s.uuid, target="node-b")), MigrationJob)
    assert wait_job(a, s.uuid).phase is MigrationPhase.DONE
    assert lifecycle(a.events()) == [("domain.stopped", "migrated", 4)]
    assert b.events() == [("domain.started", "migrated", 5), ("domain.suspended", "migrated", 6)]
    finish = [c for c in a.sent if isinstance(c, FinishIncoming)]
    assert [(f.committed, f.seq, f.state) for f in finish] == [(True, 4, PowerState.PAUSED)]


def test_an_incoming_domain_is_hidden_until_it_is_finished(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    b.service.incoming_check_s = 60  # no job on node-a: the target must not ask meanwhile
    s = spec()
    running(a, s)
    prepare = PrepareIncoming(spec=s, source="node-a", seq=2)
    endpoint = b.do(prepare)
    assert endpoint.model_dump()["token"] is not None
    assert b.claims.holds(s.uuid)
    listed = b.do(ListDomains())
    assert listed.model_dump()["domains"] == []
    assert b.do(GetDomainInfo(domain_id=s.uuid)).model_dump()["code"] == "not_found"
    again = b.do(DefineDomain(spec=s))
    assert isinstance(again, ErrorReply)
    assert again.code == "conflict"
    assert b.do(prepare).model_dump()["code"] == "conflict"
    # Not committed: everything undone, and again is a no-op.
    for _ in range(2):
        assert b.do(FinishIncoming(domain_id=s.uuid, committed=False, seq=2)).TYPE == "reply.done"
    assert b.store.get(s.uuid) is None
    assert not b.claims.holds(s.uuid)
    assert b.events() == []


def test_the_state_table_one_job_and_host_local_disks(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    s = spec()
    running(a, s)
    slow = MigrationParams(bandwidth_mibps=32)
    assert isinstance(
        a.do(StartMigration(domain_id=s.uuid, target="node-b", params=slow)), MigrationJob
    )
    again = a.do(StartMigration(domain_id=s.uuid, target="node-b"))
    assert isinstance(again, ErrorReply)
    assert again.code == "conflict"
    assert "migrating" in again.message
    paused = a.do(PauseDomain(domain_id=s.uuid))
    assert isinstance(paused, ErrorReply)
    assert paused.code == "conflict"
    assert isinstance(a.do(AbortMigration(domain_id=s.uuid)), MigrationJob)
    assert wait_job(a, s.uuid).phase is MigrationPhase.CANCELLED

    volume = uuid.uuid4()
    local = DomainSpec(
        name="db-1", boot=BootSpec(kernel=KERNEL), disks=[DiskSpec(target="vdb", volume_id=volume)]
    )
    binding = DiskBinding(target="vdb", volume_id=volume, pool="default", host="node-a")
    a.store.define(local, [], bindings=StorageBindings(disks=(binding,)))
    a.unreachable.add(MoveVolume)  # cold: the storage service moves the volume first
    for live in (True, False):
        reply = a.do(
            StartMigration(domain_id=local.uuid, target="node-b", params=MigrationParams(live=live))
        )
        assert isinstance(reply, ErrorReply)
        if live:
            assert reply.code == "conflict"  # shut off: not live
        else:
            assert (reply.code, reply.details["field"]) == ("unavailable", "disks")
            assert "vdb" in reply.message
    assert [type(c) for c in a.sent[-1:]] == [MoveVolume]  # asked, and nothing more
    # No job was left behind: the domain may be migrated again.
    never = a.do(GetMigrationJob(domain_id=local.uuid))
    assert isinstance(never, ErrorReply)
    assert never.code == "not_found"
    assert a.store.get(local.uuid) is not None
    assert b.store.get(local.uuid) is None
    # A writable host file stays on its host: refused either way.
    path = DomainSpec(
        name="db-2", boot=BootSpec(kernel=KERNEL), disks=[DiskSpec(target="vdb", path=KERNEL)]
    )
    a.store.define(path, [])
    reply = a.do(
        StartMigration(domain_id=path.uuid, target="node-b", params=MigrationParams(live=False))
    )
    assert isinstance(reply, ErrorReply)
    assert (reply.code, reply.details["field"]) == ("invalid", "disks")
    assert a.do(StartMigration(domain_id=s.uuid, target="node-a")).model_dump()["code"] == "invalid"


def test_abort_leaves_the_source_running_and_the_target_clean(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    s = spec()
    running(a, s)
    a.events()
    params = MigrationParams(bandwidth_mibps=32)
    assert isinstance(
        a.do(StartMigration(domain_id=s.uuid, target="node-b", params=params)), MigrationJob
    )
    time.sleep(0.3)
    job = a.do(SetMigrationParams(domain_id=s.uuid, max_downtime_ms=50, bandwidth_mibps=16))
    assert isinstance(job, MigrationJob)
    assert job.params.max_downtime_ms == 50
    assert a.driver.migration_params(s.uuid) == job.params
    aborted = a.do(AbortMigration(domain_id=s.uuid))
    assert isinstance(aborted, MigrationJob)
    assert aborted.phase is MigrationPhase.CANCELLED
    info = a.do(GetDomainInfo(domain_id=s.uuid))
    assert isinstance(info, DomainInfo)
    assert info.state is PowerState.RUNNING
    assert lifecycle(a.events()) == []  # it never paused
    eventually(lambda: b.store.get(s.uuid) is None)  # the target forgets it
    assert not b.claims.holds(s.uuid)
    assert b.events() == []
    assert a.do(AbortMigration(domain_id=s.uuid)).model_dump()["phase"] == "cancelled"


def test_timeout_pause_completes_with_the_guest_paused(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    s = spec()
    running(a, s)
    a.events()
    params = MigrationParams(bandwidth_mibps=64, timeout_s=0.2, timeout_action=TimeoutAction.PAUSE)
    assert isinstance(
        a.do(StartMigration(domain_id=s.uuid, target="node-b", params=params)), MigrationJob
    )
    assert wait_job(a, s.uuid).phase is MigrationPhase.DONE
    assert lifecycle(a.events()) == [
        ("domain.suspended", "paused", 3),
        ("domain.stopped", "migrated", 4),
    ]
    assert b.events() == [("domain.started", "migrated", 5), ("domain.suspended", "migrated", 6)]


def test_timeout_abort_cancels(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    s = spec()
    running(a, s)
    params = MigrationParams(bandwidth_mibps=32, timeout_s=0.2)
    assert isinstance(
        a.do(StartMigration(domain_id=s.uuid, target="node-b", params=params)), MigrationJob
    )
    job = wait_job(a, s.uuid)
    assert job.phase is MigrationPhase.CANCELLED
    assert "timed out" in (job.error or "")
    eventually(lambda: b.store.get(s.uuid) is None)  # the target forgets it


def test_target_refusal_is_the_answer_and_nothing_moves(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    big = spec("big", memory_mib=8192)
    b.claims.claim(spec("squatter", memory_mib=4096))
    running(a, big)
    reply = a.do(StartMigration(domain_id=big.uuid, target="node-b"))
    assert isinstance(reply, ErrorReply)
    assert reply.code == "no_capacity", reply
    assert reply.details["target"] == "node-b"
    assert b.store.get(big.uuid) is None
    assert a.do(GetMigrationJob(domain_id=big.uuid)).model_dump()["code"] == "not_found"


def test_cold_migration_moves_the_definition(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    s = spec()
    assert isinstance(a.do(DefineDomain(spec=s)), DomainInfo)
    a.events()
    cold = MigrationParams(live=False)
    reply = a.do(StartMigration(domain_id=s.uuid, target="node-b", params=cold))
    assert isinstance(reply, MigrationJob), reply
    assert wait_job(a, s.uuid).phase is MigrationPhase.DONE
    assert a.store.get(s.uuid) is None
    assert b.events() == [("domain.defined", "migrated", 2)]
    assert [e[:2] for e in a.events()] == [("domain.migration_progress", "done")]
    assert not b.claims.holds(s.uuid)
    assert isinstance(b.do(StartDomain(domain_id=s.uuid)), DomainInfo)


def test_the_target_adopts_a_guest_whose_source_died_after_the_commit(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    b.service.incoming_adopt_s = 0.3
    s = spec()
    running(a, s)
    a.unreachable.add(FinishIncoming)  # the source is gone before it can say so
    assert isinstance(a.do(StartMigration(domain_id=s.uuid, target="node-b")), MigrationJob)
    assert wait_job(a, s.uuid).phase is MigrationPhase.DONE
    deadline = time.monotonic() + 5
    while b.store.get(s.uuid) is None or b.store.get(s.uuid).incoming is not None:  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # seq 2 at the prepare; the source's SUSPENDED and STOPPED were 3 and 4.
    assert b.events() == [("domain.started", "migrated", 5)]
    assert [e for e in lifecycle(a.events()) if e[2] > 2] == [
        ("domain.suspended", "migrated", 3),
        ("domain.stopped", "migrated", 4),
    ]


def test_a_target_that_forgets_an_orphan_live_migration_aborts_its_copies(
    hosts: tuple[Host, Host], tmp_path: Path
) -> None:
    """A domain migrating in live with a copied host-local volume whose source runs no such
    migration (it restarted): the target forgets it and has the storage service remove its
    copy, as the source would have (docs/migration.md, "Host-local volumes")."""
    _a, b = hosts
    (tmp_path / "pool-b").mkdir()
    pool = Pool(tmp_path / "pool-b")
    b.service.storage = StorageSources("node-b", {"local": pool})
    vid = uuid.uuid4()
    with pool.volume_path(str(vid)).open("wb") as f:
        f.truncate(1 << 20)
    s = DomainSpec(
        name="db-1", boot=BootSpec(kernel=KERNEL), disks=[DiskSpec(target="vda", volume_id=vid)]
    )
    binding = DiskBinding(target="vda", volume_id=vid, pool="local", host="node-b")
    prepare = PrepareIncoming(spec=s, source="node-a", seq=2, disks=[binding])
    b.service.storage_steps.start()  # as the node does: its kept steps' sender
    endpoint = b.do(prepare).model_dump()
    assert endpoint["token"] is not None
    assert endpoint["stream_version"] == 2  # the source speaks the target's newest
    deadline = time.monotonic() + 5
    while not any(isinstance(c, LiveMoveVolume) for c in b.sent):
        assert time.monotonic() < deadline, b.sent
        time.sleep(0.05)
    assert b.store.get(s.uuid) is None
    [abort] = [c for c in b.sent if isinstance(c, LiveMoveVolume)]
    assert (abort.volume_id, abort.host, abort.step) == (vid, "node-b", "abort")


def test_the_fake_stream_refuses_a_wrong_token_and_takes_the_right_one(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    b.service.incoming_check_s = 60  # no job on node-a: the target must not ask meanwhile
    s = spec()
    running(a, s)
    endpoint = b.do(PrepareIncoming(spec=s, source="node-a", seq=2)).model_dump()
    for token in ("0" * 64, endpoint["token"][:-1] + "x"):
        with socket.create_connection((str(endpoint["address"]), endpoint["port"]), 5) as conn:
            send_line(conn, {"token": token, "domain_id": str(s.uuid)})
            assert read_line(conn) == {"error": "refused"}
    target = IncomingMachine(str(endpoint["address"]), endpoint["port"], endpoint["token"])
    seen: list[MigrationStats] = []
    outcome = a.driver.migrate_out(s.uuid, target, MigrationParams(), seen.append)
    assert outcome.committed, outcome
    assert seen
    assert seen[0].phase == "setup"
    # The token is spent: the listener is gone.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((str(endpoint["address"]), endpoint["port"]), 1).close()


def test_ports_are_plugged_on_the_target_and_bound_to_its_vtep(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    b.service.vtep = IPv4Address("192.0.2.2")
    s = spec().model_copy(update={"nics": [NicSpec(network="blue")]})
    assert isinstance(a.do(DefineDomain(spec=s, ports=[port(1)])), DomainInfo)
    assert isinstance(a.do(StartDomain(domain_id=s.uuid)), DomainInfo)
    start(a, s, MigrationParams())
    assert wait_job(a, s.uuid).phase is MigrationPhase.DONE
    assert [t.mac for t in b.driver.nics[s.uuid]] == [port(1).mac]
    bind = [c for c in a.sent if isinstance(c, BindPorts)]
    assert [(c.domain_id, c.host, c.vtep) for c in bind] == [(s.uuid, "node-b", b.service.vtep)]
    info = b.do(GetDomainInfo(domain_id=s.uuid))
    assert isinstance(info, DomainInfo)
    assert [i.mac for i in info.interfaces] == [port(1).mac]


K = GuestEventKind


@pytest.mark.parametrize(
    ("kind", "reason", "before", "event", "after"),
    [
        (GuestEventKind.PAUSED, "migrating", PowerState.RUNNING, "suspended/migrated", "paused"),
        (GuestEventKind.STOPPED, "migrated", PowerState.PAUSED, "stopped/migrated", "shutoff"),
        (
            GuestEventKind.RESUMED,
            "migration_failed",
            PowerState.PAUSED,
            "resumed/migrated",
            "running",
        ),
        (GuestEventKind.STARTED, "migrated", PowerState.SHUTOFF, "started/migrated", "running"),
        (GuestEventKind.PAUSED, "migrated", PowerState.RUNNING, "suspended/migrated", "paused"),
        (GuestEventKind.RESUMED, "", PowerState.PAUSED, "resumed/unpaused", "running"),
    ],
)
def test_the_drivers_migration_events_translate(
    kind: GuestEventKind, reason: str, before: PowerState, event: str, after: str
) -> None:
    drafts, state = translate(GuestEvent(uuid.uuid4(), 1, kind, reason), before)
    assert [f"{d.cls.EVENT}/{d.detail}" for d in drafts] == [event]
    assert state.value == after


def test_the_target_forgets_a_domain_its_source_runs_no_migration_of(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    s = spec()
    running(a, s)
    # As if the source had died before its commit and restarted: it knows of no job.
    assert b.do(PrepareIncoming(spec=s, source="node-a", seq=2)).TYPE == "reply.incoming_endpoint"
    assert b.claims.holds(s.uuid)
    eventually(lambda: b.store.get(s.uuid) is None)
    assert not b.claims.holds(s.uuid)
    assert b.events() == []


def test_an_unconfirmed_commit_ends_with_the_copy_the_target_runs(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    s = spec()
    running(a, s)
    a.events()
    b.driver.drop_next_confirm = True  # the target runs it, the source never hears so
    start(a, s, MigrationParams())
    job = wait_job(a, s.uuid)
    assert job.phase is MigrationPhase.DONE, job
    assert lifecycle(a.events()) == [
        ("domain.suspended", "migrated", 3),
        ("domain.stopped", "migrated", 4),
    ]
    assert b.events() == [("domain.started", "migrated", 5)]
    assert a.store.get(s.uuid) is None
    assert not a.driver.get_info(s.uuid).pid
    assert b.driver.get_info(s.uuid).state is PowerState.RUNNING
    finish = [(c.committed, c.seq) for c in a.sent if isinstance(c, FinishIncoming)]
    assert finish == [(False, 0), (True, 4)]


def test_a_managed_save_or_a_writable_host_file_stays(
    hosts: tuple[Host, Host], tmp_path: Path
) -> None:
    a, _b = hosts
    s = spec()
    assert isinstance(a.do(DefineDomain(spec=s)), DomainInfo)
    a.store.set_managed_save(s.uuid, StateRef(state_id=uuid.uuid4()))
    cold = MigrationParams(live=False)
    reply = a.do(StartMigration(domain_id=s.uuid, target="node-b", params=cold))
    assert isinstance(reply, ErrorReply)
    assert reply.code == "conflict"
    assert "managed save" in reply.message
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    admin = DomainSpec(
        name="admin-1", boot=BootSpec(kernel=KERNEL), disks=[DiskSpec(target="vda", path=str(disk))]
    )
    assert isinstance(a.do(DefineDomain(spec=admin, privileged=True)), DomainInfo)
    assert isinstance(a.do(StartDomain(domain_id=admin.uuid)), DomainInfo)
    reply = a.do(StartMigration(domain_id=admin.uuid, target="node-b"))
    assert isinstance(reply, ErrorReply)
    assert (reply.code, reply.details["field"]) == ("invalid", "disks")


def test_the_migrations_events_carry_the_start_commands_correlation(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    s = spec()
    running(a, s)
    a.store.outbox_done(a.store.outbox()[-1].row)
    envelope = Envelope(type=StartMigration.TYPE, body={}, source="test", correlation_id="corr-7")
    reply = dispatch(
        a.service, StartMigration(domain_id=s.uuid, target="node-b"), Context(envelope)
    )
    assert isinstance(reply, MigrationJob)
    assert wait_job(a, s.uuid).phase is MigrationPhase.DONE
    for host, count in ((a, 2), (b, 1)):
        items = [decode(i.body) for i in host.store.outbox()]
        lifecycle_events = [e for e in items if e.type != DomainMigrationProgress.TYPE]
        assert len(lifecycle_events) == count
        assert {e.correlation_id for e in items} == {"corr-7"}, host.name


def test_a_restarted_target_forgets_a_domain_whose_machine_is_gone(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    b.service.incoming_check_s = 60
    s = spec()
    running(a, s)
    assert b.do(PrepareIncoming(spec=s, source="node-a", seq=2)).TYPE == "reply.incoming_endpoint"
    b.service.stop_migrations()
    b.driver.cancel_incoming(s.uuid)  # the node's process ended: its fake machines with it
    # The node comes back on the same state dir with a new driver.
    b.driver = FakeDriver(8, 8192)
    b.claims = Claims(b.claims.inventory, reserved_memory_mib=0)
    b.service = Lifecycle("node-b", b.store, b.driver, b.claims, BootSources([BOOT_DIR]))
    assert [r.id for r in b.store.incoming()] == [s.uuid]
    b.service.recover_incoming()
    assert b.store.get(s.uuid) is None
    assert not b.claims.holds(s.uuid)
    assert b.events() == []


def test_a_cold_commit_whose_answer_was_lost_is_not_undone(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    s = spec()
    assert isinstance(a.do(DefineDomain(spec=s)), DomainInfo)
    # The target commits; the source never hears so, however often it asks.
    a.answers_lost[FinishIncoming] = FINISH_ATTEMPTS
    start(a, s, MigrationParams(live=False))
    assert wait_job(a, s.uuid).phase is MigrationPhase.DONE
    assert a.store.get(s.uuid) is None
    assert b.events() == [("domain.defined", "migrated", 2)]
    finish = [c.committed for c in a.sent if isinstance(c, FinishIncoming)]
    assert finish == [True] * FINISH_ATTEMPTS + [False]  # the undo, refused: it had committed


def test_an_abort_while_the_target_is_prepared_is_not_lost(hosts: tuple[Host, Host]) -> None:
    """domjobabort right after migrate: the source is still preparing the target (the job
    exists, its stream does not yet), so the driver has nothing to cancel then. The job
    must still end cancelled, never commit."""
    a, b = hosts
    s = spec()
    running(a, s)
    a.events()
    aborted: list[Message] = []

    def call(
        queue: str, command: Command, timeout: float, message_id: str | None = None
    ) -> Message:
        reply = Host.call(a, queue, command, timeout, message_id)
        if isinstance(command, PrepareIncoming):  # the abort comes as the target answers
            abort = threading.Thread(
                target=lambda: aborted.append(a.do(AbortMigration(domain_id=s.uuid)))
            )
            abort.start()
            eventually(lambda: a.service.jobs.running(s.uuid) is not None)
            eventually(lambda: a.service.jobs.running(s.uuid).aborted)  # type: ignore[union-attr]
        return reply

    a.service.peer_call = call
    start(a, s, MigrationParams(bandwidth_mibps=256))
    job = wait_job(a, s.uuid)
    assert job.phase is MigrationPhase.CANCELLED, job
    eventually(lambda: len(aborted) == 1)
    assert isinstance(aborted[0], MigrationJob)
    assert aborted[0].phase is MigrationPhase.CANCELLED
    info = a.do(GetDomainInfo(domain_id=s.uuid))
    assert isinstance(info, DomainInfo)
    assert info.state is PowerState.RUNNING
    assert lifecycle(a.events()) == []  # it never paused
    eventually(lambda: b.store.get(s.uuid) is None)  # the target forgets it
    assert not b.claims.holds(s.uuid)


def test_timeout_pause_leaves_the_guest_paused_where_the_driver_pauses_itself(
    hosts: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The KVM driver's VMM refuses a pause while it streams the machine (`busy`) and meets
    `timeout_action` pause itself (the budget raised: the engine pauses for the last pages).
    The guest must still arrive paused, as the action promises (virsh --timeout-suspend)."""
    a, b = hosts
    s = spec()
    running(a, s)
    a.events()
    pause = a.driver.pause

    def refuse_while_migrating(domain_id: uuid.UUID) -> None:
        if domain_id in a.driver._outgoing:
            raise DriverError("a migration of the machine is under way", "busy")
        pause(domain_id)

    monkeypatch.setattr(a.driver, "pause", refuse_while_migrating)
    params = MigrationParams(bandwidth_mibps=96, timeout_s=0.2, timeout_action=TimeoutAction.PAUSE)
    start(a, s, params)
    assert wait_job(a, s.uuid).phase is MigrationPhase.DONE
    assert lifecycle(a.events()) == [
        ("domain.suspended", "migrated", 3),
        ("domain.stopped", "migrated", 4),
    ]
    info = b.do(GetDomainInfo(domain_id=s.uuid))
    assert isinstance(info, DomainInfo)
    assert info.state is PowerState.PAUSED
    assert b.events()[0] == ("domain.started", "migrated", 5)


def test_a_machine_that_migrated_away_unknown_to_the_node_leaves_no_definition(
    hosts: tuple[Host, Host],
) -> None:
    """The source node restarted mid-job (the VMM streamed on and committed): its driver's
    `stopped`/migrated comes with no job here. The domain lives on the target now; a
    definition left here shut off would be started again (autostart, a start) beside the
    target's copy: it goes, as after a job's commit."""
    a, _b = hosts
    s = spec()
    running(a, s)
    a.events()
    record = a.store.get(s.uuid)
    assert record is not None
    assert a.service.jobs.get(s.uuid) is None  # the restarted node knows of no job
    a.driver._machines.pop(s.uuid)  # the machine went with the commit
    a.service.on_guest_event(GuestEvent(s.uuid, record.driver_n + 1, K.STOPPED, "migrated"))
    assert lifecycle(a.events()) == [("domain.stopped", "migrated", 3)]
    assert a.store.get(s.uuid) is None
    assert not a.claims.holds(s.uuid)
    refused = a.do(StartDomain(domain_id=s.uuid))
    assert isinstance(refused, ErrorReply)
    assert refused.code == "not_found"


def test_a_guest_to_arrive_paused_is_paused_even_if_its_start_is_reported_late(
    hosts: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The KVM driver reports a machine's events from a thread of its own: the source's
    FinishIncoming(state paused) can come before the target's `started`. The guest must
    still end paused there, its `suspended` after its `started`."""
    a, b = hosts
    s = spec()
    running(a, s)
    a.events()
    pause = a.driver.pause

    def refuse_while_migrating(domain_id: uuid.UUID) -> None:
        if domain_id in a.driver._outgoing:
            raise DriverError("a migration of the machine is under way", "busy")
        pause(domain_id)

    def late(event: GuestEvent) -> None:
        if event.kind is K.STARTED:
            timer = threading.Timer(0.5, b.service.on_guest_event, (event,))
            timer.start()
            return
        b.service.on_guest_event(event)

    monkeypatch.setattr(a.driver, "pause", refuse_while_migrating)
    b.driver.set_event_sink(late)
    params = MigrationParams(bandwidth_mibps=96, timeout_s=0.2, timeout_action=TimeoutAction.PAUSE)
    start(a, s, params)
    assert wait_job(a, s.uuid).phase is MigrationPhase.DONE
    eventually(lambda: len(b.store.outbox()) >= 2)
    info = b.do(GetDomainInfo(domain_id=s.uuid))
    assert isinstance(info, DomainInfo)
    assert info.state is PowerState.PAUSED
    assert [e[:2] for e in b.events()] == [
        ("domain.started", "migrated"),
        ("domain.suspended", "paused"),
    ]


def test_a_restarted_target_whose_stream_commits_as_it_recovers_keeps_the_domain(
    hosts: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At start-up the waiting machine had no guest yet, but the stream committed before the
    node could end it (the driver refuses: `conflict`, it runs here now). The node must come
    up (not fail its start-up on that refusal) and hold the domain for its FinishIncoming or
    the adoption."""
    a, b = hosts
    b.service.incoming_check_s = 60
    s = spec()
    running(a, s)
    assert b.do(PrepareIncoming(spec=s, source="node-a", seq=2)).TYPE == "reply.incoming_endpoint"
    b.service.stop_migrations()
    b.driver.cancel_incoming(s.uuid)
    b.driver = FakeDriver(8, 8192)
    b.claims = Claims(b.claims.inventory, reserved_memory_mib=0)
    b.service = Lifecycle("node-b", b.store, b.driver, b.claims, BootSources([BOOT_DIR]))

    def committed_meanwhile(domain_id: uuid.UUID) -> None:
        raise DriverError(f"domain {domain_id} already runs here", "conflict")

    monkeypatch.setattr(b.driver, "cancel_incoming", committed_meanwhile)
    b.service.recover_incoming()
    record = b.store.get(s.uuid)
    assert record is not None
    assert record.incoming is not None  # held: its FinishIncoming or the adoption decides
    assert b.claims.holds(s.uuid)
    assert s.uuid in b.service._adopt_timers
    b.service.stop_migrations()


def test_the_domain_is_not_locked_while_the_target_is_prepared(hosts: tuple[Host, Host]) -> None:
    """Preparing the target is an RPC (a VMM to spawn there: seconds): a destroy of the domain
    meanwhile must not wait for it. The migration then has nothing to move: refused, and the
    target forgets what it prepared."""
    a, b = hosts
    s = spec()
    running(a, s)
    destroyed: list[Message] = []

    def call(
        queue: str, command: Command, timeout: float, message_id: str | None = None
    ) -> Message:
        reply = Host.call(a, queue, command, timeout, message_id)
        if isinstance(command, PrepareIncoming):
            destroy = threading.Thread(
                target=lambda: destroyed.append(a.do(DestroyDomain(domain_id=s.uuid)))
            )
            destroy.start()
            destroy.join(2.0)
        return reply

    a.service.peer_call = call
    refused = a.do(StartMigration(domain_id=s.uuid, target="node-b"))
    assert destroyed, "the destroy waited for the target's preparation"
    assert isinstance(destroyed[0], DomainInfo)
    assert destroyed[0].state is PowerState.SHUTOFF
    assert isinstance(refused, ErrorReply)
    assert refused.code == "conflict"
    assert a.service.jobs.running(s.uuid) is None
    eventually(lambda: b.store.get(s.uuid) is None)  # the target forgets it
    assert not b.claims.holds(s.uuid)


def test_the_target_forgets_a_domain_whose_source_job_goes_elsewhere(
    hosts: tuple[Host, Host],
) -> None:
    """The source's job for the domain is another one, to another host (this attempt's
    FinishIncoming was lost, and the domain was sent elsewhere since): however it ends, no
    FinishIncoming comes here, so the domain is forgotten here rather than held for ever."""
    a, b = hosts
    s = spec()
    running(a, s)
    elsewhere = Job(s.uuid, s.name, "node-a", "node-c", MigrationParams())
    elsewhere.end(MigrationPhase.DONE)
    a.service.jobs.add(elsewhere)
    assert b.do(PrepareIncoming(spec=s, source="node-a", seq=2)).TYPE == "reply.incoming_endpoint"
    assert b.claims.holds(s.uuid)
    eventually(lambda: b.store.get(s.uuid) is None)
    assert not b.claims.holds(s.uuid)
    assert b.events() == []


def test_the_sources_last_job_is_answered_after_it_restarts(hosts: tuple[Host, Host]) -> None:
    """domjobinfo after the source node restarted: GetMigrationJob answers the job that ended
    before, as it did (kept in compute.db); AbortMigration of it is too late."""
    a, _ = hosts
    s = spec()
    running(a, s)
    start(a, s, MigrationParams())
    before = wait_job(a, s.uuid)
    assert before.phase is MigrationPhase.DONE
    a.service.stop_migrations()
    # The node comes back on the same state dir with a new driver and lifecycle.
    a.driver = FakeDriver(8, 8192)
    a.service = Lifecycle("node-a", a.store, a.driver, a.claims, BootSources([BOOT_DIR]))
    a.service.peer_call = a.call
    after = a.do(GetMigrationJob(domain_id=s.uuid))
    assert after == before
    late = a.do(AbortMigration(domain_id=s.uuid))
    assert isinstance(late, ErrorReply)
    assert (late.code, late.details["reason"]) == ("conflict", "committed")
    unknown = a.do(GetMigrationJob(domain_id=uuid.uuid4()))
    assert isinstance(unknown, ErrorReply)
    assert unknown.code == "not_found"
