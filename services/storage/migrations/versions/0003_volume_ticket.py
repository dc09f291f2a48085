"""catalog: volumes keep the ticket of their upload

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
    op.add_column("storage_volumes", sa.Column("ticket", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("storage_volumes", "ticket")
