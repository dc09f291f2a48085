"""The registry: the control plane's database of domains, their event log, hosts and tokens.

It holds the desired spec of every domain (and its project) plus a projection of the compute
nodes' events: power state, task, host, last `seq`, fault. The compute nodes own the truth about
what runs; the registry is what the API answers from.

Projection rules (`apply_event`), each in one transaction with the event's append to the log:
- an event already logged (same message id) is a duplicate and changes nothing;
- an event from a host other than the domain's host is logged, not projected (a refused
  placement attempt's leftovers);
- an event whose `seq` is not above the stored seq is stale: logged, not projected;
- `domain.undefined` while the task is `deleting` removes the record.

Event-log ids only grow in commit order (appends are serialised: SQLite's write lock, an
advisory lock on PostgreSQL), so a reader resuming "after id N" never misses a row that
commits later with a smaller id.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from protos.domain import DomainSpec, Fault, PowerState, TaskState
from protos.events import DomainEvent, DomainStarted, DomainUndefined
from protos.host import HostHeartbeat, HostInventory, Resources
from protos.replies import DomainInfo
from services.api.config import Quota, Role
from services.api.db import Cursor, Database, Row

# Any constant will do: it names the lock that orders event-log appends on PostgreSQL.
_EVENT_LOG_LOCK = 0x466C6F74

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS domains (
        id TEXT PRIMARY KEY,
        project TEXT NOT NULL,
        name TEXT NOT NULL,
        spec TEXT NOT NULL,
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        host TEXT,
        power TEXT NOT NULL,
        task TEXT NOT NULL,
        seq BIGINT NOT NULL DEFAULT 0,
        fault TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        UNIQUE (name)
    )""",
    "CREATE INDEX IF NOT EXISTS domains_host ON domains (host)",
    """CREATE TABLE IF NOT EXISTS events (
        id {autoid},
        message_id TEXT NOT NULL UNIQUE,
        project TEXT,
        domain_id TEXT NOT NULL,
        host TEXT NOT NULL,
        seq BIGINT NOT NULL,
        type TEXT NOT NULL,
        routing_key TEXT NOT NULL,
        state TEXT NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        body TEXT NOT NULL,
        correlation_id TEXT,
        causation_id TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS events_domain ON events (domain_id, host, seq)",
    "CREATE INDEX IF NOT EXISTS events_project ON events (project, id)",
    """CREATE TABLE IF NOT EXISTS hosts (
        name TEXT PRIMARY KEY,
        enabled INTEGER NOT NULL,
        kvm TEXT NOT NULL,
        version TEXT NOT NULL,
        interval_s DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL,
        inventory TEXT NOT NULL,
        usage TEXT NOT NULL,
        domains_by_state TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS tokens (
        id TEXT PRIMARY KEY,
        token_sha256 TEXT NOT NULL UNIQUE,
        project TEXT NOT NULL,
        role TEXT NOT NULL,
        description TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS quotas (
        project TEXT PRIMARY KEY,
        domains INTEGER,
        vcpus INTEGER,
        memory_mib INTEGER
    )""",
    # Keys the API derives things from (the host alias key), made once, shared by replicas.
    """CREATE TABLE IF NOT EXISTS secrets (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
]
_ADDED_COLUMNS = [("events", "correlation_id", "TEXT"), ("events", "causation_id", "TEXT")]
_AUTOID = {
    "sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT",
    "postgresql": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
}


class Outcome(StrEnum):
    """What `apply_event` did with an event."""

    APPLIED = "applied"  # logged and projected
    REMOVED = "removed"  # logged; the record was removed (undefined during delete)
    LOGGED = "logged"  # logged only: no record, another host's, or placement pending
    STALE = "stale"  # logged; seq not above the stored one, so not projected
    DUPLICATE = "duplicate"  # seen before: nothing changed


class QuotaExceeded(Exception):
    def __init__(self, resource: str, limit: int, used: int, requested: int) -> None:
        super().__init__(f"quota for {resource} exceeded: {used} used + {requested} > {limit}")
        self.resource = resource
        self.limit = limit
        self.used = used
        self.requested = requested


class NameInUse(Exception):
    """A domain of that name (or uuid) exists. Names are unique across projects because a
    compute node refuses two domains of one name, and any two may land on the same host."""


@dataclass(frozen=True, slots=True)
class DomainRecord:
    id: uuid.UUID
    project: str
    name: str
    spec: DomainSpec
    host: str | None
    power: PowerState
    task: TaskState
    seq: int
    fault: Fault | None
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class EventRecord:
    id: int
    message_id: str
    project: str | None
    domain_id: uuid.UUID
    host: str
    seq: int
    type: str
    routing_key: str
    state: PowerState
    ts: float
    body: dict[str, Any]
    correlation_id: str | None = None  # the request (or first command) behind it
    causation_id: str | None = None  # the command that caused it


@dataclass(frozen=True, slots=True)
class HostRecord:
    name: str
    enabled: bool
    kvm: str
    version: str
    interval_s: float
    last_seen: float
    inventory: HostInventory
    usage: Resources
    domains_by_state: dict[str, int]


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: str
    project: str
    role: Role
    description: str
    created_at: float


_DOMAIN_COLUMNS = "id, project, name, spec, host, power, task, seq, fault, created_at, updated_at"
_EVENT_COLUMNS = (
    "id, message_id, project, domain_id, host, seq, type, routing_key, state, ts, body, "
    "correlation_id, causation_id"
)


def _domain(row: Row) -> DomainRecord:
    return DomainRecord(
        id=uuid.UUID(row[0]),
        project=row[1],
        name=row[2],
        spec=DomainSpec.model_validate_json(row[3]),
        host=row[4],
        power=PowerState(row[5]),
        task=TaskState(row[6]),
        seq=int(row[7]),
        fault=Fault.model_validate_json(row[8]) if row[8] else None,
        created_at=float(row[9]),
        updated_at=float(row[10]),
    )


def _event(row: Row) -> EventRecord:
    return EventRecord(
        id=int(row[0]),
        message_id=row[1],
        project=row[2],
        domain_id=uuid.UUID(row[3]),
        host=row[4],
        seq=int(row[5]),
        type=row[6],
        routing_key=row[7],
        state=PowerState(row[8]),
        ts=float(row[9]),
        body=json.loads(row[10]),
        correlation_id=row[11],
        causation_id=row[12],
    )


class Registry:
    def __init__(self, db: Database) -> None:
        self.db = db

    @classmethod
    def open(cls, url: str) -> Registry:
        registry = cls(Database(url))
        registry.migrate()
        return registry

    def close(self) -> None:
        self.db.close()

    def migrate(self) -> None:
        """Create the tables that are missing (idempotent; safe from several replicas)."""
        with self.db.transaction() as cur:
            if cur.dialect == "postgresql":
                cur.execute("SELECT pg_advisory_xact_lock(?)", (_EVENT_LOG_LOCK + 1,))
            for statement in _SCHEMA:
                cur.execute(statement.replace("{autoid}", _AUTOID[cur.dialect]))
            # Columns added since a table was first created.
            for table, column, kind in _ADDED_COLUMNS:
                if cur.dialect == "postgresql":
                    cur.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}")
                elif not any(r[1] == column for r in cur.all(f"PRAGMA table_info({table})")):
                    cur.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    # ---- domains ---------------------------------------------------------------------------

    def create_domain(self, spec: DomainSpec, project: str, quota: Quota) -> DomainRecord:
        """Insert a domain in task `scheduling` if the project's quota allows it.

        Raises QuotaExceeded (nothing stored) or NameInUse."""
        now = time.time()
        with self.db.transaction() as cur:
            if cur.dialect == "postgresql":
                # Serialise creates per project so two of them cannot both pass the check.
                cur.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (project,))
            used = self._usage(cur, project)
            wanted = {"domains": 1, "vcpus": spec.vcpus, "memory_mib": spec.memory_mib}
            for resource, requested in wanted.items():
                limit = getattr(quota, resource)
                if limit is not None and used[resource] + requested > limit:
                    raise QuotaExceeded(resource, limit, used[resource], requested)
            taken = cur.one(
                "SELECT 1 FROM domains WHERE id = ? OR name = ?", (str(spec.uuid), spec.name)
            )
            if taken:
                raise NameInUse(f"a domain named {spec.name!r} exists (or its uuid is taken)")
            cur.execute(
                f"INSERT INTO domains ({_DOMAIN_COLUMNS}, vcpus, memory_mib) "  # noqa: S608
                "VALUES (?, ?, ?, ?, NULL, ?, ?, 0, NULL, ?, ?, ?, ?)",
                (
                    str(spec.uuid),
                    project,
                    spec.name,
                    spec.model_dump_json(),
                    PowerState.NOSTATE.value,
                    TaskState.SCHEDULING.value,
                    now,
                    now,
                    spec.vcpus,
                    spec.memory_mib,
                ),
            )
        record = self.get_domain(spec.uuid)
        assert record is not None
        return record

    @staticmethod
    def _usage(cur: Cursor, project: str) -> dict[str, int]:
        row = cur.one(
            "SELECT COUNT(*), COALESCE(SUM(vcpus), 0), COALESCE(SUM(memory_mib), 0) "
            "FROM domains WHERE project = ?",
            (project,),
        )
        assert row is not None
        return {"domains": int(row[0]), "vcpus": int(row[1]), "memory_mib": int(row[2])}

    def usage(self, project: str) -> dict[str, int]:
        """What the project's domains hold (every record counts, whatever its state)."""
        with self.db.transaction() as cur:
            return self._usage(cur, project)

    def get_domain(self, domain_id: uuid.UUID) -> DomainRecord | None:
        with self.db.transaction() as cur:
            row = cur.one(
                f"SELECT {_DOMAIN_COLUMNS} FROM domains WHERE id = ?",  # noqa: S608
                (str(domain_id),),
            )
        return _domain(row) if row else None

    def list_domains(
        self,
        *,
        project: str | None = None,
        power: PowerState | None = None,
        task: TaskState | None = None,
        host: str | None = None,
        name: str | None = None,
    ) -> list[DomainRecord]:
        """Domains matching every filter given, by project and name."""
        where, params = [], []
        for column, value in (
            ("project", project),
            ("power", power.value if power else None),
            ("task", task.value if task else None),
            ("host", host),
            ("name", name),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        # Only constant column names are spliced in; values are always parameters.
        sql = f"SELECT {_DOMAIN_COLUMNS} FROM domains"  # noqa: S608
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self.db.transaction() as cur:
            rows = cur.all(sql + " ORDER BY project, name", params)
        return [_domain(r) for r in rows]

    def set_task(
        self, domain_id: uuid.UUID, task: TaskState, fault: Fault | None = None
    ) -> DomainRecord | None:
        """Set the task (and the fault, which only `error` keeps)."""
        with self.db.transaction() as cur:
            cur.execute(
                "UPDATE domains SET task = ?, fault = ?, updated_at = ? WHERE id = ?",
                (
                    task.value,
                    fault.model_dump_json() if fault and task is TaskState.ERROR else None,
                    time.time(),
                    str(domain_id),
                ),
            )
        return self.get_domain(domain_id)

    def set_placement(
        self, domain_id: uuid.UUID, host: str, info: DomainInfo
    ) -> DomainRecord | None:
        """Record where the scheduler put the domain; None if the record is gone (deleted
        while it was being scheduled). Events from `host` that arrived before the placement
        and are newer than `info` win."""
        with self.db.transaction() as cur:
            power, seq = info.state.value, info.seq
            newest = cur.one(
                "SELECT seq, state FROM events WHERE domain_id = ? AND host = ? "
                "ORDER BY seq DESC LIMIT 1",
                (str(domain_id), host),
            )
            if newest and int(newest[0]) > seq:
                seq, power = int(newest[0]), newest[1]
            changed = cur.execute(
                "UPDATE domains SET host = ?, power = ?, seq = ?, task = ?, fault = NULL, "
                "updated_at = ? WHERE id = ?",
                (host, power, seq, TaskState.NONE.value, time.time(), str(domain_id)),
            )
        return self.get_domain(domain_id) if changed else None

    def observe_info(self, info: DomainInfo) -> DomainRecord | None:
        """Project a compute node's answer (`DomainInfo`) like an event: only if it comes from
        the domain's host and its seq is above the stored one."""
        with self.db.transaction() as cur:
            cur.execute(
                "UPDATE domains SET power = ?, seq = ?, updated_at = ? "
                "WHERE id = ? AND host = ? AND seq < ?",
                (info.state.value, info.seq, time.time(), str(info.domain_id), info.host, info.seq),
            )
        return self.get_domain(info.domain_id)

    def remove_domain(self, domain_id: uuid.UUID) -> bool:
        with self.db.transaction() as cur:
            return cur.execute("DELETE FROM domains WHERE id = ?", (str(domain_id),)) > 0

    # ---- events ----------------------------------------------------------------------------

    def apply_event(  # noqa: PLR0911  (one return per outcome reads best)
        self,
        message_id: str,
        routing_key: str,
        event: DomainEvent,
        ts: float | None = None,
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> Outcome:
        """Append `event` to the log and project it onto its domain (see the module's rules)."""
        domain_id = str(event.domain_id)
        now = time.time()
        with self.db.transaction() as cur:
            if cur.dialect == "postgresql":
                cur.execute("SELECT pg_advisory_xact_lock(?)", (_EVENT_LOG_LOCK,))
            row = cur.one(
                "SELECT project, host, task, seq, fault FROM domains WHERE id = ?", (domain_id,)
            )
            inserted = cur.execute(
                "INSERT INTO events (message_id, project, domain_id, host, seq, type, "
                "routing_key, state, ts, body, correlation_id, causation_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (message_id) DO NOTHING",
                (
                    message_id,
                    row[0] if row else None,
                    domain_id,
                    event.host,
                    event.seq,
                    event.TYPE,
                    routing_key,
                    event.state.value,
                    ts if ts is not None else now,
                    event.model_dump_json(),
                    correlation_id,
                    causation_id,
                ),
            )
            if not inserted:
                return Outcome.DUPLICATE
            if row is None:
                return Outcome.LOGGED
            _, host, task, seq, fault = row[0], row[1], TaskState(row[2]), int(row[3]), row[4]
            if host is None:
                # The scheduler's answer is what places a domain; only when that answer was
                # lost (timeout) does a start seen on some host tell us where it went.
                timed_out = fault is not None and Fault.model_validate_json(fault).code == (
                    "schedule_timeout"
                )
                if not (timed_out and isinstance(event, DomainStarted)):
                    return Outcome.LOGGED
                host, seq, task = event.host, 0, TaskState.NONE
            if event.host != host:
                return Outcome.LOGGED
            if event.seq <= seq:
                return Outcome.STALE
            if isinstance(event, DomainUndefined):
                if task is TaskState.DELETING:
                    cur.execute("DELETE FROM domains WHERE id = ?", (domain_id,))
                    return Outcome.REMOVED
                lost = Fault(
                    code="undefined_on_host", message=event.reason or "undefined", host=host
                )
                cur.execute(
                    "UPDATE domains SET power = ?, seq = ?, task = ?, fault = ?, updated_at = ? "
                    "WHERE id = ?",
                    (
                        PowerState.NOSTATE.value,
                        event.seq,
                        TaskState.ERROR.value,
                        lost.model_dump_json(),
                        now,
                        domain_id,
                    ),
                )
                return Outcome.APPLIED
            cur.execute(
                "UPDATE domains SET host = ?, power = ?, seq = ?, task = ?, fault = ?, "
                "updated_at = ? WHERE id = ?",
                (
                    host,
                    event.state.value,
                    event.seq,
                    task.value,
                    fault if task is TaskState.ERROR else None,
                    now,
                    domain_id,
                ),
            )
            return Outcome.APPLIED

    def events_after(
        self,
        after_id: int = 0,
        *,
        project: str | None = None,
        domain_id: uuid.UUID | None = None,
        since_seq: int | None = None,
        limit: int = 500,
    ) -> list[EventRecord]:
        """Log rows with id above `after_id`, oldest first; `project` None means every
        project (and domains the registry does not know)."""
        where: list[str] = ["id > ?"]
        params: list[Any] = [after_id]
        if project is not None:
            where.append("project = ?")
            params.append(project)
        if domain_id is not None:
            where.append("domain_id = ?")
            params.append(str(domain_id))
            if since_seq is not None:
                where.append("seq > ?")
                params.append(since_seq)
        sql = f"SELECT {_EVENT_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY id LIMIT ?"  # noqa: S608
        with self.db.transaction() as cur:
            rows = cur.all(sql, [*params, limit])
        return [_event(r) for r in rows]

    def last_event_id(self) -> int:
        with self.db.transaction() as cur:
            row = cur.one("SELECT COALESCE(MAX(id), 0) FROM events")
        return int(row[0]) if row else 0

    # ---- hosts -----------------------------------------------------------------------------

    def record_heartbeat(self, beat: HostHeartbeat, seen_at: float | None = None) -> None:
        """Store the host's latest heartbeat (an older one never replaces a newer one)."""
        seen = time.time() if seen_at is None else seen_at
        with self.db.transaction() as cur:
            cur.execute(
                "INSERT INTO hosts (name, enabled, kvm, version, interval_s, last_seen, "
                "inventory, usage, domains_by_state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET enabled = excluded.enabled, "
                "kvm = excluded.kvm, version = excluded.version, "
                "interval_s = excluded.interval_s, last_seen = excluded.last_seen, "
                "inventory = excluded.inventory, usage = excluded.usage, "
                "domains_by_state = excluded.domains_by_state "
                "WHERE hosts.last_seen <= excluded.last_seen",
                (
                    beat.host,
                    1 if beat.enabled else 0,
                    beat.inventory.kvm.value,
                    beat.version,
                    beat.interval_s,
                    seen,
                    beat.inventory.model_dump_json(),
                    beat.usage.model_dump_json(),
                    json.dumps({k.value: v for k, v in beat.domains_by_state.items()}),
                ),
            )

    def set_host_enabled(self, name: str, enabled: bool) -> None:
        with self.db.transaction() as cur:
            cur.execute("UPDATE hosts SET enabled = ? WHERE name = ?", (1 if enabled else 0, name))

    def host_names(self) -> list[str]:
        """The names of every host that has sent a heartbeat."""
        with self.db.transaction() as cur:
            return [str(r[0]) for r in cur.all("SELECT name FROM hosts", [])]

    def hosts(self, name: str | None = None) -> list[HostRecord]:
        sql = (
            "SELECT name, enabled, kvm, version, interval_s, last_seen, inventory, usage, "
            "domains_by_state FROM hosts"
        )
        params: list[Any] = []
        if name is not None:
            sql += " WHERE name = ?"
            params.append(name)
        with self.db.transaction() as cur:
            rows = cur.all(sql + " ORDER BY name", params)
        return [
            HostRecord(
                name=r[0],
                enabled=bool(r[1]),
                kvm=r[2],
                version=r[3],
                interval_s=float(r[4]),
                last_seen=float(r[5]),
                inventory=HostInventory.model_validate_json(r[6]),
                usage=Resources.model_validate_json(r[7]),
                domains_by_state=json.loads(r[8]),
            )
            for r in rows
        ]

    # ---- tokens and quotas -----------------------------------------------------------------

    def add_token(
        self, token_sha256: str, project: str, role: Role, description: str
    ) -> TokenRecord:
        record = TokenRecord(uuid.uuid4().hex, project, role, description, time.time())
        with self.db.transaction() as cur:
            cur.execute(
                "INSERT INTO tokens (id, token_sha256, project, role, description, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (record.id, token_sha256, project, role.value, description, record.created_at),
            )
        return record

    def find_token(self, token_sha256: str) -> TokenRecord | None:
        with self.db.transaction() as cur:
            row = cur.one(
                "SELECT id, project, role, description, created_at FROM tokens "
                "WHERE token_sha256 = ?",
                (token_sha256,),
            )
        return TokenRecord(row[0], row[1], Role(row[2]), row[3], float(row[4])) if row else None

    def list_tokens(self) -> list[TokenRecord]:
        with self.db.transaction() as cur:
            rows = cur.all(
                "SELECT id, project, role, description, created_at FROM tokens ORDER BY created_at"
            )
        return [TokenRecord(r[0], r[1], Role(r[2]), r[3], float(r[4])) for r in rows]

    def delete_token(self, token_id: str) -> bool:
        with self.db.transaction() as cur:
            return cur.execute("DELETE FROM tokens WHERE id = ?", (token_id,)) > 0

    def set_quota(self, project: str, quota: Quota) -> None:
        with self.db.transaction() as cur:
            cur.execute(
                "INSERT INTO quotas (project, domains, vcpus, memory_mib) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (project) DO UPDATE SET domains = excluded.domains, "
                "vcpus = excluded.vcpus, memory_mib = excluded.memory_mib",
                (project, quota.domains, quota.vcpus, quota.memory_mib),
            )

    def secret(self, name: str) -> str:
        """A random 256-bit key by `name`: made on first use, the same for every replica and
        across restarts."""
        with self.db.transaction() as cur:
            cur.execute(
                "INSERT INTO secrets (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                (name, secrets.token_hex(32)),
            )
            row = cur.one("SELECT value FROM secrets WHERE name = ?", (name,))
        assert row is not None
        return str(row[0])

    def get_quota(self, project: str) -> Quota | None:
        """The quota an admin set through the API, if any (it overrides the config file)."""
        with self.db.transaction() as cur:
            row = cur.one(
                "SELECT domains, vcpus, memory_mib FROM quotas WHERE project = ?", (project,)
            )
        return Quota(domains=row[0], vcpus=row[1], memory_mib=row[2]) if row else None
