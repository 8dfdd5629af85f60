"""SQLAlchemy backend of :class:`~embedq.store.base.Store`: SQLite (default) or Postgres."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Engine,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    inspect,
    literal,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from embedq.errors import ConfigurationError, StaleVersionError, StoreError
from embedq.store.base import CollectionState, Item, Snapshot, Store

# SQLite allows 32,766 bound parameters per statement; 13 columns x 1,000 rows stays under.
ROWS_PER_STATEMENT = 1000
SQLITE_BUSY_TIMEOUT_MS = 30_000


class Base(DeclarativeBase):
    """Declarative base of embedq's tables."""


class ItemRow(Base):
    """One stored embedding."""

    __tablename__ = "embedq_items"
    __table_args__ = (
        UniqueConstraint("collection", "external_id", name="uq_embedq_item"),
        Index("ix_embedq_item_updated", "collection", "updated_at"),
        Index("ix_embedq_item_parent", "collection", "parent_id"),
        # Row keys label index entries: SQLite must never hand a deleted row's key to a new row.
        {"sqlite_autoincrement": True},
    )

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
    parent_id: Mapped[str | None] = mapped_column(String(512), nullable=True)
    chunk_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
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


class BlobVersion(Base):
    """Latest published version of a named blob (a built index)."""

    __tablename__ = "embedq_blob_versions"

    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class BlobPart(Base):
    """One part of one version of a blob (parts keep each row well under any limit)."""

    __tablename__ = "embedq_blob_parts"

    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    part: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


P = ParamSpec("P")
R = TypeVar("R")

BLOB_PART_BYTES = 8 * 2**20
BLOB_VERSIONS_KEPT = 2


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


