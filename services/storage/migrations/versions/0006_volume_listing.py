"""catalog: each volume keeps its listing JSON beside its row

Revision ID: 0006
Revises: 0005
Created: 2026-12-01

Rows from before stay without it (NULL) until the storage service fills them at start
(services.storage.listing.fill_listings); a page holding one is built from the columns.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("storage_volumes", sa.Column("listing", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("storage_volumes") as batch:
        batch.drop_column("listing")
