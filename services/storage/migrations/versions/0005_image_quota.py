"""catalog: an import remembers the project's image_gib limit it began under

Revision ID: 0005
Revises: 0004
Created: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("storage_images", sa.Column("quota_gib", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("storage_images") as batch:
        batch.drop_column("quota_gib")
