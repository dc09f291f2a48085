"""removed_domains: ids of domains whose record was removed, so a late arrival is reaped

Revision ID: 0006
Revises: 0005
Created: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "removed_domains",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("removed_at", sa.DOUBLE_PRECISION, nullable=False),
    )
    op.create_index("removed_domains_at", "removed_domains", ["removed_at"])


def downgrade() -> None:
    op.drop_index("removed_domains_at", "removed_domains")
    op.drop_table("removed_domains")
