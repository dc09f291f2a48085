"""The compute node's state on disk: domain definitions, their power state and `seq`, the last
driver event consumed, and the event outbox — one SQLite file, so an event, the state it
produces and the seq it uses are written in one transaction.

Volume events (the storage agent's) go through the same outbox; `volume_seqs` keeps each
volume's seq.

The outbox holds packed envelopes (with their message ids) until the broker confirms them; the
publisher (compute_node.outbox) sends them in insertion order, so events produced while the
broker is unreachable go out, in order, when it returns.

Durability. The file is in WAL mode with `synchronous=NORMAL`: a commit is in the kernel (it
survives any crash of this process) but not yet on disk. Two kinds of transaction:
- durable ones (definitions, and events from no journal) fsync the WAL before they return and
  before the publisher is woken, as `synchronous=FULL` would;
- a guest event read from a VMM journal record that is itself fsynced (`journaled`) commits
  without an fsync and wakes the publisher at once. Should the host lose power before the WAL
  reaches the disk, the transaction is lost with it, `driver_n` is back before the record, and
  the record is replayed from the journal into the same events, same `seq`, same message ids
  (derived from the record: `event_id`), so a subscriber that saw them sees only duplicates
  by id. `sync()` fsyncs the WAL; the outbox deletes a row only after it (`outbox_done`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from compute_node.storage_sources import StorageBindings
from protos.bindings import PortBinding, StateRef
from protos.codec import Envelope, envelope_for, pack
from protos.domain import DomainSpec, PowerState
from protos.events import DomainEvent
from protos.migration import MigrationJob
from protos.storage import VolumeEvent
from protos.volumes import LiveMoveVolume
from services.bus import Cause

SCHEMA = """
CREATE TABLE IF NOT EXISTS domains (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0,
    driver_n INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL,
    privileged INTEGER NOT NULL DEFAULT 0,
    bindings TEXT NOT NULL DEFAULT '{}',
    ports TEXT NOT NULL DEFAULT '[]',
    managed_save TEXT,
    incoming TEXT,
    start_pending INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS volume_seqs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    last_event TEXT NOT NULL DEFAULT '',
    size INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS migration_jobs (
    domain_id TEXT PRIMARY KEY,
    job TEXT NOT NULL,
    ended REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS storage_steps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    step TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS host_settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    body BLOB NOT NULL
);
"""


NO_BINDINGS = StorageBindings()
# States a machine is only in once it ran: reaching one ends a pending start.
_RAN = frozenset({PowerState.RUNNING, PowerState.PAUSED, PowerState.BLOCKED})
_SELECT = (
    "SELECT spec, state, seq, driver_n, privileged, bindings, ports, managed_save, incoming, "
    "start_pending FROM domains"
)


@dataclass(frozen=True)
class DomainRecord:
    spec: DomainSpec
    state: PowerState
    seq: int
    driver_n: int
    # Defined by an admin: its host paths are not held to allowed_boot_dirs (boot_sources.py).
    privileged: bool = False
    # The volumes and images the storage service bound it to (storage_sources.py).
    bindings: StorageBindings = NO_BINDINGS
    # The NICs' ports the scheduler allocated (protos.bindings), in the spec's order.
    ports: tuple[PortBinding, ...] = ()
    # The managed save the next start restores (compute_node.saving), if there is one.
    managed_save: StateRef | None = None
    # Set while the domain is migrating in (compute_node.migrating): not listed, no events.
    incoming: Incoming | None = None
    # Its create asked to start it (DefineDomain.start) and it has not run since.
    start_pending: bool = False

    @property
    def id(self) -> uuid.UUID:
        return self.spec.uuid


@dataclass(frozen=True)
class Progress:
    """A domain's state as a guest event finds it (Store.progress)."""

    state: PowerState
    driver_n: int
    migrating_in: bool


@dataclass(frozen=True)
class Incoming:
    """What a domain migrating in was prepared with (PrepareIncoming): its source, whether
    live and paused, and the source's seq when it asked."""

    source: str
    live: bool
    paused: bool
    seq: int

    def dump(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def load(cls, text: str) -> Incoming:
        body = json.loads(text)
        return cls(str(body["source"]), bool(body["live"]), bool(body["paused"]), int(body["seq"]))


@dataclass(frozen=True)
class EventDraft:
    """An event to emit: its class and fields other than the common ones."""

    cls: type[DomainEvent]
    state: PowerState
    detail: str | None = None
    reason: str = ""
    cause: Cause | None = None  # the command that made it happen, if one did


@dataclass(frozen=True)
class OutboxItem:
    row: int
    message_id: str
    routing_key: str
    body: bytes
    envelope: Envelope | None = None  # the unpacked body, when the row was made here


class NameTaken(ValueError):
    pass


class Store:
    """Thread-safe access to the compute node's SQLite file."""

    def __init__(self, path: Path, *, host: str, source: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.directory = path.parent
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(domains)")}
        if "privileged" not in columns:  # a state dir from before the column: members' rule
            self._db.execute("ALTER TABLE domains ADD COLUMN privileged INTEGER NOT NULL DEFAULT 0")
        if "bindings" not in columns:  # from before storage bindings: none
            self._db.execute("ALTER TABLE domains ADD COLUMN bindings TEXT NOT NULL DEFAULT '{}'")
        if "ports" not in columns:  # a state dir from before NICs
            self._db.execute("ALTER TABLE domains ADD COLUMN ports TEXT NOT NULL DEFAULT '[]'")
        if "managed_save" not in columns:  # a state dir from before managed saves
            self._db.execute("ALTER TABLE domains ADD COLUMN managed_save TEXT")
        if "incoming" not in columns:  # a state dir from before migrations
            self._db.execute("ALTER TABLE domains ADD COLUMN incoming TEXT")
        if "start_pending" not in columns:  # from before DefineDomain.start: none pending
            self._db.execute(
                "ALTER TABLE domains ADD COLUMN start_pending INTEGER NOT NULL DEFAULT 0"
            )
        self._lock = threading.RLock()
        self._wal = f"{path}-wal"
        self._sync_lock = threading.Lock()
        self._commits = 0  # transactions committed by this Store
        self._synced = 0  # of which known to be on disk
        self.host = host
        self.source = source
        # Notified on every state change and outbox insert.
        self.changed = threading.Condition(self._lock)
        # Rows committed and not yet offered to the outbox hook, and how deep `exclusive()`
        # is held (rows are offered when the outermost one ends).
        self._committed: list[OutboxItem] = []
        self._inserted: list[OutboxItem] = []
        self._exclusive = 0
        self._outbox_hook: Callable[[list[OutboxItem]], None] | None = None

    @contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._inserted.clear()
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self._commits += 1
            if durable:
                self.sync()
            self._committed.extend(self._inserted)
            self._inserted.clear()
            if not self._exclusive:
                self._offer()
            self.changed.notify_all()

    def on_outbox(self, hook: Callable[[list[OutboxItem]], None] | None) -> None:
        """`hook(rows)` is called with the outbox rows of each transaction once it is
        committed (and fsynced, if durable), in row order, by the committing thread under the
        store's lock: the publisher sends them from there without waking a thread of its own.
        The rows stay in the table all the same; a hook that does not send them leaves them
        to `outbox()`. The hook must not block."""
        with self._lock:
            self._outbox_hook = hook

    def _offer(self) -> None:
        rows, self._committed = self._committed, []
        if rows and self._outbox_hook is not None:
            self._outbox_hook(rows)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """The store's lock, for a `with`: no other thread reads or writes the store until it
        ends, so what is committed inside reaches the outbox publisher only then (after
        whatever the caller sent meanwhile, e.g. a heartbeat)."""
        with self._lock:
            self._exclusive += 1
            try:
                yield
            finally:
                self._exclusive -= 1
                if not self._exclusive:
                    self._offer()

    def sync(self) -> None:
        """Put every transaction committed so far on disk (fsync of the WAL file; checkpoints
        fsync it before copying it into the database)."""
        with self._sync_lock:
            target = self._commits
            if self._synced >= target:
                return
            try:
                fd = os.open(self._wal, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = -1  # no WAL: everything is in the database file, synced by its checkpoint
            if fd >= 0:
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._synced = max(self._synced, target)

    @property
    def unsynced(self) -> int:
        """Transactions committed but not yet known to be on disk."""
        return self._commits - self._synced

    # ---- domains ----------------------------------------------------------------------------

    def setting(self, key: str) -> str | None:
        """A host-wide value kept across restarts (e.g. whether the host is enabled)."""
        with self._lock:
            row = self._db.execute(
                "SELECT value FROM host_settings WHERE key = ?", (key,)
            ).fetchone()
        return None if row is None else str(row[0])

    def set_setting(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO host_settings (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def keep_job(self, job: MigrationJob, *, limit: int) -> None:
        """Keep the ended migration job as its domain's last (across restarts); the oldest
        beyond `limit` domains go."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO migration_jobs (domain_id, job, ended) VALUES (?, ?, ?) "
                "ON CONFLICT (domain_id) DO UPDATE SET job = excluded.job, ended = excluded.ended",
                (str(job.domain_id), job.model_dump_json(), time.time()),
            )
            db.execute(
                "DELETE FROM migration_jobs WHERE domain_id NOT IN "
                "(SELECT domain_id FROM migration_jobs ORDER BY ended DESC LIMIT ?)",
                (limit,),
            )

    def kept_job(self, domain_id: uuid.UUID) -> MigrationJob | None:
        """The domain's last ended migration job from this host, if one is kept."""
        with self._lock:
            row = self._db.execute(
                "SELECT job FROM migration_jobs WHERE domain_id = ?", (str(domain_id),)
            ).fetchone()
        return None if row is None else MigrationJob.model_validate_json(row[0])

    def add_storage_steps(self, steps: list[tuple[str, LiveMoveVolume]]) -> list[int]:
        """Keep catalog steps to send (each with its message id) until `storage_step_done`:
        on disk when this returns (compute_node.storage_steps). Their rows, in order."""
        rows = []
        with self._tx() as db:
            for message_id, step in steps:
                cursor = db.execute(
                    "INSERT INTO storage_steps (message_id, step) VALUES (?, ?)",
                    (message_id, step.model_dump_json()),
                )
                rows.append(int(cursor.lastrowid or 0))
        return rows

    def storage_steps(self) -> list[tuple[int, str, LiveMoveVolume]]:
        """The catalog steps not yet answered, oldest first: (row, message id, step)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, message_id, step FROM storage_steps ORDER BY id"
            ).fetchall()
        return [(int(r[0]), str(r[1]), LiveMoveVolume.model_validate_json(r[2])) for r in rows]

    def storage_step_done(self, row: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM storage_steps WHERE id = ?", (row,))

    def storage_step_renamed(self, row: int, message_id: str) -> None:
        """The step is sent under `message_id` from now on (an answer recorded under the
        old one said to try again)."""
        with self._tx() as db:
            db.execute("UPDATE storage_steps SET message_id = ? WHERE id = ?", (message_id, row))

    def queued_jobs(self) -> list[MigrationJob]:
        """The jobs kept while they waited in the migration queue (phase `queued`)."""
        with self._lock:
            rows = self._db.execute("SELECT job FROM migration_jobs").fetchall()
        jobs = [MigrationJob.model_validate_json(r[0]) for r in rows]
        return [j for j in jobs if j.phase == "queued"]

    def drop_job(self, domain_id: uuid.UUID) -> None:
        """A new job of the domain runs: the last one kept is no longer its last."""
        with self._tx() as db:
            db.execute("DELETE FROM migration_jobs WHERE domain_id = ?", (str(domain_id),))

    def get(self, domain_id: uuid.UUID) -> DomainRecord | None:
        with self._lock:
            row = self._db.execute(
                _SELECT + " WHERE id = ?",
                (str(domain_id),),
            ).fetchone()
        return None if row is None else _record(row)

    def progress(self, domain_id: uuid.UUID) -> Progress | None:
        """What consuming a guest event needs of the domain (its state, the last driver event
        consumed, whether it is migrating in), without parsing its spec: the record read on
        every guest event's path."""
        with self._lock:
            row = self._db.execute(
                "SELECT state, driver_n, incoming IS NOT NULL FROM domains WHERE id = ?",
                (str(domain_id),),
            ).fetchone()
        return None if row is None else Progress(PowerState(row[0]), int(row[1]), bool(row[2]))

    def count_by_state(self) -> dict[PowerState, int]:
        """How many of this host's domains (not those migrating in) are in each state, without
        reading their records (a heartbeat's `domains_by_state`)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT state, count(*) FROM domains WHERE incoming IS NULL GROUP BY state"
            ).fetchall()
        return {PowerState(state): int(n) for state, n in rows}

    def all(self) -> list[DomainRecord]:
        """The domains of this host (not those migrating in: `incoming()`)."""
        with self._lock:
            rows = self._db.execute(_SELECT + " WHERE incoming IS NULL ORDER BY name").fetchall()
        return [_record(r) for r in rows]

    def incoming(self) -> list[DomainRecord]:
        """The domains migrating in, not yet this host's."""
        with self._lock:
            rows = self._db.execute(
                _SELECT + " WHERE incoming IS NOT NULL ORDER BY name"
            ).fetchall()
        return [_record(r) for r in rows]

    def define_incoming(
        self,
        spec: DomainSpec,
        incoming: Incoming,
        *,
        privileged: bool,
        bindings: StorageBindings,
        ports: tuple[PortBinding, ...],
    ) -> DomainRecord:
        """Insert the definition of a domain migrating in (no event; shut off until its
        machine runs), or raise NameTaken / KeyError (`spec.uuid` is defined here)."""
        with self._tx() as db:
            clash = db.execute(
                "SELECT id FROM domains WHERE name = ? OR id = ?", (spec.name, str(spec.uuid))
            ).fetchone()
            if clash is not None and clash[0] == str(spec.uuid):
                raise KeyError(str(spec.uuid))
            if clash is not None:
                raise NameTaken(f"name {spec.name!r} is taken by domain {clash[0]}")
            db.execute(
                "INSERT INTO domains (id, name, spec, state, seq, updated, privileged, bindings, "
                "ports, incoming) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    str(spec.uuid),
                    spec.name,
                    spec.model_dump_json(),
                    PowerState.SHUTOFF.value,
                    incoming.seq,
                    time.time(),
                    int(privileged),
                    bindings.model_dump_json(),
                    json.dumps([p.model_dump(mode="json") for p in ports]),
                    incoming.dump(),
                ),
            )
        record = self.get(spec.uuid)
        assert record is not None
        return record

    def finish_incoming(self, domain_id: uuid.UUID, seq: int, drafts: list[EventDraft]) -> None:
        """Make a domain migrating in this host's: it takes `seq` (the last its source
        emitted) and `drafts` follow it, in one transaction."""
        record = self.get(domain_id)
        if record is None:
            return
        with self._tx() as db:
            db.execute(
                "UPDATE domains SET incoming = NULL, seq = ?, updated = ? WHERE id = ?",
                (seq, time.time(), str(domain_id)),
            )
            self._emit(db, record.spec.uuid, record.spec.name, drafts)
            if drafts:
                db.execute(
                    "UPDATE domains SET state = ? WHERE id = ?",
                    (drafts[-1].state.value, str(domain_id)),
                )

    def forget(self, domain_id: uuid.UUID) -> None:
        """Remove the definition with no event: it migrated away, or never arrived."""
        with self._tx() as db:
            db.execute("DELETE FROM domains WHERE id = ?", (str(domain_id),))

    def emit_unsequenced(self, event: DomainEvent, cause: Cause | None = None) -> None:
        """Put an event that is no lifecycle event (migration progress: it carries the
        domain's current seq, not a new one) in the outbox, in order with the others."""
        with self._tx(durable=False) as db:
            self._enqueue(db, event, cause)

    def define(
        self,
        spec: DomainSpec,
        drafts: list[EventDraft],
        *,
        privileged: bool = False,
        bindings: StorageBindings | None = None,
        ports: tuple[PortBinding, ...] = (),
        start_pending: bool | None = None,
    ) -> DomainRecord:
        """Insert or replace the definition of `spec.uuid` (whether an admin made it, what
        storage it is bound to, its NICs' ports, whether a start is pending: None keeps
        what a definition had) and emit `drafts`."""
        with self._tx() as db:
            clash = db.execute(
                "SELECT id FROM domains WHERE name = ? AND id != ?", (spec.name, str(spec.uuid))
            ).fetchone()
            if clash is not None:
                raise NameTaken(f"name {spec.name!r} is taken by domain {clash[0]}")
            row = db.execute("SELECT state FROM domains WHERE id = ?", (str(spec.uuid),)).fetchone()
            state = PowerState.SHUTOFF if row is None else PowerState(row[0])
            db.execute(
                "INSERT INTO domains (id, name, spec, state, updated, privileged, bindings, ports, "
                "start_pending) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET name = excluded.name, spec = excluded.spec, "
                "updated = excluded.updated, privileged = excluded.privileged, "
                "bindings = excluded.bindings, ports = excluded.ports, "
                "start_pending = coalesce(?, start_pending)",
                (
                    str(spec.uuid),
                    spec.name,
                    spec.model_dump_json(),
                    state.value,
                    time.time(),
                    int(privileged),
                    (bindings or StorageBindings()).model_dump_json(),
                    json.dumps([p.model_dump(mode="json") for p in ports]),
                    int(bool(start_pending)),
                    None if start_pending is None else int(start_pending),
                ),
            )
            self._emit(db, spec.uuid, spec.name, drafts)
        record = self.get(spec.uuid)
        assert record is not None
        return record

    def undefine(self, domain_id: uuid.UUID, drafts: list[EventDraft]) -> None:
        """Emit `drafts` (seq continues) and remove the definition."""
        record = self.get(domain_id)
        if record is None:
            return
        with self._tx() as db:
            self._emit(db, record.spec.uuid, record.spec.name, drafts)
            db.execute("DELETE FROM domains WHERE id = ?", (str(domain_id),))

    def set_start_pending(self, domain_id: uuid.UUID, pending: bool) -> None:
        """Record whether the domain's create still wants it started (no event)."""
        with self._tx() as db:
            db.execute(
                "UPDATE domains SET start_pending = ? WHERE id = ?", (int(pending), str(domain_id))
            )

    def set_managed_save(self, domain_id: uuid.UUID, ref: StateRef | None) -> None:
        """Keep `ref` as the domain's managed save (None: it has none)."""
        with self._tx() as db:
            db.execute(
                "UPDATE domains SET managed_save = ? WHERE id = ?",
                (None if ref is None else ref.model_dump_json(), str(domain_id)),
            )

    def transition(
        self,
        domain_id: uuid.UUID,
        drafts: list[EventDraft],
        *,
        state: PowerState | None = None,
        driver_n: int | None = None,
        journaled: str | None = None,
    ) -> list[DomainEvent]:
        """Emit `drafts` and move to the last draft's state (or `state`), recording the
        driver event consumed, all in one transaction. Returns the events.

        `journaled` names the fsynced journal record the drafts come from (`"<n>/<ts>"`): the
        transaction then commits without an fsync (the record can be replayed) and the
        events' message ids derive from it (`event_id`). Without it the commit is fsynced."""
        with self._tx(durable=journaled is None) as db:
            # The name and state only: parsing the spec is most of a guest event's cost here.
            row = db.execute(
                "SELECT name, state FROM domains WHERE id = ?", (str(domain_id),)
            ).fetchone()
            if row is None:
                return []
            events = self._emit(db, domain_id, row[0], drafts, journaled)
            new_state = state or (drafts[-1].state if drafts else PowerState(row[1]))
            db.execute(
                "UPDATE domains SET state = ?, driver_n = max(driver_n, ?), updated = ?, "
                "start_pending = start_pending AND ? WHERE id = ?",
                (
                    new_state.value,
                    driver_n or 0,
                    time.time(),
                    new_state not in _RAN,  # a pending start is done once the machine ran
                    str(domain_id),
                ),
            )
        return events

    def _emit(
        self,
        db: sqlite3.Connection,
        domain_id: uuid.UUID,
        name: str,
        drafts: list[EventDraft],
        journaled: str | None = None,
    ) -> list[DomainEvent]:
        if not drafts:
            return []
        (seq,) = db.execute(
            "SELECT seq FROM domains WHERE id = ?", (str(domain_id),)
        ).fetchone() or (0,)
        events = []
        for i, draft in enumerate(drafts):
            seq += 1
            fields: dict[str, object] = {
                "domain_id": domain_id,
                "name": name,
                "host": self.host,
                "seq": seq,
                "state": draft.state,
                "reason": draft.reason,
            }
            if draft.detail is not None:
                fields["detail"] = draft.detail
            event = draft.cls.model_validate(fields)
            self._enqueue(
                db,
                event,
                draft.cause,
                message_id=None if journaled is None else event_id(domain_id, journaled, i),
            )
            events.append(event)
        db.execute("UPDATE domains SET seq = ? WHERE id = ?", (seq, str(domain_id)))
        return events

    def _enqueue(
        self,
        db: sqlite3.Connection,
        event: DomainEvent | VolumeEvent,
        cause: Cause | None,
        *,
        message_id: str | None = None,
    ) -> None:
        """Add the event to the outbox in `db`'s transaction; `message_id` keeps an event
        replayed from a journal under the id it was first given."""
        cause = cause or Cause()
        envelope = envelope_for(
            event,
            source=self.source,
            correlation_id=cause.correlation_id,
            causation_id=cause.causation_id,
            message_id=message_id,
        )
        body = pack(envelope)
        cursor = db.execute(
            "INSERT INTO outbox (message_id, routing_key, body) VALUES (?, ?, ?)",
            (envelope.id, event.routing_key(), body),
        )
        row = cursor.lastrowid
        assert row is not None
        self._inserted.append(OutboxItem(row, envelope.id, event.routing_key(), body, envelope))

    # ---- volumes -----------------------------------------------------------------------------

    def volume_seq(self, volume_id: uuid.UUID) -> int:
        """The seq of the volume's last event (0 if it has none)."""
        return self.volume_last(volume_id)[0]

    def volume_last(self, volume_id: uuid.UUID) -> tuple[int, str, int]:
        """The seq, type and size of the volume's last event ((0, "", 0) if it has none)."""
        with self._lock:
            row = self._db.execute(
                "SELECT seq, last_event, size FROM volume_seqs WHERE id = ?", (str(volume_id),)
            ).fetchone()
        return (0, "", 0) if row is None else (int(row[0]), str(row[1]), int(row[2]))

    def emit_volume(
        self, volume_id: uuid.UUID, make: Callable[[int], VolumeEvent], cause: Cause | None
    ) -> VolumeEvent:
        """Put the event `make(seq)` in the outbox with the volume's next seq, both in one
        transaction. The seq survives the volume's deletion, so a re-created id goes on
        counting up."""
        with self._tx() as db:
            row = db.execute(
                "SELECT seq FROM volume_seqs WHERE id = ?", (str(volume_id),)
            ).fetchone()
            seq = (0 if row is None else int(row[0])) + 1
            event = make(seq)
            self._enqueue(db, event, cause)
            db.execute(
                "INSERT INTO volume_seqs (id, seq, last_event, size) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, "
                "last_event = excluded.last_event, size = excluded.size",
                (str(volume_id), seq, event.TYPE, event.size),
            )
        return event

    def wait_for(
        self, domain_id: uuid.UUID, states: set[PowerState], timeout: float
    ) -> DomainRecord | None:
        """Wait until the domain is in one of `states`; return it, or None on timeout."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                record = self.get(domain_id)
                if record is not None and record.state in states:
                    return record
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.changed.wait(remaining)

    # ---- outbox -------------------------------------------------------------------------------

    def outbox(self, limit: int = 200, *, after: int = 0) -> list[OutboxItem]:
        """The oldest `limit` rows past row `after`, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, message_id, routing_key, body FROM outbox WHERE id > ? "
                "ORDER BY id LIMIT ?",
                (after, limit),
            ).fetchall()
        return [OutboxItem(r[0], r[1], r[2], bytes(r[3])) for r in rows]

    def outbox_done(self, up_to_row: int) -> None:
        """Forget the rows up to `up_to_row` (the broker confirmed them), once they are on
        disk: a row is never forgotten before it is durable."""
        self.sync()
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id <= ?", (up_to_row,))

    def outbox_size(self, *, after: int = 0) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT count(*) FROM outbox WHERE id > ?", (after,)).fetchone()
        return int(n)

    def close(self) -> None:
        with self._lock:
            self.sync()
            self._db.close()


def event_id(domain_id: uuid.UUID, journaled: str, index: int) -> str:
    """The message id of the `index`-th event made from journal record `journaled` ("<n>/<ts>"):
    the same on every replay of that record, distinct for every other record of any life of
    the domain (a redefined domain's journal starts again at 1, but not at the same stamp)."""
    return str(uuid.uuid5(domain_id, f"journal/{journaled}/{index}"))


def _record(
    row: tuple[str, str, int, int, int, str, str, str | None, str | None, int],
) -> DomainRecord:
    return DomainRecord(
        spec=DomainSpec.model_validate(json.loads(row[0])),
        state=PowerState(row[1]),
        seq=int(row[2]),
        driver_n=int(row[3]),
        privileged=bool(row[4]),
        bindings=StorageBindings.model_validate_json(row[5]),
        ports=tuple(PortBinding.model_validate(p) for p in json.loads(row[6])),
        managed_save=None if row[7] is None else StateRef.model_validate_json(row[7]),
        incoming=None if row[8] is None else Incoming.load(row[8]),
        start_pending=bool(row[9]),
    )
