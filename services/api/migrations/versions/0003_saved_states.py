"""saved_states: saves, managed saves and the snapshot tree; quotas.snapshot_bytes.

Revision ID: 0003
Revises: 0002
Created: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "saved_states",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("domain_id", sa.Text, nullable=False),
        sa.Column("project", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("name", sa.Text),
        sa.Column("parent", sa.Text),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("current", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pool", sa.Text),
        sa.Column("memory", sa.Integer, nullable=False),
        sa.Column("power", sa.Text, nullable=False),
        sa.Column("disks", sa.Text, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DOUBLE_PRECISION, nullable=False),
        sa.UniqueConstraint("domain_id", "name"),
    )
    op.create_index("saved_states_project", "saved_states", ["project"])
    with op.batch_alter_table("quotas") as batch:
        batch.add_column(sa.Column("snapshot_bytes", sa.BigInteger))


def downgrade() -> None:
    with op.batch_alter_table("quotas") as batch:
        batch.drop_column("snapshot_bytes")
    op.drop_index("saved_states_project", "saved_states")
    op.drop_table("saved_states")
