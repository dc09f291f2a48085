"""The network service's catalog (SQLAlchemy Core) and its migration history (`CATALOG`).

The head schema the catalog's queries use; services/network/migrations/versions/ holds the
revisions that build it (docs/database.md). Uniqueness the service relies on under
concurrent replicas is in constraints, not in read-then-write code: a network name per
project, a VNI, an address per network, a MAC per network, a NIC index per domain.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from services.db import Component

metadata = sa.MetaData()

_AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

networks = sa.Table(
    "networks",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("project", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("mode", sa.Text, nullable=False),  # nat, isolated, bridge
    sa.Column("subnet", sa.Text),  # e.g. 10.0.0.0/24; None in bridge mode
    sa.Column("gateway", sa.Text),
    sa.Column("mtu", sa.Integer, nullable=False),
    sa.Column("vni", sa.Integer, unique=True),
    sa.Column("dhcp", sa.Boolean, nullable=False),
    sa.Column("host_bridge", sa.Text),
    sa.Column("shared", sa.Boolean, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),  # the last network event's
    sa.Column("created_at", sa.DOUBLE_PRECISION, nullable=False),
    sa.UniqueConstraint("project", "name"),
)

# Every address handed out, and every one released and still in quarantine: the source of
# truth for IPAM. `port_id` is None once released (state `quarantined`, since `released_at`).
addresses = sa.Table(
    "addresses",
    metadata,
    sa.Column("network_id", sa.Text, sa.ForeignKey("networks.id"), primary_key=True),
    sa.Column("address", sa.Text, primary_key=True),
    sa.Column("port_id", sa.Text, unique=True),
    sa.Column("released_at", sa.DOUBLE_PRECISION),
)

ports = sa.Table(
    "ports",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("project", sa.Text, nullable=False),
    sa.Column("network_id", sa.Text, sa.ForeignKey("networks.id"), nullable=False),
    sa.Column("domain_id", sa.Text),
    sa.Column("nic", sa.Integer, nullable=False),
    sa.Column("mac", sa.Text, nullable=False),
    sa.Column("ipv4", sa.Text),
    sa.Column("host", sa.Text),
    sa.Column("vtep", sa.Text),
    sa.Column("state", sa.Text, nullable=False),  # created, bound
    sa.Column("seq", sa.BigInteger, nullable=False),  # the last port event's
    sa.Column("created_at", sa.DOUBLE_PRECISION, nullable=False),
    sa.UniqueConstraint("network_id", "mac"),
    sa.UniqueConstraint("domain_id", "nic"),
)
sa.Index("ports_project", ports.c.project)

# Events written in the transaction that made them, published in `id` order, then deleted:
# at once by the replica that wrote them (`source`), by any replica once they are older than
# a few seconds (their writer died).
outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", _AUTO_ID, sa.Identity(always=True), primary_key=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("created_at", sa.DOUBLE_PRECISION, nullable=False),
    sa.Column("routing_key", sa.Text, nullable=False),
    sa.Column("envelope", sa.LargeBinary, nullable=False),  # the packed envelope
    sqlite_autoincrement=True,
)

# The reply each command got, by its message id: a redelivered command (to any replica) is
# answered from here (services.bus's idempotency store protocol).
replies = sa.Table(
    "replies",
    metadata,
    sa.Column("message_id", sa.Text, primary_key=True),
    sa.Column("reply", sa.LargeBinary, nullable=False),
    sa.Column("ts", sa.DOUBLE_PRECISION, nullable=False),
)
sa.Index("replies_ts", replies.c.ts)

# Advisory lock keys (PostgreSQL); any constants will do.
MIGRATION_LOCK = 0x466C6E01
SUBNETS_LOCK = 0x466C6E02  # subnet overlap checks and VNI choice

CATALOG = Component(
    name="network",
    metadata=metadata,
    script_location=Path(__file__).with_name("migrations"),
    lock_key=MIGRATION_LOCK,
)
