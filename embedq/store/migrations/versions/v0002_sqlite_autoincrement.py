"""SQLite: rebuild an items table created without AUTOINCREMENT (releases before 0.1's
collection-isolation fix), so row keys of deleted items are never handed out again.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from embedq.store.migrations.helpers import dialect

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Keys of items deleted before the rebuild may lie above the highest key left, and an index
# built before it may still hold them: new keys start this far above, so none comes back.
KEY_GAP = 2**31


def _has_autoincrement() -> bool:
    sql = op.get_bind().execute(
        sa.text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'embedq_items'")
    )
    return "AUTOINCREMENT" in (sql.scalar() or "").upper()


def upgrade() -> None:
    """Copy the table into one declared AUTOINCREMENT (same rows, same keys, same indexes),
    then start new keys :data:`KEY_GAP` above the highest one copied."""
    if dialect() != "sqlite" or _has_autoincrement():
        return
    with op.batch_alter_table(
        "embedq_items", recreate="always", table_kwargs={"sqlite_autoincrement": True}
    ):
        pass
    op.execute("DELETE FROM sqlite_sequence WHERE name = 'embedq_items'")
    op.execute(
        "INSERT INTO sqlite_sequence (name, seq) "
        f"SELECT 'embedq_items', COALESCE(MAX(pk), 0) + {KEY_GAP} FROM embedq_items"
    )


def downgrade() -> None:
    """Nothing to undo: AUTOINCREMENT only stops key reuse."""
