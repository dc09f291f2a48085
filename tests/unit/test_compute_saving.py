"""Save, restore, managed save and snapshots in the compute worker, on the FakeDriver (whose
machine state is a real file in the state directory) with volumes in real pool directories;
no broker: handlers are called as the consumer runtime calls them."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from compute_node.boot_sources import BootSources
from compute_node.fake import STATE_FILE, FakeDriver
from compute_node.lifecycle import Lifecycle
from compute_node.resources import Claims
from compute_node.saved_states import MANIFEST, PARTIAL, POOL_AREA
from compute_node.storage import Pool, VolumeStore
from compute_node.storage_sources import StorageSources
from compute_node.store import Store
from protos.base import Message
from protos.bindings import DiskBinding, StateRef
from protos.codec import decode, parse_body
from protos.commands import (
    CreateSnapshot,
    DefineDomain,
    DeleteState,
    DestroyDomain,
    PauseDomain,
    RemoveManagedSave,
    RestoreDomain,
    RevertSnapshot,
    SaveDomain,
    StartDomain,
    UndefineDomain,
)
from protos.domain import DiskSpec, PowerState
from protos.events import DomainEvent
from protos.host import HostInventory, KvmKind
from protos.replies import DomainInfo, ErrorReply, SavedState
from services.bus.service import dispatch
from tests.bootfiles import BOOT_DIR
from tests.unit.test_compute_lifecycle import CTX, spec

HOST = "node-1"


class Node:
    """A Lifecycle on a FakeDriver with a `dir` pool `local` and a `shared` pool `nfs`."""

    def __init__(
        self, path: Path, shared: Path, host: str = HOST, driver: FakeDriver | None = None
    ) -> None:
        self.driver = driver or FakeDriver(8, 8192)
        self.store = Store(path / "compute.db", host=host, source=f"compute:{host}")
        inventory = HostInventory(
            capacity=self.driver.host_resources(),
            cpu_allocation_ratio=1.0,
            ram_allocation_ratio=1.0,
            kvm=KvmKind.NONE,
        )
        (path / "local").mkdir(exist_ok=True)
        self.pools = {"local": Pool(path / "local", "dir"), "nfs": Pool(shared, "shared")}
        self.service = Lifecycle(
            host,
            self.store,
            self.driver,
            Claims(inventory, reserved_memory_mib=0),
            BootSources([BOOT_DIR]),
            storage=StorageSources(host, self.pools),
        )

    def do(self, command: Message) -> Message:
        return dispatch(self.service, command, CTX)

    def ok(self, command: Message) -> DomainInfo:
        reply = self.do(command)
        assert isinstance(reply, DomainInfo), reply
        return reply

    def saved(self, command: Message) -> SavedState:
        reply = self.do(command)
        assert isinstance(reply, SavedState), reply
        return reply

    def refused(self, command: Message) -> ErrorReply:
        reply = self.do(command)
        assert isinstance(reply, ErrorReply), reply
        return reply

    def events(self) -> list[tuple[str, str, int]]:
        items = self.store.outbox()
        if items:
            self.store.outbox_done(items[-1].row)
        out = []
        for item in items:
            event = parse_body(decode(item.body))
            assert isinstance(event, DomainEvent)
            out.append((event.TYPE, str(getattr(event, "detail", "")), event.seq))
        return out


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    (tmp_path / "shared").mkdir()
    (tmp_path / "n1").mkdir()
    n = Node(tmp_path / "n1", tmp_path / "shared")
    yield n
    n.store.close()


def local(state_id: uuid.UUID | None = None) -> StateRef:
    return StateRef(state_id=state_id or uuid.uuid4())


def with_disk(node: Node, data: bytes = b"first") -> tuple[DefineDomain, Path]:
    """A domain with one volume (vda) in the node's `dir` pool holding `data`."""
    volume_id = uuid.uuid4()
    VolumeStore(node.pools["local"]).create(str(volume_id), 1 << 20)
    path = node.pools["local"].volume_path(str(volume_id))
    with path.open("r+b") as f:
        f.write(data)
    s = spec(disks=[DiskSpec(target="vda", volume_id=volume_id)])
    binding = DiskBinding(target="vda", volume_id=volume_id, pool="local", host=HOST)
    return DefineDomain(spec=s, disks=[binding]), path


