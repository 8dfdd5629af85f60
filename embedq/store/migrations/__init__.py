"""Alembic migrations of embedq's tables, applied on first use by :func:`upgrade`.

Revisions live in ``versions/``; ``v0001`` is the schema the last release before Alembic
created (it also brings any older, unversioned embedq database up to it). Add a revision by
hand, next in line, as ``versions/vNNNN_what.py`` with ``down_revision`` the previous one.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

HERE = Path(__file__).resolve().parent
# Not Alembic's default name: an application's own migrations may share the database.
VERSION_TABLE = "embedq_alembic_version"
# Postgres advisory lock held while migrating: any constant that other software won't pick.
ADVISORY_LOCK_KEY = 0x656D6265_64710001


def config(connection: Connection | None = None) -> Config:
    """An Alembic config for these migrations, running on ``connection`` if given."""
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def head() -> str | None:
    """The newest revision."""
    return ScriptDirectory.from_config(config()).get_current_head()


def current(connection: Connection) -> str | None:
    """The revision the database is at (None: unversioned or empty)."""
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def upgrade(engine: Engine) -> None:
    """Bring the database to the newest revision, one migrating process at a time."""
    with engine.connect() as conn:
        if current(conn) == head():
            return
    with engine.connect() as conn, _exclusive(conn):
        command.upgrade(config(conn), "head")


@contextlib.contextmanager
def _exclusive(conn: Connection) -> Iterator[None]:
    """Only one process migrates; the others wait here, then find the work done."""
    if conn.dialect.name == "postgresql":
        # Building an index on a large table, or waiting for another process to, may take
        # longer than the statement timeout meant for store calls; RESET restores it.
        conn.exec_driver_sql("SET statement_timeout = 0")
        # A session lock outlives the per-revision commits (and CONCURRENTLY index builds).
        conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
        conn.commit()
        try:
            yield
        finally:
            # A lost connection has released the lock already.
            with contextlib.suppress(SQLAlchemyError):
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_LOCK_KEY})
                conn.exec_driver_sql("RESET statement_timeout")
                conn.commit()
        return
    # SQLite: every revision runs inside one write transaction taken up front, so a second
    # process waits (busy timeout) and then sees the upgraded schema.
    conn.exec_driver_sql("BEGIN IMMEDIATE")
    yield
    conn.commit()
