"""The registry's domain records: the desired spec of every domain (and its project) with
what is projected onto it (power state, task, host, last `seq`, fault), quota usage, and the
changes requests make (task, spec, placement, deletion).

The projection of events onto these records is services.api.registry.projection's; the
sweeps that settle creates and deletes nobody finished are services.api.registry.settling's.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from protos.domain import DomainSpec, Fault, PowerState, TaskState
from protos.replies import DomainInfo
from services.api.config import Quota
from services.api.tables import EVENT_LOG_LOCK, domains, events, pending_reaps, removed_domains
from services.db import Database, advisory_xact_lock, upsert

Row = Sequence[Any]  # a result row: the selected columns in order


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


_DOMAIN_COLUMNS = (
    domains.c.id,
    domains.c.project,
    domains.c.name,
    domains.c.spec,
    domains.c.host,
    domains.c.power,
    domains.c.task,
    domains.c.seq,
    domains.c.fault,
    domains.c.created_at,
    domains.c.updated_at,
)

# Built once: the hot paths (event projection, reads by id) only bind their parameters.
_DOMAIN_BY_ID = sa.select(*_DOMAIN_COLUMNS).where(domains.c.id == sa.bindparam("b_id"))
_TAKEN = sa.select(sa.literal(1)).where(
    (domains.c.id == sa.bindparam("b_id")) | (domains.c.name == sa.bindparam("b_name"))
)
_USAGE = sa.select(
    sa.func.count(),
    sa.func.coalesce(sa.func.sum(domains.c.vcpus), 0),
    sa.func.coalesce(sa.func.sum(domains.c.memory_mib), 0),
).where(domains.c.project == sa.bindparam("b_project"))
PROJECTION_ID = sa.select(domains.c.id).where(domains.c.id == sa.bindparam("b_id"))
UPDATE_DOMAIN = domains.update().where(domains.c.id == sa.bindparam("b_id"))
_DELETE_DOMAIN = domains.delete().where(domains.c.id == sa.bindparam("b_id"))
# How long a removed domain's id is remembered: far past any create's retries (schedule and
# clean-up timeouts are minutes), so a late arrival anywhere is known for what it is.
REMOVED_KEEP_S = 7 * 24 * 3600.0


def delete_domain(cur: Connection, domain_id: str, *, where: Any = None) -> bool:
    """Remove a domain's record (if `where` holds too) and remember its id as removed."""
    stmt = _DELETE_DOMAIN if where is None else _DELETE_DOMAIN.where(where)
    if cur.execute(stmt, {"b_id": domain_id}).rowcount == 0:
        return False
    cur.execute(
        upsert(cur, removed_domains)
        .values(id=domain_id, removed_at=time.time())
        .on_conflict_do_nothing(index_elements=[removed_domains.c.id])
    )
    return True


def was_removed(cur: Connection, domain_id: str) -> bool:
    """Whether the domain had a record that was removed (within `REMOVED_KEEP_S`)."""
    found = cur.execute(
        sa.select(removed_domains.c.id).where(removed_domains.c.id == domain_id)
    ).first()
    return found is not None