def test_save_then_restore_continues_seq_with_saved_and_restored(node: Node) -> None:
    s = spec()
    node.ok(DefineDomain(spec=s))
    node.ok(StartDomain(domain_id=s.uuid))
    node.events()
    ref = local()
    saved = node.saved(SaveDomain(domain_id=s.uuid, state=ref))
    assert saved.memory
    assert saved.power is PowerState.RUNNING
    assert saved.domain.state is PowerState.SHUTOFF
    assert saved.bytes > 0
    directory = node.service.states.path(ref)
    assert (directory / STATE_FILE).is_file()
    assert (directory / MANIFEST).is_file()
    assert node.ok(RestoreDomain(domain_id=s.uuid, state=ref)).state is PowerState.RUNNING
    events = node.events()
    assert [(t, d) for t, d, _ in events] == [
        ("domain.stopped", "saved"),
        ("domain.started", "restored"),
    ]
    assert [q for *_, q in events] == [3, 4]  # defined 1, started 2: seq continues
    assert directory.is_dir()  # kept: the contract's default


def test_a_consuming_restore_deletes_the_state_once_running(node: Node) -> None:
    s = spec()
    node.ok(DefineDomain(spec=s))
    node.ok(StartDomain(domain_id=s.uuid))
    ref = local()
    node.saved(SaveDomain(domain_id=s.uuid, state=ref))
    directory = node.service.states.path(ref)
    info = node.ok(RestoreDomain(domain_id=s.uuid, state=ref, consume=True))
    assert info.state is PowerState.RUNNING
    assert not directory.exists()


def test_a_paused_save_restores_paused(node: Node) -> None:
    s = spec()
    node.ok(DefineDomain(spec=s))
    node.ok(StartDomain(domain_id=s.uuid))
    node.ok(PauseDomain(domain_id=s.uuid))
    ref = local()
    assert node.saved(SaveDomain(domain_id=s.uuid, state=ref)).power is PowerState.PAUSED
    node.events()
    assert node.ok(RestoreDomain(domain_id=s.uuid, state=ref)).state is PowerState.PAUSED
    assert [(t, d) for t, d, _ in node.events()] == [
        ("domain.started", "restored"),
        ("domain.suspended", "restored"),
    ]


def test_refusals_follow_the_state_table(node: Node) -> None:
    s = spec()
    node.ok(DefineDomain(spec=s))
    assert node.refused(SaveDomain(domain_id=s.uuid, state=local())).code == "conflict"
    node.ok(StartDomain(domain_id=s.uuid))
    ref = local()
    node.saved(CreateSnapshot(domain_id=s.uuid, state=ref))
    reply = node.refused(RevertSnapshot(domain_id=s.uuid, state=ref))
    assert reply.code == "conflict"
    assert reply.details["state"] == "running"
    assert node.refused(RestoreDomain(domain_id=s.uuid, state=ref)).code == "conflict"
    assert node.refused(RemoveManagedSave(domain_id=s.uuid)).code == "conflict"


def test_a_failed_save_leaves_the_domain_running_and_no_state(node: Node) -> None:
    s = spec()
    node.ok(DefineDomain(spec=s))
    node.ok(StartDomain(domain_id=s.uuid))
    node.driver.fail_next_save = "no_space"
    ref = local()
    assert node.refused(SaveDomain(domain_id=s.uuid, state=ref)).code == "no_space"
    area = node.service.states.area(ref)
    assert list(area.iterdir()) == []  # nothing, not even a partial directory
    assert node.service.info(s.uuid).state is PowerState.RUNNING


