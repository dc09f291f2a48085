"""IPAM: which address of a network's subnet a port gets. The `addresses` table is the truth.

A row per address handed out (`port_id` set) or released and quarantined (`port_id` None,
`released_at` set). An address is never handed out again within `quarantine_s` of its
release, so a guest's stale ARP entry cannot point traffic at the next holder; after that it
may be, but never-used addresses go first (the lowest), then the longest-released ones.

Safe under replicas on one database without read-then-write races: a new address is taken by
`INSERT … ON CONFLICT DO NOTHING` on the (network, address) key and a quarantined one by a
conditional `UPDATE`; a replica that lost the race sees no row changed and tries the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.bus import ServiceError
from services.db import upsert
from services.network.tables import addresses

# Lost races in one allocation before giving up (each loss means another replica took an
# address meanwhile, so this bounds only pathological contention).
_MAX_RACES = 64


@dataclass(frozen=True, slots=True)
class Pool:
    """A network's assignable range: its subnet less network, broadcast and gateway."""

    network_id: str
    subnet: IPv4Network
    gateway: IPv4Address

    def check(self, address: IPv4Address, field: str) -> None:
        """Raise `invalid` (with `field`) for an address no port of this network may have."""
        if address not in self.subnet:
            raise ServiceError(
                "invalid", f"{address} is outside the subnet {self.subnet}", {"field": field}
            )
        if address in (self.subnet.network_address, self.subnet.broadcast_address):
            raise ServiceError(
                "invalid",
                f"{address} is the subnet's network or broadcast address",
                {"field": field},
            )
        if address == self.gateway:
            raise ServiceError("invalid", f"{address} is the gateway's", {"field": field})

    def first_free(self, taken: set[IPv4Address]) -> IPv4Address | None:
        """The lowest assignable address not in `taken`."""
        first = int(self.subnet.network_address) + 1
        last = int(self.subnet.broadcast_address) - 1
        for value in range(first, last + 1):
            candidate = IPv4Address(value)
            if candidate != self.gateway and candidate not in taken:
                return candidate
        return None


def allocate(
    conn: Connection,
    pool: Pool,
    port_id: str,
    *,
    now: float,
    quarantine_s: float,
    wanted: IPv4Address | None = None,
    field: str = "ip",
) -> IPv4Address:
    """An address of `pool` for `port_id`: `wanted` if it is free, else one chosen.

    Raises ServiceError `invalid` (not assignable in this subnet), `conflict` (`wanted` is
    held by a port or quarantined; details `reason` ip_in_use or ip_quarantined, `field`) or
    `no_capacity` (nothing free and nothing out of quarantine)."""
    cutoff = now - quarantine_s
    if wanted is not None:
        pool.check(wanted, field)
        if _take_new(conn, pool, wanted, port_id) or _take_released(
            conn, pool, wanted, port_id, cutoff
        ):
            return wanted
        released_at = conn.execute(
            sa.select(addresses.c.released_at).where(
                addresses.c.network_id == pool.network_id, addresses.c.address == str(wanted)
            )
        ).scalar()
        if released_at is None:
            raise ServiceError(
                "conflict",
                f"{wanted} is in use on this network",
                {"field": field, "reason": "ip_in_use"},
            )
        raise ServiceError(
            "conflict",
            f"{wanted} was released {now - released_at:.0f} s ago and is quarantined for "
            f"{quarantine_s:.0f} s",
            {"field": field, "reason": "ip_quarantined"},
        )
    for _ in range(_MAX_RACES):
        taken = {
            IPv4Address(a)
            for a in conn.execute(
                sa.select(addresses.c.address).where(addresses.c.network_id == pool.network_id)
            ).scalars()
        }
        fresh = pool.first_free(taken)
        if fresh is not None:
            if _take_new(conn, pool, fresh, port_id):
                return fresh
            continue
        oldest = conn.execute(
            sa.select(addresses.c.address)
            .where(
                addresses.c.network_id == pool.network_id,
                addresses.c.port_id.is_(None),
                addresses.c.released_at <= cutoff,
            )
            .order_by(addresses.c.released_at, addresses.c.address)
            .limit(1)
        ).scalar()
        if oldest is None:
            raise ServiceError(
                "no_capacity",
                f"no free address in {pool.subnet}: {len(taken)} held by ports or in quarantine",
                {"field": field, "reason": "subnet_exhausted"},
            )
        if _take_released(conn, pool, IPv4Address(oldest), port_id, cutoff):
            return IPv4Address(oldest)
    raise ServiceError("unavailable", "address allocation kept losing races; retry")


def release(conn: Connection, port_id: str, *, now: float) -> None:
    """Put the port's address (if any) into quarantine from `now`."""
    conn.execute(
        sa.update(addresses)
        .where(addresses.c.port_id == port_id)
        .values(port_id=None, released_at=now)
    )


def forget_network(conn: Connection, network_id: str) -> None:
    """Drop a deleted network's address rows (quarantine ends with the subnet)."""
    conn.execute(sa.delete(addresses).where(addresses.c.network_id == network_id))


def _take_new(conn: Connection, pool: Pool, address: IPv4Address, port_id: str) -> bool:
    insert = (
        upsert(conn, addresses)
        .values(network_id=pool.network_id, address=str(address), port_id=port_id)
        .on_conflict_do_nothing(index_elements=[addresses.c.network_id, addresses.c.address])
        .returning(addresses.c.address)
    )
    # RETURNING, not rowcount: psycopg reports -1 for an INSERT … ON CONFLICT here.
    return conn.execute(insert).first() is not None


def _take_released(
    conn: Connection, pool: Pool, address: IPv4Address, port_id: str, cutoff: float
) -> bool:
    update = (
        sa.update(addresses)
        .where(
            addresses.c.network_id == pool.network_id,
            addresses.c.address == str(address),
            addresses.c.port_id.is_(None),
            addresses.c.released_at <= cutoff,
        )
        .values(port_id=port_id, released_at=None)
        .returning(addresses.c.address)
    )
    return conn.execute(update).first() is not None
