"""The registry as the releases before Alembic created it: domains, events, hosts, tokens,
quotas (with events.correlation_id and causation_id, which those releases added later); the
secrets table that the last of them added is 0002.

Revision ID: 0001
Revises:
Created: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "domains",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("project", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("vcpus", sa.Integer, nullable=False),
        sa.Column("memory_mib", sa.Integer, nullable=False),
        sa.Column("host", sa.Text),
        sa.Column("power", sa.Text, nullable=False),
        sa.Column("task", sa.Text, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("fault", sa.Text),
        sa.Column("created_at", sa.DOUBLE_PRECISION, nullable=False),
        sa.Column("updated_at", sa.DOUBLE_PRECISION, nullable=False),
        sa.UniqueConstraint("name"),
    )
    op.create_index("domains_host", "domains", ["host"])
    op.create_table(
        "events",
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
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("correlation_id", sa.Text),
        sa.Column("causation_id", sa.Text),
        sqlite_autoincrement=True,
    )
    op.create_index("events_domain", "events", ["domain_id", "host", "seq"])
    op.create_index("events_project", "events", ["project", "id"])
    op.create_table(
        "hosts",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("enabled", sa.Integer, nullable=False),
        sa.Column("kvm", sa.Text, nullable=False),
        sa.Column("version", sa.Text, nullable=False),
        sa.Column("interval_s", sa.DOUBLE_PRECISION, nullable=False),
        sa.Column("last_seen", sa.DOUBLE_PRECISION, nullable=False),
        sa.Column("inventory", sa.Text, nullable=False),
        sa.Column("usage", sa.Text, nullable=False),
        sa.Column("domains_by_state", sa.Text, nullable=False),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("token_sha256", sa.Text, nullable=False, unique=True),
        sa.Column("project", sa.Text, nullable=False),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("created_at", sa.DOUBLE_PRECISION, nullable=False),
    )
    op.create_table(
        "quotas",
        sa.Column("project", sa.Text, primary_key=True),
        sa.Column("domains", sa.Integer),
        sa.Column("vcpus", sa.Integer),
        sa.Column("memory_mib", sa.Integer),
    )


def downgrade() -> None:
    for table in ("quotas", "tokens", "hosts", "events", "domains"):
        op.drop_table(table)