def reap_pending(cur: Connection, domain_id: str, host: str) -> None:
    """Remember that the removed domain is to be reaped on `host` (until `reaped`)."""
    cur.execute(
        upsert(cur, pending_reaps)
        .values(domain_id=domain_id, host=host, since=time.time())
        .on_conflict_do_nothing(index_elements=[pending_reaps.c.domain_id, pending_reaps.c.host])
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


class Domains:
    """The domain records (one table, `domains`)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, spec: DomainSpec, project: str, quota: Quota) -> DomainRecord:
        """Insert a domain in task `scheduling` if the project's quota allows it.

        Raises QuotaExceeded (nothing stored) or NameInUse."""
        now = time.time()
        with self.db.transaction() as cur:
            # Serialise creates per project so two of them cannot both pass the check.
            advisory_xact_lock(cur, project)
            used = self._usage(cur, project)
            wanted = {"domains": 1, "vcpus": spec.vcpus, "memory_mib": spec.memory_mib}
            for resource, requested in wanted.items():
                limit = getattr(quota, resource)
                if limit is not None and used[resource] + requested > limit:
                    raise QuotaExceeded(resource, limit, used[resource], requested)
            taken = cur.execute(_TAKEN, {"b_id": str(spec.uuid), "b_name": spec.name}).first()
            if taken:
                raise NameInUse(f"a domain named {spec.name!r} exists (or its uuid is taken)")
            cur.execute(
                domains.insert(),
                {
                    "id": str(spec.uuid),
                    "project": project,
                    "name": spec.name,
                    "spec": spec.model_dump_json(),
                    "host": None,
                    "power": PowerState.NOSTATE.value,
                    "task": TaskState.SCHEDULING.value,
                    "seq": 0,
                    "fault": None,
                    "created_at": now,
                    "updated_at": now,
                    "vcpus": spec.vcpus,
                    "memory_mib": spec.memory_mib,
                },
            )
        record = self.get(spec.uuid)
        assert record is not None
        return record

    @staticmethod
    def _usage(cur: Connection, project: str) -> dict[str, int]:
        row = cur.execute(_USAGE, {"b_project": project}).one()
        return {"domains": int(row[0]), "vcpus": int(row[1]), "memory_mib": int(row[2])}

    def usage(self, project: str) -> dict[str, int]:
        """What the project's domains hold (every record counts, whatever its state)."""
        with self.db.transaction() as cur:
            return self._usage(cur, project)

    def get(self, domain_id: uuid.UUID) -> DomainRecord | None:
        with self.db.transaction() as cur:
            row = cur.execute(_DOMAIN_BY_ID, {"b_id": str(domain_id)}).first()
        return _domain(row) if row else None

    def matching(
        self,
        *,
        project: str | None = None,
        power: PowerState | None = None,
        task: TaskState | None = None,
        host: str | None = None,
        name: str | None = None,
    ) -> list[DomainRecord]:
        """Domains matching every filter given, by project and name."""
        query = sa.select(*_DOMAIN_COLUMNS).order_by(domains.c.project, domains.c.name)
        for column, value in (
            (domains.c.project, project),
            (domains.c.power, power.value if power else None),
            (domains.c.task, task.value if task else None),
            (domains.c.host, host),
            (domains.c.name, name),
        ):
            if value is not None:
                query = query.where(column == value)
        with self.db.transaction() as cur:
            rows = cur.execute(query).all()
        return [_domain(r) for r in rows]

    def set_task(
        self,
        domain_id: uuid.UUID,
        task: TaskState,
        fault: Fault | None = None,
        *,
        unless: TaskState | None = None,
    ) -> DomainRecord | None:
        """Set the task (and the fault, which only `error` keeps); not if the task is
        `unless` (a create's failure does not undo a DELETE that came meanwhile)."""
        query = domains.update().where(domains.c.id == str(domain_id))
        if unless is not None:
            query = query.where(domains.c.task != unless.value)
        with self.db.transaction() as cur:
            cur.execute(
                query.values(
                    task=task.value,
                    fault=fault.model_dump_json() if fault and task is TaskState.ERROR else None,
                    updated_at=time.time(),
                )
            )
        return self.get(domain_id)

    def swap_task(self, domain_id: uuid.UUID, expected: TaskState, task: TaskState) -> bool:
        """Set the task to `task` only if it is `expected` (two requests racing to start a
        migration: one wins); whether it was."""
        with self.db.transaction() as cur:
            changed = cur.execute(
                domains.update()
                .where(domains.c.id == str(domain_id), domains.c.task == expected.value)
                .values(task=task.value, fault=None, updated_at=time.time())
            ).rowcount
        return bool(changed)

    def set_spec(self, domain_id: uuid.UUID, spec: DomainSpec) -> DomainRecord | None:
        """Replace the domain's spec (a disk attached or detached while it is stopped)."""
        with self.db.transaction() as cur:
            cur.execute(
                domains.update()
                .where(domains.c.id == str(domain_id))
                .values(spec=spec.model_dump_json(), updated_at=time.time())
            )
        return self.get(domain_id)

    def set_placement(
        self, domain_id: uuid.UUID, host: str, info: DomainInfo
    ) -> DomainRecord | None:
        """Record where the scheduler put the domain; None if the record is gone. A domain
        deleted while it was being scheduled (a tombstone) keeps its task `deleting` and gets
        the host, for the caller to destroy and undefine it there (its `domain.undefined`
        then removes the record). Events from `host` that arrived before the placement and
        are newer than `info` win."""
        with self.db.transaction() as cur:
            advisory_xact_lock(cur, EVENT_LOG_LOCK)  # not beside a tombstone's own start
            current = cur.execute(
                sa.select(domains.c.task, domains.c.host).where(domains.c.id == str(domain_id))
            ).first()
            if current is None:
                return None
            if current[0] == TaskState.DELETING.value and current[1] is not None:
                return self.get(domain_id)  # its start placed it already
            task = TaskState(current[0])
            task = task if task is TaskState.DELETING else TaskState.NONE
            power, seq = info.state.value, info.seq
            newest = cur.execute(
                sa.select(events.c.seq, events.c.state)
                .where(events.c.domain_id == str(domain_id), events.c.host == host)
                .order_by(events.c.seq.desc())
                .limit(1)
            ).first()
            if newest and int(newest[0]) > seq:
                seq, power = int(newest[0]), newest[1]
            changed = cur.execute(
                domains.update()
                .where(domains.c.id == str(domain_id))
                .values(
                    host=host,
                    power=power,
                    seq=seq,
                    task=task.value,
                    fault=None,
                    updated_at=time.time(),
                )
            ).rowcount
        return self.get(domain_id) if changed else None

    def tombstone(self, domain_id: uuid.UUID) -> DomainRecord | None:
        """Delete a domain not placed yet: task `deleting` with no host, until the host it
        appears on (if any) undefined it or the orphan sweep settles it
        (services.api.registry.settling). It keeps counting against the quota meanwhile.
        Returns the record as it is now (None if gone): a tombstone, or placed meanwhile
        (then delete it on its host as usual)."""
        with self.db.transaction() as cur:
            advisory_xact_lock(cur, EVENT_LOG_LOCK)
            cur.execute(
                domains.update()
                .where(
                    domains.c.id == str(domain_id),
                    domains.c.host.is_(None),
                    # Once: a DELETE again must not put off the sweep that settles it.
                    domains.c.task != TaskState.DELETING.value,
                )
                .values(task=TaskState.DELETING.value, fault=None, updated_at=time.time())
            )
        return self.get(domain_id)

    def remove_deleted(self, domain_id: uuid.UUID, host: str) -> bool:
        """Remove the record of a domain being deleted from `host` (the host has it no more)."""
        with self.db.transaction() as cur:
            return delete_domain(
                cur,
                str(domain_id),
                where=(domains.c.task == TaskState.DELETING.value) & (domains.c.host == host),
            )

    def observe_info(self, info: DomainInfo) -> DomainRecord | None:
        """Project a compute node's answer (`DomainInfo`) like an event: only if it comes from
        the domain's host and its seq is above the stored one."""
        with self.db.transaction() as cur:
            cur.execute(
                domains.update()
                .where(
                    domains.c.id == str(info.domain_id),
                    domains.c.host == info.host,
                    domains.c.seq < info.seq,
                )
                .values(power=info.state.value, seq=info.seq, updated_at=time.time())
            )
        return self.get(info.domain_id)

    def remove(self, domain_id: uuid.UUID) -> bool:
        with self.db.transaction() as cur:
            return delete_domain(cur, str(domain_id))

    def was_removed(self, domain_id: uuid.UUID) -> bool:
        """Whether this domain had a record, removed (and not made again) since."""
        with self.db.transaction() as cur:
            return was_removed(cur, str(domain_id)) and (
                cur.execute(PROJECTION_ID, {"b_id": str(domain_id)}).first() is None
            )

    def forget_removed(self, older_than_s: float = REMOVED_KEEP_S) -> int:
        """Forget the ids of domains removed more than `older_than_s` ago (and the reaps
        of them still pending: a host that never answered in that long is gone)."""
        cutoff = time.time() - older_than_s
        with self.db.transaction() as cur:
            stmt = removed_domains.delete().where(removed_domains.c.removed_at < cutoff)
            forgotten = int(cur.execute(stmt).rowcount)
            cur.execute(
                pending_reaps.delete().where(
                    pending_reaps.c.domain_id.not_in(sa.select(removed_domains.c.id))
                )
            )
            return forgotten

    def reaped(self, domain_id: uuid.UUID, host: str) -> None:
        """The removed domain is off `host` (or it never had it): no reap is pending there."""
        with self.db.transaction() as cur:
            cur.execute(
                pending_reaps.delete().where(
                    pending_reaps.c.domain_id == str(domain_id), pending_reaps.c.host == host
                )
            )

    def due_reaps(self, older_than_s: float) -> list[tuple[uuid.UUID, str]]:
        """The reaps pending for `older_than_s` or more (their replica died, or their host
        did not answer), each marked tried now: (domain id, host) pairs to reap again.
        Another replica's sweep meanwhile finds them tried and leaves them."""
        now = time.time()
        cutoff = now - older_than_s
        with self.db.transaction() as cur:
            rows = cur.execute(
                sa.select(pending_reaps.c.domain_id, pending_reaps.c.host).where(
                    pending_reaps.c.since < cutoff
                )
            ).all()
            due = []
            for domain_id, host in rows:
                taken = cur.execute(
                    pending_reaps.update()
                    .where(
                        pending_reaps.c.domain_id == domain_id,
                        pending_reaps.c.host == host,
                        pending_reaps.c.since < cutoff,
                    )
                    .values(since=now)
                ).rowcount
                if taken:
                    due.append((uuid.UUID(domain_id), str(host)))
            return due
