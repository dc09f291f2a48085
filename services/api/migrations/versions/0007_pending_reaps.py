"""pending_reaps: a removed domain's reaps not done yet, run again by the orphan sweep

Revision ID: 0007
Revises: 0006
Created: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "pending_reaps",
        sa.Column("domain_id", sa.Text, primary_key=True),
        sa.Column("host", sa.Text, primary_key=True),
        sa.Column("since", sa.DOUBLE_PRECISION, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("pending_reaps")