def test_a_corrupt_or_missing_state_is_refused_and_the_domain_stays_off(node: Node) -> None:
    s = spec()
    node.ok(DefineDomain(spec=s))
    node.ok(StartDomain(domain_id=s.uuid))
    ref = local()
    node.saved(SaveDomain(domain_id=s.uuid, state=ref))
    state_file = node.service.states.path(ref) / STATE_FILE
    good = state_file.read_bytes()
    outer = json.loads(good)
    outer["body"] = outer["body"].replace('"state"', '"stat3"')
    state_file.write_text(json.dumps(outer))
    reply = node.refused(RestoreDomain(domain_id=s.uuid, state=ref))
    assert reply.code == "invalid"
    assert "checksum" in reply.message
    state_file.write_bytes(good[:20])
    assert "corrupt" in node.refused(RestoreDomain(domain_id=s.uuid, state=ref)).message
    assert node.refused(RestoreDomain(domain_id=s.uuid, state=local())).code == "not_found"
    assert node.service.info(s.uuid).state is PowerState.SHUTOFF
    assert not node.service.claims.holds(s.uuid)  # no claim left behind


def test_a_state_of_another_domain_is_refused(node: Node) -> None:
    a, b = spec("a"), spec("b")
    for s in (a, b):
        node.ok(DefineDomain(spec=s))
    node.ok(StartDomain(domain_id=a.uuid))
    ref = local()
    node.saved(SaveDomain(domain_id=a.uuid, state=ref))
    assert "another domain" in node.refused(RestoreDomain(domain_id=b.uuid, state=ref)).message
    assert node.refused(DeleteState(domain_id=b.uuid, state=ref)).code == "invalid"
    assert node.service.states.path(ref).is_dir()


def test_managed_save_is_restored_by_start_and_then_deleted(tmp_path: Path, node: Node) -> None:
    s = spec()
    node.ok(DefineDomain(spec=s))
    node.ok(StartDomain(domain_id=s.uuid))
    ref = StateRef(state_id=uuid.uuid4(), host=HOST)
    node.saved(SaveDomain(domain_id=s.uuid, state=ref, managed=True))
    assert node.service.info(s.uuid).managed_save
    # Across a restart of the compute worker (the host's driver stays, as VMMs do): the
    # store keeps the managed save with the definition.
    node.store.close()
    again = Node(tmp_path / "n1", tmp_path / "shared", driver=node.driver)
    try:
        again.events()
        info = again.ok(StartDomain(domain_id=s.uuid))
        assert info.state is PowerState.RUNNING
        assert not info.managed_save
        assert [(t, d) for t, d, _ in again.events()] == [("domain.started", "restored")]
        assert not again.service.states.path(ref).exists()
        # The next start (after a destroy) boots afresh.
        again.ok(DestroyDomain(domain_id=s.uuid))
        again.events()
        again.ok(StartDomain(domain_id=s.uuid))
        assert [(t, d) for t, d, _ in again.events()] == [("domain.started", "booted")]
    finally:
        again.store.close()
        node.store = again.store  # closed already; the fixture's close is harmless


def test_managedsave_remove_and_undefine_drop_the_managed_save(node: Node) -> None:
    s = spec()
    node.ok(DefineDomain(spec=s))
    for remover in ("remove", "undefine"):
        node.ok(StartDomain(domain_id=s.uuid))
        ref = local()
        node.saved(SaveDomain(domain_id=s.uuid, state=ref, managed=True))
        path = node.service.states.path(ref)
        assert path.is_dir()
        if remover == "remove":
            assert not node.ok(RemoveManagedSave(domain_id=s.uuid)).managed_save
        else:
            node.do(UndefineDomain(domain_id=s.uuid))
        assert not path.exists()
    assert node.store.get(s.uuid) is None


