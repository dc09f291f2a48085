"""quotas.images, quotas.image_gib: a project's image limits (checked by the storage service)

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
    with op.batch_alter_table("quotas") as batch:
        batch.add_column(sa.Column("images", sa.Integer))
        batch.add_column(sa.Column("image_gib", sa.Integer))


def downgrade() -> None:
    with op.batch_alter_table("quotas") as batch:
        batch.drop_column("image_gib")
        batch.drop_column("images")
