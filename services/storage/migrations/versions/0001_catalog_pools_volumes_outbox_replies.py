"""catalog: pools, volumes, outbox, replies

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
        "storage_outbox",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.Identity(always=True),
            nullable=False,
        ),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("routing_key", sa.Text(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "storage_pools",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("capacity", sa.BigInteger(), nullable=False),
        sa.Column("allocation", sa.BigInteger(), nullable=False),
        sa.Column("available", sa.BigInteger(), nullable=False),
        sa.Column("reflink", sa.Boolean(), nullable=False),
        sa.Column("punch_hole", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.DOUBLE_PRECISION(), nullable=False),
        sa.PrimaryKeyConstraint("name", "host"),
    )
    op.create_table(
        "storage_replies",
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("reply", sa.LargeBinary(), nullable=False),
        sa.Column("ts", sa.DOUBLE_PRECISION(), nullable=False),
        sa.PrimaryKeyConstraint("message_id"),
    )
    with op.batch_alter_table("storage_replies", schema=None) as batch_op:
        batch_op.create_index("storage_replies_ts", ["ts"], unique=False)

    op.create_table(
        "storage_volumes",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("project", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("pool", sa.Text(), nullable=False),
        sa.Column("host", sa.Text(), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("domain_id", sa.Text(), nullable=True),
        sa.Column("target", sa.Text(), nullable=True),
        sa.Column("readonly", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("source_id", sa.Text(), nullable=True),
        sa.Column("image", sa.Text(), nullable=True),
        sa.Column("fault", sa.Text(), nullable=True),
        sa.Column("seq", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column(
            "lease_until", sa.DOUBLE_PRECISION(), server_default=sa.text("0"), nullable=False
        ),
        sa.Column("created_at", sa.DOUBLE_PRECISION(), nullable=False),
        sa.Column("updated_at", sa.DOUBLE_PRECISION(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("project", "name", name="storage_volumes_project_name"),
    )
    with op.batch_alter_table("storage_volumes", schema=None) as batch_op:
        batch_op.create_index("storage_volumes_pool", ["pool"], unique=False)
        batch_op.create_index("storage_volumes_state", ["state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("storage_volumes", schema=None) as batch_op:
        batch_op.drop_index("storage_volumes_state")
        batch_op.drop_index("storage_volumes_pool")

    op.drop_table("storage_volumes")
    with op.batch_alter_table("storage_replies", schema=None) as batch_op:
        batch_op.drop_index("storage_replies_ts")

    op.drop_table("storage_replies")
    op.drop_table("storage_pools")
    op.drop_table("storage_outbox")
