"""What revisions share: idempotent steps, and Postgres index builds that never block writes."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


def dialect() -> str:
    """The database's dialect name (sqlite, postgresql)."""
    return op.get_bind().dialect.name


def tables() -> set[str]:
    """Tables that exist now."""
    return set(sa.inspect(op.get_bind()).get_table_names())


def columns(table: str) -> set[str]:
    """Column names of ``table`` as it exists now."""
    return {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}


def create_index(name: str, table: str, cols: Sequence[str], unique: bool = False) -> None:
    """Create an index unless it exists. On Postgres it is built CONCURRENTLY (writes go on
    meanwhile), outside any transaction; an invalid leftover of a failed build is replaced."""
    if dialect() != "postgresql":
        op.create_index(name, table, list(cols), unique=unique, if_not_exists=True)
        return
    with op.get_context().autocommit_block():
        invalid = op.get_bind().execute(
            sa.text(
                "SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE c.relname = :name AND NOT i.indisvalid"
            ),
            {"name": name},
        )
        if invalid.first():
            op.drop_index(name, table_name=table, postgresql_concurrently=True)
        op.create_index(
            name,
            table,
            list(cols),
            unique=unique,
            if_not_exists=True,
            postgresql_concurrently=True,
        )
