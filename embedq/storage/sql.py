"""SQLAlchemy backend of :class:`~embedq.storage.Store`: SQLite (default) or Postgres."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Engine,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from embedq.errors import ConfigurationError, StoreError
from embedq.storage import Item, Store

# SQLite allows 32,766 bound parameters per statement; 12 columns x 1,000 rows stays under.
ROWS_PER_STATEMENT = 1000
SQLITE_BUSY_TIMEOUT_MS = 30_000


class Base(DeclarativeBase):
    """Declarative base of embedq's tables."""


class ItemRow(Base):
    """One stored embedding."""

    __tablename__ = "embedq_items"
    __table_args__ = (UniqueConstraint("collection", "external_id", name="uq_embedq_item"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    collection: Mapped[str] = mapped_column(String(128), index=True)
    external_id: Mapped[str] = mapped_column(String(512))
    content_hash: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSON().with_variant(postgresql.JSONB(), "postgresql"), default=dict
    )
    model: Mapped[str] = mapped_column(String(256))
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


_UPDATED_COLUMNS = (
    "content_hash",
    "text",
    "metadata",
    "model",
    "dim",
    "vector",
    "truncated",
    "updated_at",
)


def normalize_url(url: str) -> str:
    """Use psycopg 3 for Postgres URLs that name no driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside one writer; the busy timeout makes writers wait, not fail.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL and a busy timeout, its folder is created."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    try:
        return create_engine(url, pool_pre_ping=True)
    except ModuleNotFoundError as exc:
        raise ConfigurationError("Postgres needs: pip install 'embedq[postgres]'") from exc


def _chunks(rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(rows), ROWS_PER_STATEMENT):
        yield rows[start : start + ROWS_PER_STATEMENT]


def _row(item: Item, now: datetime) -> dict[str, Any]:
    vector = np.asarray(item.vector, dtype=np.float32)
    return {
        "collection": item.collection,
        "external_id": item.id,
        "content_hash": item.content_hash,
        "text": item.text,
        "metadata": item.metadata or {},
        "model": item.model,
        "dim": int(vector.shape[-1]),
        "vector": vector.tobytes(),
        "truncated": item.truncated,
        "created_at": now,
        "updated_at": now,
    }


def _item(row: ItemRow) -> Item:
    return Item(
        collection=row.collection,
        id=row.external_id,
        text=row.text,
        vector=np.frombuffer(row.vector, dtype=np.float32),
        model=row.model,
        content_hash=row.content_hash,
        metadata=row.meta or {},
        truncated=row.truncated,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


class SQLStore(Store):
    """Items in one table, ``embedq_items``, unique on (collection, external_id)."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        self._create_lock = threading.Lock()
        self._create_tables()

    def _create_tables(self) -> None:
        with self._create_lock:
            try:
                Base.metadata.create_all(self.engine)
            except SQLAlchemyError:
                # Another worker created them at the same moment; a second pass sees them.
                Base.metadata.create_all(self.engine)

    def _insert(self) -> Any:
        module = postgresql if self.dialect == "postgresql" else sqlite
        return module.insert(ItemRow)

    def upsert(self, items: Sequence[Item]) -> int:
        """One INSERT ... ON CONFLICT DO UPDATE per 1,000 rows, all in one transaction."""
        if not items:
            return 0
        now = datetime.now(UTC)
        rows = [_row(item, now) for item in items]
        stmt = self._insert()
        # created_at stays as first written; everything else takes the new values.
        stmt = stmt.on_conflict_do_update(
            index_elements=["collection", "external_id"],
            set_={name: stmt.excluded[name] for name in _UPDATED_COLUMNS},
        )
        try:
            with self.engine.begin() as conn:
                for chunk in _chunks(rows):
                    conn.execute(stmt, chunk)
        except SQLAlchemyError as exc:
            raise StoreError(f"could not write {len(rows)} items: {exc}") from exc
        return len(rows)

    def get(self, collection: str, ids: Sequence[str]) -> list[Item]:
        """The stored items among ``ids``, in no particular order."""
        query = select(ItemRow).where(
            ItemRow.collection == collection, ItemRow.external_id.in_(list(ids))
        )
        with Session(self.engine) as session:
            return [_item(row) for row in session.scalars(query)]

    def count(self, collection: str) -> int:
        """Items in ``collection``."""
        query = select(func.count()).select_from(ItemRow).where(ItemRow.collection == collection)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def delete(self, collection: str, ids: Sequence[str]) -> int:
        """Remove ``ids`` from ``collection``."""
        query = delete(ItemRow).where(
            ItemRow.collection == collection, ItemRow.external_id.in_(list(ids))
        )
        with self.engine.begin() as conn:
            return int(conn.execute(query).rowcount)

    def close(self) -> None:
        """Dispose of the connection pool."""
        self.engine.dispose()
