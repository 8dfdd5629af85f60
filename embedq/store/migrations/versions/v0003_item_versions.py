"""Items carry the version of the request that wrote them, and a digest of their metadata,
parent and chunk index: upserts never go backwards, and a metadata-only change is written.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from embedq.store.base import meta_hash
from embedq.store.migrations.helpers import columns

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BACKFILL_ROWS = 1000

ITEMS = sa.table(
    "embedq_items",
    sa.column("pk", sa.Integer),
    sa.column("metadata", sa.JSON),
    sa.column("parent_id", sa.String),
    sa.column("chunk_index", sa.Integer),
    sa.column("meta_hash", sa.String),
)


def upgrade() -> None:
    """Add both columns (old rows: version 0, so any new write replaces them), then digest
    the metadata of the rows there are, so re-ingesting them unchanged stays a no-op."""
    present = columns("embedq_items")
    with op.batch_alter_table("embedq_items") as batch:
        if "version" not in present:
            batch.add_column(
                sa.Column("version", sa.BigInteger, nullable=False, server_default="0")
            )
        if "meta_hash" not in present:
            batch.add_column(
                sa.Column("meta_hash", sa.String(64), nullable=False, server_default="")
            )
    _backfill()


def _backfill() -> None:
    """Digest stored metadata in pages of 1,000 rows, in key order."""
    bind, last = op.get_bind(), 0
    page = (
        sa.select(ITEMS.c.pk, ITEMS.c.metadata, ITEMS.c.parent_id, ITEMS.c.chunk_index)
        .where(ITEMS.c.meta_hash == "", ITEMS.c.pk > sa.bindparam("last"))
        .order_by(ITEMS.c.pk)
        .limit(BACKFILL_ROWS)
    )
    write = (
        sa.update(ITEMS)
        .where(ITEMS.c.pk == sa.bindparam("b_pk"))
        .values(meta_hash=sa.bindparam("b_hash"))
    )
    while rows := bind.execute(page, {"last": last}).all():
        bind.execute(write, [{"b_pk": r[0], "b_hash": meta_hash(r[1], r[2], r[3])} for r in rows])
        last = rows[-1][0]


def downgrade() -> None:
    """Drop both columns."""
    with op.batch_alter_table("embedq_items") as batch:
        batch.drop_column("meta_hash")
        batch.drop_column("version")
