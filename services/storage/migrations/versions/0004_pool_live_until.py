"""catalog: a host's pools are placeable only while its heartbeats arrive

Revision ID: 0004
Revises: 0003
Created: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column(
        "storage_pools",
        sa.Column("live_until", sa.DOUBLE_PRECISION(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_column("storage_pools", "live_until")
