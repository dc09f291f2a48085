"""The registry's hosts: each compute node's newest heartbeat (inventory, usage, domains by
power state, KVM kind, version) and whether it is enabled, as the switch with the newest
generation says (`SetHostEnabled`: the API writes down what the host took, and a beat sent
before the host took a switch cannot undo it)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from protos.host import HostHeartbeat, HostInventory, Resources
from services.api.tables import hosts
from services.db import Database, upsert


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


class Hosts:
    """The host table, one row per host that has sent a heartbeat."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, beat: HostHeartbeat, seen_at: float | None = None) -> None:
        """Store the host's latest heartbeat (an older one never replaces a newer one)."""
        self.record_many([(beat, time.time() if seen_at is None else seen_at)])

    def record_many(self, beats: Sequence[tuple[HostHeartbeat, float]]) -> None:
        """Store each (heartbeat, seen at) as `record` does, all in one statement
        and transaction (services.api.heartbeats coalesces a replica's beats into such
        writes); of several beats of one host, the newest."""
        newest: dict[str, tuple[HostHeartbeat, float]] = {}
        for beat, seen in beats:
            held = newest.get(beat.host)
            if held is None or held[1] <= seen:
                newest[beat.host] = (beat, seen)
        if not newest:
            return
        rows = [
            {
                "name": beat.host,
                "enabled": 1 if beat.enabled else 0,
                "enabled_generation": beat.enabled_generation,
                "kvm": beat.inventory.kvm.value,
                "version": beat.version,
                "interval_s": beat.interval_s,
                "last_seen": seen,
                "inventory": beat.inventory.model_dump_json(),
                "usage": beat.usage.model_dump_json(),
                "domains_by_state": json.dumps(
                    {k.value: v for k, v in beat.domains_by_state.items()}
                ),
            }
            for beat, seen in newest.values()
        ]
        with self.db.transaction() as cur:
            insert = upsert(cur, hosts)
            # A beat sent before the host took the last switch the API wrote down (an older
            # generation) still says how loaded the host is, not whether it is enabled.
            newer = insert.excluded.enabled_generation >= hosts.c.enabled_generation
            switched = {
                hosts.c.enabled.name: sa.case(
                    (newer, insert.excluded.enabled), else_=hosts.c.enabled
                ),
                hosts.c.enabled_generation.name: sa.case(
                    (newer, insert.excluded.enabled_generation),
                    else_=hosts.c.enabled_generation,
                ),
            }
            cur.execute(
                insert.on_conflict_do_update(
                    index_elements=[hosts.c.name],
                    set_={
                        column.name: switched.get(column.name, insert.excluded[column.name])
                        for column in hosts.c
                        if column is not hosts.c.name
                    },
                    where=hosts.c.last_seen <= insert.excluded.last_seen,
                ),
                rows,
            )

    def next_generation(self, name: str) -> int:
        """A SetHostEnabled generation newer than any `name` took: the microseconds since the
        epoch, so switches from several API replicas order by when they were asked, and one
        past the stored one should a clock lag."""
        with self.db.transaction() as cur:
            stored = cur.execute(
                sa.select(hosts.c.enabled_generation).where(hosts.c.name == name)
            ).scalar()
        return max(int(stored or 0) + 1, time.time_ns() // 1000)

    def set_enabled(self, name: str, enabled: bool, generation: int) -> None:
        """Write down the switch the host took with `generation`, unless a newer one was."""
        with self.db.transaction() as cur:
            cur.execute(
                hosts.update()
                .where(hosts.c.name == name, hosts.c.enabled_generation <= generation)
                .values(enabled=1 if enabled else 0, enabled_generation=generation)
            )

    def names(self) -> list[str]:
        """The names of every host that has sent a heartbeat."""
        with self.db.transaction() as cur:
            return [str(name) for name in cur.execute(sa.select(hosts.c.name)).scalars()]

    def records(self, name: str | None = None) -> list[HostRecord]:
        query = sa.select(
            hosts.c.name,
            hosts.c.enabled,
            hosts.c.kvm,
            hosts.c.version,
            hosts.c.interval_s,
            hosts.c.last_seen,
            hosts.c.inventory,
            hosts.c.usage,
            hosts.c.domains_by_state,
        )
        if name is not None:
            query = query.where(hosts.c.name == name)
        with self.db.transaction() as cur:
            rows = cur.execute(query.order_by(hosts.c.name)).all()
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
