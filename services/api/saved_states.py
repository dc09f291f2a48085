"""The registry's saves, managed saves and domain snapshot trees (docs/snapshots.md).

Rows name states by the StateRef the compute node was given (state id, host, pool); the
files are the node's. A domain's snapshots form a tree through `parent`; `current` is the
snapshot the domain was last taken from or reverted to, and the parent of the next one.
Deleting a snapshot re-parents its children to its parent: snapshots are self-contained, so
no other snapshot loses anything. Quotas count the allocated bytes of every row of a project.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from protos.bindings import StateRef
from protos.domain import PowerState
from protos.replies import SavedState
from services.api.tables import saved_states as t
from services.db import Database, advisory_xact_lock

Kind = Literal["save", "managed", "snapshot"]
QUOTA_RESOURCE = "snapshot_bytes"


class StateQuotaExceeded(Exception):
    def __init__(self, limit: int, used: int, requested: int) -> None:
        super().__init__(
            f"quota for {QUOTA_RESOURCE} exceeded: {used} used + {requested} > {limit}"
        )
        self.resource = QUOTA_RESOURCE
        self.limit = limit
        self.used = used
        self.requested = requested


class SnapshotNameInUse(Exception):
    pass


@dataclass(frozen=True, slots=True)
class StateRecord:
    id: uuid.UUID
    domain_id: uuid.UUID
    project: str
    kind: Kind
    name: str | None
    parent: uuid.UUID | None
    description: str
    current: bool
    host: str
    pool: str | None
    memory: bool
    power: PowerState
    disks: list[str]
    bytes: int
    created_at: float

    @property
    def ref(self) -> StateRef:
        return StateRef(state_id=self.id, pool=self.pool, host=self.host)


def _row(r: Any) -> StateRecord:
    return StateRecord(
        id=uuid.UUID(r.id),
        domain_id=uuid.UUID(r.domain_id),
        project=r.project,
        kind=r.kind,
        name=r.name,
        parent=None if r.parent is None else uuid.UUID(r.parent),
        description=r.description,
        current=bool(r.current),
        host=r.host,
        pool=r.pool,
        memory=bool(r.memory),
        power=PowerState(r.power),
        disks=list(json.loads(r.disks)),
        bytes=int(r.bytes),
        created_at=float(r.created_at),
    )


class SavedStates:
    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    def _used(cur: Connection, project: str) -> int:
        return int(
            cur.execute(
                sa.select(sa.func.coalesce(sa.func.sum(t.c.bytes), 0)).where(t.c.project == project)
            ).scalar_one()
        )

    def usage(self, project: str) -> int:
        with self.db.transaction() as cur:
            return self._used(cur, project)

    def check_room(self, project: str, limit: int | None) -> None:
        """Before taking a state: StateQuotaExceeded if the project has no room left."""
        if limit is None:
            return
        used = self.usage(project)
        if used >= limit:
            raise StateQuotaExceeded(limit, used, 0)

    def add(
        self,
        saved: SavedState,
        *,
        project: str,
        kind: Kind,
        limit: int | None,
        name: str | None = None,
        description: str = "",
    ) -> StateRecord:
        """Record what a node took. A snapshot's parent is the domain's current snapshot and
        it becomes the current one. Raises StateQuotaExceeded (nothing stored) when its bytes
        do not fit the project's limit, SnapshotNameInUse for a taken name."""
        domain_id = str(saved.domain_id)
        with self.db.transaction() as cur:
            advisory_xact_lock(cur, f"states/{project}")
            if limit is not None:
                used = self._used(cur, project)
                if used + saved.bytes > limit:
                    raise StateQuotaExceeded(limit, used, saved.bytes)
            parent = None
            if kind == "snapshot":
                if self._by_name(cur, saved.domain_id, name or "") is not None:
                    raise SnapshotNameInUse(f"the domain has a snapshot named {name!r}")
                parent = cur.execute(
                    sa.select(t.c.id).where(t.c.domain_id == domain_id, t.c.current == 1)
                ).scalar()
                cur.execute(t.update().where(t.c.domain_id == domain_id).values(current=0))
            cur.execute(
                t.insert().values(
                    id=str(saved.state.state_id),
                    domain_id=domain_id,
                    project=project,
                    kind=kind,
                    name=name,
                    parent=parent,
                    description=description,
                    current=int(kind == "snapshot"),
                    host=saved.state.host or saved.domain.host,
                    pool=saved.state.pool,
                    memory=int(saved.memory),
                    power=saved.power.value,
                    disks=json.dumps(saved.disks),
                    bytes=saved.bytes,
                    created_at=saved.taken_at or time.time(),
                )
            )
        record = self.get(saved.state.state_id)
        assert record is not None
        return record

    def get(self, state_id: uuid.UUID) -> StateRecord | None:
        with self.db.transaction() as cur:
            row = cur.execute(sa.select(t).where(t.c.id == str(state_id))).first()
        return None if row is None else _row(row)

    @staticmethod
    def _by_name(cur: Connection, domain_id: uuid.UUID, name: str) -> StateRecord | None:
        row = cur.execute(
            sa.select(t).where(
                t.c.domain_id == str(domain_id), t.c.kind == "snapshot", t.c.name == name
            )
        ).first()
        return None if row is None else _row(row)

    def snapshot(self, domain_id: uuid.UUID, name: str) -> StateRecord | None:
        with self.db.transaction() as cur:
            return self._by_name(cur, domain_id, name)

    def of_domain(self, domain_id: uuid.UUID, kind: Kind | None = None) -> list[StateRecord]:
        """The domain's states (of `kind`), oldest first."""
        query = sa.select(t).where(t.c.domain_id == str(domain_id))
        if kind is not None:
            query = query.where(t.c.kind == kind)
        with self.db.transaction() as cur:
            rows = cur.execute(query.order_by(t.c.created_at, t.c.id)).all()
        return [_row(r) for r in rows]

    def set_current(self, domain_id: uuid.UUID, state_id: uuid.UUID) -> None:
        with self.db.transaction() as cur:
            cur.execute(
                t.update()
                .where(t.c.domain_id == str(domain_id))
                .values(current=sa.case((t.c.id == str(state_id), 1), else_=0))
            )

    def remove(self, state_id: uuid.UUID) -> StateRecord | None:
        """Forget a state. A snapshot's children are re-parented to its parent, which also
        becomes current if it was. Returns what was removed (None: nothing was there)."""
        with self.db.transaction() as cur:
            row = cur.execute(sa.select(t).where(t.c.id == str(state_id))).first()
            if row is None:
                return None
            record = _row(row)
            parent = None if record.parent is None else str(record.parent)
            cur.execute(t.update().where(t.c.parent == str(state_id)).values(parent=parent))
            if record.current and parent is not None:
                cur.execute(t.update().where(t.c.id == parent).values(current=1))
            cur.execute(t.delete().where(t.c.id == str(state_id)))
        return record
