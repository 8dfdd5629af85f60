"""SQLAlchemy backend of :class:`~embedq.store.base.Store`: SQLite (default) or Postgres."""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Concatenate, ParamSpec, TypeVar

import numpy as np
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Connection,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    bindparam,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from embedq.codec import decode_vector, decode_vectors, vector_dim
from embedq.errors import StaleVersionError, StoreError
from embedq.settings import Settings, get_settings
from embedq.store import migrations
from embedq.store.base import (
    CollectionState,
    Fingerprint,
    Item,
    Snapshot,
    Store,
    meta_hash,
    now_version,
)
from embedq.store.bindings import CollectionBindings, collections_table
from embedq.store.engine import brief, make_engine, retry_policy
from embedq.store.filters import Filter, parse_where, to_sql
from embedq.store.vectors import VectorFormat

# SQLite allows 32,766 bound parameters per statement; 15 columns x 1,000 rows stays under.
ROWS_PER_STATEMENT = 1000


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
    # The writing request's version (microseconds since the epoch when it was made): an
    # upsert of a lower version leaves the row alone.
    version: Mapped[int] = mapped_column(BigInteger, server_default="0")
    # Digest of metadata, parent and chunk index: an unchanged re-ingest is skipped by it.
    meta_hash: Mapped[str] = mapped_column(String(64), server_default="")


# The schema is made by the Alembic revisions in embedq/store/migrations, not by create_all.
_UPDATED_COLUMNS = (
    "content_hash",
    "text",
    "metadata",
    "model",
    "dim",
    "vector",
    "truncated",
    "parent_id",
    "chunk_index",
    "updated_at",
    "version",
    "meta_hash",
)


COLLECTIONS = collections_table(Base.metadata)


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


def _statement_batches(rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(rows), ROWS_PER_STATEMENT):
        yield rows[start : start + ROWS_PER_STATEMENT]


def _row(item: Item, now: datetime, pack: Callable[[np.ndarray], bytes]) -> dict[str, Any]:
    vector = np.asarray(item.vector, dtype=np.float32)
    return {
        "collection": item.collection,
        "external_id": item.id,
        "content_hash": item.content_hash,
        "text": item.text,
        "metadata": item.metadata or {},
        "model": item.model,
        "dim": int(vector.shape[-1]),
        "vector": pack(vector),
        "truncated": item.truncated,
        "parent_id": item.parent_id,
        "chunk_index": item.chunk_index,
        "created_at": now,
        "updated_at": now,
        "version": now_version() if item.version is None else item.version,
        "meta_hash": meta_hash(item.metadata, item.parent_id, item.chunk_index),
    }


def _print_key(p: Fingerprint) -> tuple[str, str, str]:
    return (p.content_hash, p.model, p.meta_hash)


def _print_params(p: Fingerprint) -> dict[str, str]:
    return {"b_id": p.id, "b_hash": p.content_hash, "b_model": p.model, "b_meta": p.meta_hash}


def _item(row: ItemRow) -> Item:
    return Item(
        collection=row.collection,
        id=row.external_id,
        text=row.text,
        vector=decode_vector(row.vector),
        model=row.model,
        content_hash=row.content_hash,
        metadata=row.meta or {},
        truncated=row.truncated,
        parent_id=row.parent_id,
        chunk_index=row.chunk_index,
        pk=row.pk,
        created_at=row.created_at,
        updated_at=row.updated_at,
        version=row.version,
    )


