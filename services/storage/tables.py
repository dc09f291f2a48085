"""The storage catalog's tables (SQLAlchemy Core) and its migration history (`CATALOG`).

The head schema the catalog's queries use; migrations/versions/ holds the revisions that
build it (docs/database.md). tests/unit/test_db_migrations.py fails while they disagree.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from services.db import Component

metadata = sa.MetaData()

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

pools = sa.Table(
    "storage_pools",
    metadata,
    # A pool is its name on its host: every host may have a `default` pool.
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("host", sa.Text, primary_key=True),  # "" for a shared pool served by the service
    sa.Column("kind", sa.Text, nullable=False),  # dir | shared
    sa.Column("capacity", sa.BigInteger, nullable=False),
    sa.Column("allocation", sa.BigInteger, nullable=False),
    sa.Column("available", sa.BigInteger, nullable=False),
    sa.Column("reflink", sa.Boolean, nullable=False),
    sa.Column("punch_hole", sa.Boolean, nullable=False),
    sa.Column("updated_at", sa.DOUBLE_PRECISION, nullable=False),
    # A host's pool takes new volumes and images only until then (its agent's answers and its
    # heartbeats push it on); a shared pool's is ignored.
    sa.Column("live_until", sa.DOUBLE_PRECISION, nullable=False, server_default="0"),
)

volumes = sa.Table(
    "storage_volumes",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("project", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("pool", sa.Text, nullable=False),
    sa.Column("host", sa.Text),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("domain_id", sa.Text),
    sa.Column("target", sa.Text),
    sa.Column("readonly", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("source_id", sa.Text),
    sa.Column("image", sa.Text),
    sa.Column("fault", sa.Text),
    sa.Column("seq", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    # The replica working on the volume's operation, and until when (renewed while it works):
    # reconcile leaves a volume alone while its lease holds.
    sa.Column("lease_owner", sa.Text),
    sa.Column("lease_until", sa.DOUBLE_PRECISION, nullable=False, server_default=sa.text("0")),
    sa.Column("created_at", sa.DOUBLE_PRECISION, nullable=False),
    sa.Column("updated_at", sa.DOUBLE_PRECISION, nullable=False),
    # An upload's ticket on the pool's host, while the volume is `creating` from it.
    sa.Column("ticket", sa.Text),
    # The volume as the API's listing shows it, its JSON (services/storage/listing.py,
    # refresh_listing): written with every change of what it shows, sent as it is.
    sa.Column("listing", sa.Text),
    sa.UniqueConstraint("project", "name", name="storage_volumes_project_name"),
)
sa.Index("storage_volumes_state", volumes.c.state)
sa.Index("storage_volumes_pool", volumes.c.pool)

images = sa.Table(
    "storage_images",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("project", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),  # disk | kernel | initrd
    sa.Column("visibility", sa.Text, nullable=False),  # private | public
    sa.Column("pool", sa.Text, nullable=False),
    sa.Column("host", sa.Text),
    sa.Column("state", sa.Text, nullable=False),  # importing | available
    sa.Column("sha256", sa.Text),
    sa.Column("size", sa.BigInteger),
    sa.Column("source_format", sa.Text),
    # The import's ticket on the pool's host: the service asks the host for its outcome.
    sa.Column("ticket", sa.Text),
    sa.Column("lease_owner", sa.Text),
    sa.Column("lease_until", sa.DOUBLE_PRECISION, nullable=False, server_default=sa.text("0")),
    sa.Column("created_at", sa.DOUBLE_PRECISION, nullable=False),
    # The project's `image_gib` limit the import began under (None: unlimited): checked
    # with the real size when it ends, by whichever replica records it.
    sa.Column("quota_gib", sa.Integer),
    sa.UniqueConstraint("project", "name", name="storage_images_project_name"),
)
sa.Index("storage_images_sha256", images.c.sha256)

outbox = sa.Table(
    "storage_outbox",
    metadata,
    sa.Column("id", _ID, sa.Identity(always=True), primary_key=True),
    sa.Column("message_id", sa.Text, nullable=False),
    sa.Column("routing_key", sa.Text, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sqlite_autoincrement=True,
)

replies = sa.Table(
    "storage_replies",
    metadata,
    sa.Column("message_id", sa.Text, primary_key=True),
    sa.Column("reply", sa.LargeBinary, nullable=False),
    sa.Column("ts", sa.DOUBLE_PRECISION, nullable=False),
)
sa.Index("storage_replies_ts", replies.c.ts)

CATALOG = Component(
    name="storage",
    metadata=metadata,
    script_location=Path(__file__).with_name("migrations"),
    lock_key=0x53544F52,  # "STOR"
)