def _statement_batches(rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
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
        "parent_id": item.parent_id,
        "chunk_index": item.chunk_index,
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
        parent_id=row.parent_id,
        chunk_index=row.chunk_index,
        pk=row.pk,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _store_errors(what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Turn the driver's errors into :class:`StoreError` naming what failed."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except SQLAlchemyError as exc:
                raise StoreError(f"could not {what}: {brief(exc)}") from exc

        return run

    return wrap


def brief(exc: SQLAlchemyError) -> str:
    """The driver's one-line reason, without the SQL and its parameters (document text)."""
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(getattr(exc, 'orig', None) or exc).__name__}: {reason[0] if reason else ''}"


class SQLStore(Store):
    """Items in one table, ``embedq_items``, unique on (collection, external_id)."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        self._create_lock = threading.Lock()
        self._create_tables()

    @_store_errors("create or update the tables")
    def _create_tables(self) -> None:
        with self._create_lock:
            try:
                self._migrate()
            except SQLAlchemyError:
                # Another worker migrated at the same moment; a second pass sees its work.
                self._migrate()

    def _migrate(self) -> None:
        """Create missing tables, then add columns and indexes that newer versions define
        (additive only: nullable columns, so old rows stay valid)."""
        Base.metadata.create_all(self.engine)
        inspector = inspect(self.engine)
        for table in Base.metadata.sorted_tables:
            present = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in present:
                    kind = column.type.compile(dialect=self.engine.dialect)
                    with self.engine.begin() as conn:
                        conn.execute(
                            text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}")
                        )
            for index in table.indexes:
                index.create(self.engine, checkfirst=True)

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
                for batch in _statement_batches(rows):
                    conn.execute(stmt, batch)
        except SQLAlchemyError as exc:
            raise StoreError(f"could not write {len(rows)} items: {brief(exc)}") from exc
        return len(rows)

    @_store_errors("read items")
    def get(self, collection: str, ids: Sequence[str]) -> list[Item]:
        """The stored items among ``ids``, in no particular order."""
        query = select(ItemRow).where(
            ItemRow.collection == collection, ItemRow.external_id.in_(list(ids))
        )
        with Session(self.engine) as session:
            return [_item(row) for row in session.scalars(query)]

    @_store_errors("count items")
    def count(self, collection: str) -> int:
        """Items in ``collection``."""
        query = select(func.count()).select_from(ItemRow).where(ItemRow.collection == collection)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    @_store_errors("delete items")
    def delete(self, collection: str, ids: Sequence[str]) -> int:
        """Remove ``ids`` from ``collection``."""
        query = delete(ItemRow).where(
            ItemRow.collection == collection, ItemRow.external_id.in_(list(ids))
        )
        with self.engine.begin() as conn:
            return int(conn.execute(query).rowcount)

    @_store_errors("read content hashes")
    def hashes(self, collection: str, ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """(content hash, model) of the stored ids among ``ids``."""
        query = select(ItemRow.external_id, ItemRow.content_hash, ItemRow.model).where(
            ItemRow.collection == collection, ItemRow.external_id.in_(list(ids))
        )
        with self.engine.connect() as conn:
            return {row[0]: (row[1], row[2]) for row in conn.execute(query)}

    @_store_errors("delete stale chunks")
    def delete_chunks(self, collection: str, parent_id: str, keep_below: int) -> int:
        """Remove the chunks of ``parent_id`` that a shorter new text no longer has."""
        query = delete(ItemRow).where(
            ItemRow.collection == collection,
            ItemRow.parent_id == parent_id,
            ItemRow.chunk_index >= keep_below,
        )
        with self.engine.begin() as conn:
            return int(conn.execute(query).rowcount)

    @_store_errors("read items")
    def by_pk(self, collection: str, pks: Sequence[int]) -> list[Item]:
        """Items of ``collection`` by row key; keys of other collections are left out."""
        if not len(pks):
            return []
        query = select(ItemRow).where(
            ItemRow.collection == collection, ItemRow.pk.in_([int(p) for p in pks])
        )
        with Session(self.engine) as session:
            return [_item(row) for row in session.scalars(query)]

    @_store_errors("read a snapshot")
    def snapshot(self, collection: str, since: datetime | None = None) -> Snapshot:
        """Row keys, update stamps and vectors of ``collection``, read in one query."""
        taken_at = datetime.now(UTC)
        query = select(ItemRow.pk, ItemRow.updated_at, ItemRow.vector).where(
            ItemRow.collection == collection
        )
        if since is not None:
            query = query.where(ItemRow.updated_at > since)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(ItemRow.pk)).all()
        pks = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        stamps = np.fromiter((micros(r[1]) for r in rows), dtype=np.int64, count=len(rows))
        dim = len(rows[0][2]) // 4 if rows else 0
        if any(len(r[2]) != 4 * dim for r in rows):
            widths = sorted({len(r[2]) // 4 for r in rows})
            raise StoreError(f"collection {collection!r} mixes vector dimensions {widths}")
        blob = b"".join(r[2] for r in rows)
        vectors = np.frombuffer(blob, dtype=np.float32).reshape(len(rows), dim)
        return Snapshot(pks, vectors, taken_at, stamps)

    @_store_errors("read update times")
    def stamps(self, collection: str, since: datetime) -> tuple[np.ndarray, np.ndarray]:
        """Row keys and update times of rows changed after ``since`` (no vectors read)."""
        query = select(ItemRow.pk, ItemRow.updated_at).where(
            ItemRow.collection == collection, ItemRow.updated_at > since
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        pks = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        return pks, np.fromiter((micros(r[1]) for r in rows), dtype=np.int64, count=len(rows))

    @_store_errors("filter by metadata")
    def filter_pks(self, collection: str, where: dict[str, Any]) -> np.ndarray:
        """Row keys whose metadata has each key equal to the given value (JSON equality)."""
        query = select(ItemRow.pk).where(ItemRow.collection == collection)
        for key, value in where.items():
            query = query.where(self._json_equals(key, value))
        with self.engine.connect() as conn:
            return np.fromiter(conn.execute(query).scalars(), dtype=np.int64)

    def _json_equals(self, key: str, value: Any) -> Any:
        column = ItemRow.__table__.c.metadata
        if self.dialect == "postgresql":
            return column.op("@>")(literal({key: value}, type_=postgresql.JSONB))
        # SQLite: json_extract gives SQL values; compare JSON text for non-scalars.
        if isinstance(value, dict | list):
            return func.json_extract(column, f'$."{key}"') == json.dumps(value)
        if isinstance(value, bool):
            return func.json_type(column, f'$."{key}"') == ("true" if value else "false")
        return func.json_extract(column, f'$."{key}"') == value

    @_store_errors("read collection states")
    def states(self) -> list[CollectionState]:
        """Count and latest update per collection."""
        query = select(ItemRow.collection, func.count(), func.max(ItemRow.updated_at)).group_by(
            ItemRow.collection
        )
        with self.engine.connect() as conn:
            return [CollectionState(c, int(n), _aware(t)) for c, n, t in conn.execute(query)]

    def vectors(
        self,
        collection: str,
        dim: int,
        where: dict[str, Any] | None = None,
        among: Sequence[int] | None = None,
        page: int = ROWS_PER_STATEMENT,
    ) -> Generator[tuple[np.ndarray, np.ndarray], None, None]:
        """Pages of (row keys, vectors) of the ``dim``-wide rows of ``collection`` that match
        ``where``, among the keys ``among`` if given (IN lists of at most ``page`` keys), else
        the whole collection streamed by the database; text and metadata are never read."""
        query = select(ItemRow.pk, ItemRow.vector).where(
            ItemRow.collection == collection, ItemRow.dim == dim
        )
        for key, value in (where or {}).items():
            query = query.where(self._json_equals(key, value))
        try:
            with self.engine.connect() as conn:
                if among is None:
                    # A server-side cursor on Postgres: rows arrive ``page`` at a time.
                    result = conn.execution_options(yield_per=page).execute(query)
                    for rows in result.partitions():
                        yield _vector_page(rows, dim)
                    return
                keys = [int(p) for p in among]
                for start in range(0, len(keys), page):
                    chunk = query.where(ItemRow.pk.in_(keys[start : start + page]))
                    yield _vector_page(conn.execute(chunk).all(), dim)
        # A generator runs after its caller returned: the decorator cannot translate here.
        except SQLAlchemyError as exc:
            raise StoreError(f"could not read vectors: {brief(exc)}") from exc

    @_store_errors("publish an index")
    def put_blob(
        self, name: str, data: bytes, meta: dict[str, Any], taken_at: datetime | None = None
    ) -> int:
        """Write a new version in parts, then point the version row at it, in one transaction
        that holds the version row's lock from its first statement."""
        with Session(self.engine) as session, session.begin():
            current = self._locked_blob_row(session, name)
            _check_forward(name, current, taken_at)
            version = current.version + 1
            for part, start in enumerate(range(0, max(len(data), 1), BLOB_PART_BYTES)):
                chunk = data[start : start + BLOB_PART_BYTES]
                session.add(BlobPart(name=name, version=version, part=part, data=chunk))
            stamp = {"taken_at": taken_at.isoformat()} if taken_at else {}
            current.version, current.meta = version, meta | stamp
            current.created_at = datetime.now(UTC)
            session.execute(
                delete(BlobPart).where(
                    BlobPart.name == name, BlobPart.version <= version - BLOB_VERSIONS_KEPT
                )
            )
        return version

    def _locked_blob_row(self, session: Session, name: str) -> BlobVersion:
        module = postgresql if self.dialect == "postgresql" else sqlite
        placeholder = module.insert(BlobVersion).values(
            name=name, version=0, metadata={}, created_at=datetime.now(UTC)
        )
        # Writing first takes SQLite's write lock and gives Postgres a row to lock, so two
        # publishers of one name queue up instead of both reading the same version.
        session.execute(placeholder.on_conflict_do_nothing(index_elements=["name"]))
        query = select(BlobVersion).where(BlobVersion.name == name).with_for_update()
        return session.scalars(query).one()

    @_store_errors("read an index version")
    def blob_version(self, name: str) -> tuple[int, dict[str, Any]] | None:
        """Latest version of ``name`` and its metadata."""
        with Session(self.engine) as session:
            row = session.get(BlobVersion, name)
            return (row.version, dict(row.meta)) if row else None

    @_store_errors("read an index")
    def get_blob(self, name: str, version: int) -> bytes:
        """All parts of one version, joined."""
        query = (
            select(BlobPart.data)
            .where(BlobPart.name == name, BlobPart.version == version)
            .order_by(BlobPart.part)
        )
        with self.engine.connect() as conn:
            parts = list(conn.execute(query).scalars())
        if not parts:
            raise StoreError(f"blob {name!r} version {version} is not stored (replaced since?)")
        return b"".join(parts)

    def close(self) -> None:
        """Dispose of the connection pool."""
        self.engine.dispose()


def _vector_page(rows: Sequence[Any], dim: int) -> tuple[np.ndarray, np.ndarray]:
    pks = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    blob = b"".join(r[1] for r in rows)
    return pks, np.frombuffer(blob, dtype=np.float32).reshape(len(rows), dim)


def _check_forward(name: str, current: BlobVersion, taken_at: datetime | None) -> None:
    published = (current.meta or {}).get("taken_at")
    if taken_at is None or not published or taken_at > datetime.fromisoformat(published):
        return
    raise StaleVersionError(
        f"{name}: read at {taken_at.isoformat()}, not after the published version "
        f"{current.version} (read at {published}); not published"
    )


def micros(value: datetime) -> int:
    """Microseconds since the epoch of a stored time (naive SQLite times are UTC)."""
    aware = _aware(value)
    assert aware is not None
    return int(aware.timestamp() * 1_000_000)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes for what was written as UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value
