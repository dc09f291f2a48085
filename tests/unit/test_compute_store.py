"""The compute store's durability rules (compute_node.store, "Durability"), on a real SQLite file
and, for a crash, a real process killed with SIGKILL."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import uuid
from collections import Counter
from pathlib import Path

from compute_node.store import NO_BINDINGS, EventDraft, Incoming, Progress, Store, event_id
from protos.codec import decode
from protos.domain import BootSpec, DomainSpec, PowerState
from protos.events import DomainShutdown, DomainStopped, ShutdownDetail, StoppedDetail
from tests.bootfiles import KERNEL

DRAFTS = [
    EventDraft(DomainShutdown, PowerState.SHUTOFF, ShutdownDetail.GUEST),
    EventDraft(DomainStopped, PowerState.SHUTOFF, StoppedDetail.SHUTDOWN),
]


def spec() -> DomainSpec:
    return DomainSpec(name=f"s-{uuid.uuid4().hex[:8]}", boot=BootSpec(kernel=str(KERNEL)))


def store_at(path: Path) -> Store:
    return Store(path / "compute.db", host="node-1", source="compute:node-1")


def define_arriving(store: Store, s: DomainSpec) -> None:
    """`s` defined as a domain migrating in from node-2."""
    store.define_incoming(
        s,
        Incoming("node-2", live=True, paused=False, seq=1),
        privileged=False,
        bindings=NO_BINDINGS,
        ports=(),
    )


def ids(store: Store) -> list[str]:
    return [item.message_id for item in store.outbox()]


def test_a_replayed_journal_record_makes_the_same_events_with_the_same_ids(tmp_path: Path) -> None:
    # A power loss after a journaled transaction committed unsynced: the store is back at its
    # last durable state and the worker replays the record. The copy of the file before the
    # transaction plays that state.
    s = spec()
    first = store_at(tmp_path / "a")
    first.define(s, [])
    first.close()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a, b = store_at(tmp_path / "a"), store_at(tmp_path / "b")
    for store in (a, b):
        store.transition(s.uuid, DRAFTS, driver_n=3, journaled="3/1764480000.25")
    assert ids(a) == ids(b) == [event_id(s.uuid, "3/1764480000.25", i) for i in (0, 1)]
    assert [decode(i.body).body["seq"] for i in a.outbox()] == [1, 2]
    # Another record (a later one, or record 3 of a later life of the domain) gets other ids.
    b.transition(s.uuid, DRAFTS, driver_n=4, journaled="3/1764480099.5")
    assert len(set(ids(b))) == 4


def test_events_from_no_journal_get_fresh_ids_and_an_fsynced_commit(tmp_path: Path) -> None:
    s = spec()
    store = store_at(tmp_path)
    store.define(s, [])
    store.transition(s.uuid, DRAFTS, driver_n=1)
    assert store.unsynced == 0
    store.transition(s.uuid, DRAFTS, driver_n=1)
    assert len(set(ids(store))) == 4


def test_a_journaled_commit_is_not_fsynced_and_its_rows_go_only_once_synced(
    tmp_path: Path,
) -> None:
    s = spec()
    store = store_at(tmp_path)
    store.define(s, [])
    store.transition(s.uuid, DRAFTS, driver_n=1, journaled="1/5.0")
    assert store.unsynced == 1  # no fsync on the event's way out
    items = store.outbox()
    store.outbox_done(items[-1].row)
    # The rows it deleted were on disk first: the sync came before the delete.
    assert store.unsynced == 0
    assert store.outbox() == []


def test_an_unsynced_commit_survives_a_kill_9_of_the_worker(tmp_path: Path) -> None:
    s = spec()
    store = store_at(tmp_path)
    store.define(s, [])
    store.close()
    child = textwrap.dedent(
        f"""
        import os, signal, uuid
        from pathlib import Path
        from compute_node.store import Store
        from tests.unit.test_compute_store import DRAFTS
        store = Store(Path({str(tmp_path / "compute.db")!r}), host="node-1", source="c")
        store.transition(uuid.UUID({str(s.uuid)!r}), DRAFTS, driver_n=7, journaled="7/9.5")
        assert store.unsynced == 1
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", child], cwd=Path.cwd(), check=False)
    assert done.returncode == -9
    after = store_at(tmp_path)
    record = after.get(s.uuid)
    assert record is not None
    assert (record.state, record.seq, record.driver_n) == (PowerState.SHUTOFF, 2, 7)
    assert ids(after) == [event_id(s.uuid, "7/9.5", i) for i in (0, 1)]


def test_progress_is_what_a_guest_event_needs_of_the_record(tmp_path: Path) -> None:
    # Store.progress: the state, the last driver event consumed and whether the domain is
    # migrating in, read without its spec; the same as the whole record says.
    store = store_at(tmp_path)
    here, arriving = spec(), spec()
    assert store.progress(here.uuid) is None
    store.define(here, [])
    define_arriving(store, arriving)
    assert store.progress(here.uuid) == Progress(PowerState.SHUTOFF, 0, False)
    assert store.progress(arriving.uuid) == Progress(PowerState.SHUTOFF, 0, True)
    events = store.transition(here.uuid, DRAFTS[:1], driver_n=5, journaled="5/1764480000.5")
    assert [(e.name, e.seq) for e in events] == [(here.name, 1)]
    record = store.get(here.uuid)
    assert record is not None
    assert store.progress(here.uuid) == Progress(record.state, record.driver_n, False)
    assert (record.state, record.driver_n) == (PowerState.SHUTOFF, 5)


def test_count_by_state_counts_this_hosts_domains_without_reading_them(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    assert store.count_by_state() == {}
    first, second, arriving = spec(), spec(), spec()
    store.define(first, [])
    store.define(second, [])
    define_arriving(store, arriving)
    store.transition(first.uuid, [], state=PowerState.RUNNING, driver_n=1)
    assert store.count_by_state() == {PowerState.RUNNING: 1, PowerState.SHUTOFF: 1}
    assert store.count_by_state() == Counter(r.state for r in store.all())
