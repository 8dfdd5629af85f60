"""Each collection is bound to one model, the one whose vectors first filled it: writes of
another model's vectors into it are refused (vectors of two models cannot be compared).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from embedq.encode.models import base_model_id
from embedq.store.migrations.helpers import tables

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

ITEMS = sa.table(
    "embedq_items",
    sa.column("collection", sa.String),
    sa.column("model", sa.String),
    sa.column("dim", sa.Integer),
)


def upgrade() -> None:
    """Create the table, then bind each stored collection to the model most of it holds."""
    if "embedq_collections" not in tables():
        op.create_table(
            "embedq_collections",
            sa.Column("name", sa.String(128), primary_key=True),
            sa.Column("model", sa.String(256), nullable=False),
            sa.Column("dim", sa.Integer, nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        )
    _backfill()


def _backfill() -> None:
    """One grouped query (a row per collection and model), then one insert."""
    bind = op.get_bind()
    counts: dict[str, Counter[tuple[str, int]]] = {}
    query = sa.select(ITEMS.c.collection, ITEMS.c.model, ITEMS.c.dim, sa.func.count()).group_by(
        ITEMS.c.collection, ITEMS.c.model, ITEMS.c.dim
    )
    for collection, model, dim, n in bind.execute(query):
        counts.setdefault(collection, Counter())[(base_model_id(model), dim)] += n
    bound = {r[0] for r in bind.execute(sa.text("SELECT name FROM embedq_collections"))}
    now = datetime.now(UTC)
    rows = [
        {"name": c, "model": m, "dim": d, "created_at": now}
        for c, found in counts.items()
        if c not in bound
        for (m, d), _ in found.most_common(1)
    ]
    if rows:
        table = sa.table(
            "embedq_collections",
            *(sa.column(n) for n in ("name", "model", "dim")),
            sa.column("created_at", sa.DateTime(timezone=True)),
        )
        op.bulk_insert(table, rows)


def downgrade() -> None:
    """Drop the table (collections are then unbound)."""
    op.drop_table("embedq_collections")
