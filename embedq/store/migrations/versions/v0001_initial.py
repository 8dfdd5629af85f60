"""The schema of the last release before Alembic; also brings older embedq databases to it.

A database that embedq created before it used Alembic has these tables and no version
table: this revision then only adds what such a database may lack (columns, as nullable,
and indexes), which stamps it. A new database gets the tables as that release made them.

Revision ID: 0001
Revises: none
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from embedq.store.migrations.helpers import columns, create_index, tables

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON_METADATA = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
INDEXES = (
    ("ix_embedq_items_collection", "embedq_items", ("collection",)),
    ("ix_embedq_item_updated", "embedq_items", ("collection", "updated_at")),
    ("ix_embedq_item_parent", "embedq_items", ("collection", "parent_id")),
)


def _items() -> list[sa.SchemaItem]:
    return [
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("collection", sa.String(128), nullable=False),
        sa.Column("external_id", sa.String(512), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("metadata", JSON_METADATA, nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("dim", sa.Integer, nullable=False),
        sa.Column("vector", sa.LargeBinary, nullable=False),
        sa.Column("truncated", sa.Boolean, nullable=False),
        sa.Column("parent_id", sa.String(512), nullable=True),
        sa.Column("chunk_index", sa.Integer, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("collection", "external_id", name="uq_embedq_item"),
    ]


def _blob_versions() -> list[sa.SchemaItem]:
    return [
        sa.Column("name", sa.String(256), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    ]


def _blob_parts() -> list[sa.SchemaItem]:
    return [
        sa.Column("name", sa.String(256), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("part", sa.Integer, primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
    ]


def _ensure(name: str, items: list[sa.SchemaItem], **kwargs: object) -> None:
    """Create ``name``, or add the columns an older release had not yet created (nullable,
    as that release's own additive upgrade did, so old rows stay valid)."""
    if name not in tables():
        op.create_table(name, *items, **kwargs)
        return
    present = columns(name)
    for column in items:
        if isinstance(column, sa.Column) and column.name not in present:
            op.add_column(name, sa.Column(column.name, column.type, nullable=True))


def upgrade() -> None:
    """Create or complete the three tables, then their indexes."""
    # Row keys label index entries: SQLite must never hand a deleted row's key to a new row.
    _ensure("embedq_items", _items(), sqlite_autoincrement=True)
    _ensure("embedq_blob_versions", _blob_versions())
    _ensure("embedq_blob_parts", _blob_parts())
    for name, table, cols in INDEXES:
        create_index(name, table, cols)


def downgrade() -> None:
    """Drop everything embedq stored."""
    for name in ("embedq_blob_parts", "embedq_blob_versions", "embedq_items"):
        op.drop_table(name)