def test_snapshot_tree_revert_restores_disk_contents_and_memory(node: Node) -> None:
    define, volume = with_disk(node, b"first")
    d = define.spec.uuid
    node.ok(define)
    node.ok(StartDomain(domain_id=d))
    first = local()
    taken = node.saved(CreateSnapshot(domain_id=d, state=first))
    assert taken.memory
    assert taken.disks == ["vda"]
    assert taken.domain.state is PowerState.RUNNING  # the guest went on
    with volume.open("r+b") as f:
        f.write(b"second")
    second = local()
    node.saved(CreateSnapshot(domain_id=d, state=second, memory=False))
    node.ok(DestroyDomain(domain_id=d))
    node.events()
    # Revert to the first: disk contents back, the machine restored running.
    info = node.ok(RevertSnapshot(domain_id=d, state=first))
    assert info.state is PowerState.RUNNING
    assert volume.read_bytes()[:6] == b"first\0"
    assert [(t, q) for t, q, _ in node.events()] == [("domain.started", "from_snapshot")]
    node.ok(DestroyDomain(domain_id=d))
    # The disk-only one: disks back, the domain stays off (unless asked to start).
    assert node.ok(RevertSnapshot(domain_id=d, state=second)).state is PowerState.SHUTOFF
    assert volume.read_bytes()[:6] == b"second"
    assert node.ok(RevertSnapshot(domain_id=d, state=second, start=True)).state is (
        PowerState.RUNNING
    )
    # Deleting one snapshot leaves the other whole.
    node.ok(DestroyDomain(domain_id=d))
    node.do(DeleteState(domain_id=d, state=first))
    assert not node.service.states.path(first).exists()
    node.ok(RevertSnapshot(domain_id=d, state=second, start=False))
    assert volume.read_bytes()[:6] == b"second"


def test_a_shut_off_domains_snapshot_holds_disks_only(node: Node) -> None:
    define, _ = with_disk(node)
    node.ok(define)
    taken = node.saved(CreateSnapshot(domain_id=define.spec.uuid, state=local()))
    assert not taken.memory
    assert taken.disks == ["vda"]
    assert taken.power is PowerState.SHUTOFF


def test_state_refs_never_leave_the_node_or_pool(node: Node) -> None:
    s = spec()
    node.ok(DefineDomain(spec=s))
    node.ok(StartDomain(domain_id=s.uuid))
    for ref, code in (
        (StateRef(state_id=uuid.uuid4(), host="node-2"), "invalid"),
        (StateRef(state_id=uuid.uuid4(), pool="local", host="node-2"), "invalid"),
        (StateRef(state_id=uuid.uuid4(), pool="nope"), "not_found"),
    ):
        reply = node.refused(SaveDomain(domain_id=s.uuid, state=ref))
        assert reply.code == code, reply
    assert node.service.info(s.uuid).state is PowerState.RUNNING


def test_a_save_in_a_shared_pool_restores_on_another_node(tmp_path: Path, node: Node) -> None:
    (tmp_path / "n2").mkdir()
    other = Node(tmp_path / "n2", tmp_path / "shared", host="node-2")
    try:
        s = spec()
        node.ok(DefineDomain(spec=s))
        node.ok(StartDomain(domain_id=s.uuid))
        ref = StateRef(state_id=uuid.uuid4(), pool="nfs")
        node.saved(SaveDomain(domain_id=s.uuid, state=ref))
        assert (tmp_path / "shared" / POOL_AREA / str(ref.state_id)).is_dir()
        other.ok(DefineDomain(spec=s))
        info = other.ok(RestoreDomain(domain_id=s.uuid, state=ref))
        assert info.state is PowerState.RUNNING
        assert info.host == "node-2"
        assert b"READY" in other.driver.console(s.uuid, 4096)[0]  # the saved console came along
    finally:
        other.store.close()


def test_partial_states_are_removed_at_reconcile(node: Node) -> None:
    area = node.service.states.area(local())
    (area / f"{uuid.uuid4()}{PARTIAL}").mkdir()
    assert len(node.service.states.reconcile()) == 1
    assert list(area.iterdir()) == []


def test_a_restore_from_another_state_drops_the_stale_managed_save(node: Node) -> None:
    s = spec()
    node.ok(DefineDomain(spec=s))
    node.ok(StartDomain(domain_id=s.uuid))
    ref = local()
    node.saved(SaveDomain(domain_id=s.uuid, state=ref))
    node.ok(RestoreDomain(domain_id=s.uuid, state=ref))
    managed = local()
    node.saved(SaveDomain(domain_id=s.uuid, state=managed, managed=True))
    info = node.ok(RestoreDomain(domain_id=s.uuid, state=ref))
    assert not info.managed_save
    assert not node.service.states.path(managed).exists()
