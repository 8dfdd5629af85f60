"""Alembic environment: runs on the connection :func:`embedq.store.migrations.upgrade`
hands over (or, from the ``alembic`` command line, on ``EMBEDQ_DATABASE_URL``)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from embedq.settings import get_settings
from embedq.store.engine import make_engine
from embedq.store.migrations import VERSION_TABLE


def run(connection: Connection) -> None:
    """Run the pending revisions, each in its own transaction unless the caller holds one
    (SQLite: the whole upgrade is one transaction)."""
    context.configure(
        connection=connection,
        version_table=VERSION_TABLE,
        # A revision that builds Postgres indexes CONCURRENTLY commits what came before it.
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    """Entry point Alembic calls when it loads this file."""
    given = context.config.attributes.get("connection")
    if given is not None:
        run(given)
        return
    settings = get_settings()
    engine = make_engine(settings.database_url, settings)
    with engine.connect() as connection:
        run(connection)
        connection.commit()
    engine.dispose()


main()
