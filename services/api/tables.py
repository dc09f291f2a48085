"""The registry's tables (SQLAlchemy Core) and its migration history (`REGISTRY`).

These are the head schema the registry's queries use; services/api/migrations/versions/
holds the revisions that build it. A change here needs a revision there (docs/database.md);
tests/unit/test_db_migrations.py fails while the two disagree.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from services.db import Component, Legacy

metadata = sa.MetaData()

domains = sa.Table(
    "domains",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("project", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("spec", sa.Text, nullable=False),  # DomainSpec JSON
    sa.Column("vcpus", sa.Integer, nullable=False),
    sa.Column("memory_mib", sa.Integer, nullable=False),
    sa.Column("host", sa.Text),
    sa.Column("power", sa.Text, nullable=False),
    sa.Column("task", sa.Text, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    sa.Column("fault", sa.Text),  # Fault JSON
    sa.Column("created_at", sa.DOUBLE_PRECISION, nullable=False),
    sa.Column("updated_at", sa.DOUBLE_PRECISION, nullable=False),
    sa.UniqueConstraint("name"),
)
sa.Index("domains_host", domains.c.host)

events = sa.Table(
    "events",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        sa.Identity(always=True),
        primary_key=True,
    ),
    sa.Column("message_id", sa.Text, nullable=False, unique=True),
    sa.Column("project", sa.Text),
    sa.Column("domain_id", sa.Text, nullable=False),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("routing_key", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("ts", sa.DOUBLE_PRECISION, nullable=False),
    sa.Column("body", sa.Text, nullable=False),  # the event's JSON
    sa.Column("correlation_id", sa.Text),
    sa.Column("causation_id", sa.Text),
    sqlite_autoincrement=True,  # ids never reused: SSE clients resume after an id
)
sa.Index("events_domain", events.c.domain_id, events.c.host, events.c.seq)
sa.Index("events_project", events.c.project, events.c.id)

# Domains whose record was removed (0006), kept `REMOVED_KEEP_S` (services.api.registry.
# domains): a definition or start of one that a host reports later (a create's retry that
# outlived its settled tombstone) is reaped there instead of running unknown.
removed_domains = sa.Table(
    "removed_domains",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("removed_at", sa.DOUBLE_PRECISION, nullable=False),
)
sa.Index("removed_domains_at", removed_domains.c.removed_at)

# A removed domain's reaps not done yet (0007): the host a definition or start of it came
# from, written with the event's projection, so a reap that its replica did not live to run,
# or that its host did not answer, is run again by the orphan sweep (services.api.orphans)
# until the host no longer has the domain.
pending_reaps = sa.Table(
    "pending_reaps",
    metadata,
    sa.Column("domain_id", sa.Text, primary_key=True),
    sa.Column("host", sa.Text, primary_key=True),
    sa.Column("since", sa.DOUBLE_PRECISION, nullable=False),  # asked (or last tried) at
)

hosts = sa.Table(
    "hosts",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("enabled", sa.Integer, nullable=False),  # 0 or 1
    sa.Column("kvm", sa.Text, nullable=False),
    sa.Column("version", sa.Text, nullable=False),
    sa.Column("interval_s", sa.DOUBLE_PRECISION, nullable=False),
    sa.Column("last_seen", sa.DOUBLE_PRECISION, nullable=False),
    sa.Column("inventory", sa.Text, nullable=False),  # HostInventory JSON
    sa.Column("usage", sa.Text, nullable=False),  # Resources JSON
    sa.Column("domains_by_state", sa.Text, nullable=False),  # {state: count} JSON
    # The SetHostEnabled generation `enabled` comes from (0005): a heartbeat of an older one
    # does not change `enabled`.
    sa.Column("enabled_generation", sa.BigInteger, nullable=False, server_default=sa.text("0")),
)

tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("token_sha256", sa.Text, nullable=False, unique=True),
    sa.Column("project", sa.Text, nullable=False),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("created_at", sa.DOUBLE_PRECISION, nullable=False),
)

quotas = sa.Table(
    "quotas",
    metadata,
    sa.Column("project", sa.Text, primary_key=True),
    sa.Column("domains", sa.Integer),
    sa.Column("vcpus", sa.Integer),
    sa.Column("memory_mib", sa.Integer),
    sa.Column("snapshot_bytes", sa.BigInteger),  # saves and snapshots, allocated bytes
    sa.Column("images", sa.Integer),  # image names (checked by the storage service)
    sa.Column("image_gib", sa.Integer),
)

# Saves, managed saves and domain snapshots (docs/snapshots.md). Snapshots of a domain form
# a tree through `parent` (a state id); `current` marks the one the domain last came from.
saved_states = sa.Table(
    "saved_states",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),  # the StateRef's state_id
    sa.Column("domain_id", sa.Text, nullable=False),
    sa.Column("project", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),  # save | managed | snapshot
    sa.Column("name", sa.Text),  # a snapshot's name, unique per domain
    sa.Column("parent", sa.Text),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("current", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pool", sa.Text),
    sa.Column("memory", sa.Integer, nullable=False),
    sa.Column("power", sa.Text, nullable=False),
    sa.Column("disks", sa.Text, nullable=False),  # JSON list of targets
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.DOUBLE_PRECISION, nullable=False),
    sa.UniqueConstraint("domain_id", "name"),
)
sa.Index("saved_states_project", saved_states.c.project)

# Keys the API derives things from (the host alias key), made once, shared by replicas.
secrets_table = sa.Table(
    "secrets",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# Any constant will do: it names the lock that orders event-log appends on PostgreSQL.
EVENT_LOG_LOCK = 0x466C6F74

REGISTRY = Component(
    name="registry",
    metadata=metadata,
    script_location=Path(__file__).with_name("migrations"),
    # The key the releases before Alembic took around their `migrate()`, so one of them
    # starting beside a newer replica waits for it.
    lock_key=EVENT_LOG_LOCK + 1,
    legacy=Legacy(
        revision="0001",
        # Frozen history: what those releases made, whatever later revisions add.
        tables={
            "domains": frozenset(
                {"id", "project", "name", "spec", "vcpus", "memory_mib", "host", "power"}
                | {"task", "seq", "fault", "created_at", "updated_at"}
            ),
            "events": frozenset(
                {"id", "message_id", "project", "domain_id", "host", "seq", "type"}
                | {"routing_key", "state", "ts", "body", "correlation_id", "causation_id"}
            ),
            "hosts": frozenset(
                {"name", "enabled", "kvm", "version", "interval_s", "last_seen", "inventory"}
                | {"usage", "domains_by_state"}
            ),
            "tokens": frozenset(
                {"id", "token_sha256", "project", "role", "description", "created_at"}
            ),
            "quotas": frozenset({"project", "domains", "vcpus", "memory_mib"}),
        },
    ),
)