def _store_errors(
    what: str,
) -> Callable[[Callable[Concatenate[SQLStore, P], R]], Callable[Concatenate[SQLStore, P], R]]:
    """Retry connection errors within the store's budget, then turn the driver's errors
    into :class:`StoreError` naming what failed."""

    def wrap(fn: Callable[Concatenate[SQLStore, P], R]) -> Callable[Concatenate[SQLStore, P], R]:
        @functools.wraps(fn)
        def run(self: SQLStore, *args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return self.retry.call(lambda: fn(self, *args, **kwargs))
            except SQLAlchemyError as exc:
                raise StoreError(f"could not {what}: {brief(exc)}") from exc

        return run

    return wrap


class SQLStore(Store):
    """Items in one table, ``embedq_items``, unique on (collection, external_id)."""

    def __init__(self, url: str, settings: Settings | None = None) -> None:
        settings = settings or get_settings()
        self.engine = make_engine(url, settings)
        self.dialect = self.engine.dialect.name
        self.retry = retry_policy(self.dialect, settings)
        self.bindings = CollectionBindings(COLLECTIONS, self.dialect)
        self._migrate()
        self.format = VectorFormat(self, settings.vector_dtype)

    @_store_errors("create or update the tables")
    def _migrate(self) -> None:
        """Apply the Alembic revisions this database lacks (one process at a time)."""
        migrations.upgrade(self.engine)

    def _insert(self) -> Any:
        module = postgresql if self.dialect == "postgresql" else sqlite
        return module.insert(ItemRow)

    def upsert(self, items: Sequence[Item]) -> int:
        """One INSERT ... ON CONFLICT DO UPDATE per 1,000 rows, all in one transaction; a
        stored row of a higher version is left as it is."""
        if not items:
            return 0
        now = datetime.now(UTC)
        packers = self._packers(items)
        rows = [_row(item, now, packers[item.collection]) for item in items]
        stmt = self._insert()
        # created_at stays as first written; everything else takes the new values, unless
        # the row was written by a newer request (a redelivered old task must not undo it).
        stmt = stmt.on_conflict_do_update(
            index_elements=["collection", "external_id"],
            set_={name: stmt.excluded[name] for name in _UPDATED_COLUMNS},
            where=ItemRow.__table__.c.version <= stmt.excluded.version,
        )
        try:
            self.retry.call(lambda: self._write(stmt, rows))
        except SQLAlchemyError as exc:
            raise StoreError(f"could not write {len(rows)} items: {brief(exc)}") from exc
        return len(rows)

    def _packers(self, items: Sequence[Item]) -> dict[str, Callable[[np.ndarray], bytes]]:
        """Each collection's vector encoder (int8: with the collection's scale)."""
        if self.format.dtype != "int8":  # only int8 looks at the batch (to calibrate)
            return {c: self.format.packer(c, None) for c in {i.collection for i in items}}
        batches: dict[str, list[np.ndarray]] = {}
        for item in items:
            batches.setdefault(item.collection, []).append(item.vector)
        return {c: self.format.packer(c, np.asarray(v)) for c, v in batches.items()}

    def calibrate(self, collection: str, vectors: np.ndarray) -> float | None:
        """Recalibrate ``collection``'s int8 scale from ``vectors`` (int8 stores only)."""
        if self.format.dtype != "int8" or not len(vectors):
            return None
        return self.format.calibrate(collection, vectors)

    def _write(self, stmt: Any, rows: list[dict[str, Any]]) -> None:
        with self.engine.begin() as conn:
            bound = self.bindings.check(conn, rows)
            for batch in _statement_batches(rows):
                conn.execute(stmt, batch)
        self.bindings.remember(bound)

    @_store_errors("read a collection's model")
    def collection_model(self, collection: str) -> str | None:
        """The model id ``collection`` is bound to (without backend suffix), if it has one."""
        return self.bindings.model(self.engine, collection)

    @_store_errors("read items")
    def get(self, collection: str, ids: Sequence[str]) -> list[Item]:
        """The stored items among ``ids``, in no particular order."""
        query = select(ItemRow).where(
            ItemRow.collection == collection, ItemRow.external_id.in_(list(ids))
        )
        with Session(self.engine) as session:
            return [_item(row) for row in session.scalars(query)]

    @_store_errors("read chunks")
    def chunks(self, collection: str, parent_id: str) -> list[Item]:
        """The chunks of document ``parent_id``, in order."""
        query = select(ItemRow).where(
            ItemRow.collection == collection, ItemRow.parent_id == parent_id
        )
        with Session(self.engine) as session:
            return [_item(row) for row in session.scalars(query.order_by(ItemRow.chunk_index))]

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

    @_store_errors("compare stored items")
    def mark_current(
        self, collection: str, prints: Sequence[Fingerprint], version: int
    ) -> set[str]:
        """Stored items equal to ``prints`` take ``version`` if theirs is lower; returns the
        ids now stored at ``version`` or higher (nothing to write for them).

        The raise compares the item again in its UPDATE, so an item another task changed
        meanwhile is never marked current by mistake; a fresh ingest writes nothing here."""
        if not prints:
            return set()
        columns = (ItemRow.content_hash, ItemRow.model, ItemRow.meta_hash, ItemRow.version)
        query = select(ItemRow.external_id, *columns).where(
            ItemRow.collection == collection, ItemRow.external_id.in_([p.id for p in prints])
        )
        with self.engine.begin() as conn:
            stored = {row[0]: row[1:] for row in conn.execute(query)}
            done = {i for i, row in stored.items() if row[3] >= version}
            same = [p for p in prints if stored.get(p.id, ())[:3] == _print_key(p)]
            stale = [p for p in same if p.id not in done]
            if stale:
                done |= self._raise_versions(conn, collection, stale, version)
        return done

    @staticmethod
    def _raise_versions(
        conn: Connection, collection: str, prints: list[Fingerprint], version: int
    ) -> set[str]:
        """Set ``version`` on the items still stored exactly as ``prints``; returns the ids
        now at ``version`` or above."""
        conn.execute(
            update(ItemRow)
            .where(
                ItemRow.collection == collection,
                ItemRow.external_id == bindparam("b_id"),
                ItemRow.content_hash == bindparam("b_hash"),
                ItemRow.model == bindparam("b_model"),
                ItemRow.meta_hash == bindparam("b_meta"),
                ItemRow.version < version,
            )
            .values(version=version),
            [_print_params(p) for p in prints],
        )
        query = select(ItemRow.external_id).where(
            ItemRow.collection == collection,
            ItemRow.external_id.in_([p.id for p in prints]),
            ItemRow.version >= version,
        )
        return set(conn.execute(query).scalars())

    @_store_errors("delete stale chunks")
    def delete_chunks(
        self, collection: str, parent_id: str, keep_below: int, version: int | None = None
    ) -> int:
        """Remove the chunks of ``parent_id`` that a shorter new text no longer has (only
        those older than ``version``: a newer request's chunks stay)."""
        query = delete(ItemRow).where(
            ItemRow.collection == collection,
            ItemRow.parent_id == parent_id,
            ItemRow.chunk_index >= keep_below,
        )
        if version is not None:
            query = query.where(ItemRow.version < version)
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
        widths = {vector_dim(r[2]) for r in rows}
        if len(widths) > 1:
            raise StoreError(f"collection {collection!r} mixes vector dimensions {sorted(widths)}")
        vectors = decode_vectors([r[2] for r in rows], widths.pop() if rows else 0)
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
    def filter_pks(
        self,
        collection: str,
        where: Filter | dict[str, Any],
        among: Sequence[int] | None = None,
        limit: int | None = None,
    ) -> np.ndarray:
        """Row keys of ``collection`` whose metadata passes ``where`` (see
        :mod:`embedq.store.filters`), among the keys ``among`` if given (IN lists of at most
        ``ROWS_PER_STATEMENT``), at most ``limit`` of them; no vector is read."""
        query = self._where(select(ItemRow.pk).where(ItemRow.collection == collection), where)
        with self.engine.connect() as conn:
            if among is None:
                found = conn.execute(query.limit(limit)).scalars()
                return np.fromiter(found, dtype=np.int64)
            keys = [int(p) for p in among]
            pages = [
                conn.execute(query.where(ItemRow.pk.in_(keys[i : i + ROWS_PER_STATEMENT])))
                .scalars()
                .all()
                for i in range(0, len(keys), ROWS_PER_STATEMENT)
            ]
        return np.array([p for page in pages for p in page][:limit], dtype=np.int64)

    def _where(self, query: Any, where: Filter | dict[str, Any] | None) -> Any:
        """``query`` narrowed by the parsed filter ``where`` (checked before any SQL runs)."""
        parsed = parse_where(where)
        if parsed is None:
            return query
        return query.where(to_sql(parsed.root, ItemRow.__table__.c.metadata, self.dialect))

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
        where: Filter | dict[str, Any] | None = None,
        among: Sequence[int] | None = None,
        page: int = ROWS_PER_STATEMENT,
    ) -> Generator[tuple[np.ndarray, np.ndarray], None, None]:
        """Pages of (row keys, vectors) of the ``dim``-wide rows of ``collection`` that match
        ``where``, among the keys ``among`` if given (IN lists of at most ``page`` keys), else
        the whole collection streamed by the database; text and metadata are never read."""
        query = select(ItemRow.pk, ItemRow.vector).where(
            ItemRow.collection == collection, ItemRow.dim == dim
        )
        query = self._where(query, where)
        try:
            with self.engine.connect() as conn:
                if among is None:
                    # A server-side cursor on Postgres: rows arrive ``page`` at a time.
                    result = conn.execution_options(yield_per=page).execute(query)
                    for rows in result.partitions():
                        yield _vector_page(rows, dim)
                    return
                # A page of keys at a time: among may hold 20,000 (a narrow filter's keys).
                for start in range(0, len(among), page):
                    keys = [int(p) for p in among[start : start + page]]
                    yield _vector_page(conn.execute(query.where(ItemRow.pk.in_(keys))).all(), dim)
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
    return pks, decode_vectors([r[1] for r in rows], dim)


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
