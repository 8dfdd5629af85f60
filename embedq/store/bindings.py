"""Which model each collection is bound to: the one whose vectors first filled it.

Vectors of two models cannot be searched together, so a write of another model's vectors
into a bound collection is refused (:class:`~embedq.errors.CollectionModelError`). The
binding is made in the writing transaction; once committed it never changes, so each
process remembers the bindings it has seen (a bounded LRU) and checks them without SQL.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

from cachetools import LRUCache
from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite

from embedq.encode.models import base_model_id
from embedq.errors import CollectionModelError

# Bindings remembered per process; one forgotten costs two statements on its next write.
BOUND_COLLECTIONS_KEPT = 4096


def collections_table(metadata: MetaData) -> Table:
    """``embedq_collections``: name -> model id (no backend suffix: fp32, fp16 and int8
    vectors of one model mix), its dimension, when bound (made by revision 0004)."""
    return Table(
        "embedq_collections",
        metadata,
        Column("name", String(128), primary_key=True),
        Column("model", String(256), nullable=False),
        Column("dim", Integer, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )


class CollectionBindings:
    """Binds collections to models inside write transactions, and remembers the bindings."""

    def __init__(self, table: Table, dialect: str) -> None:
        self.table = table
        self.insert = (postgresql if dialect == "postgresql" else sqlite).insert
        self._known: LRUCache[str, str] = LRUCache(maxsize=BOUND_COLLECTIONS_KEPT)
        self._lock = threading.Lock()

    def check(self, conn: Connection, rows: list[dict[str, Any]]) -> dict[str, str]:
        """Bind each new collection among ``rows`` to their model (of two first writers, one
        binds and the other is compared with it); raise :class:`CollectionModelError` if
        rows of another model would go in. Returns the bindings, to :meth:`remember` once
        the transaction is committed."""
        wanted = {(r["collection"], base_model_id(r["model"])): r["dim"] for r in rows}
        found = {}
        for (collection, model), dim in wanted.items():
            with self._lock:
                known = self._known.get(collection)
            bound = known or self._bind(conn, collection, model, dim)
            found[collection] = bound
            if bound != model:
                raise CollectionModelError(
                    f"collection {collection!r} is bound to model {bound!r} (the model that "
                    f"first filled it); refusing vectors of model {model!r}: use another "
                    "collection for this model"
                )
        return found

    def _bind(self, conn: Connection, collection: str, model: str, dim: int) -> str:
        """Bind ``collection`` to ``model`` unless it is bound; the model it is bound to."""
        values = {"name": collection, "model": model, "dim": dim, "created_at": datetime.now(UTC)}
        conn.execute(
            self.insert(self.table).values(**values).on_conflict_do_nothing(index_elements=["name"])
        )
        query = select(self.table.c.model).where(self.table.c.name == collection)
        return str(conn.execute(query).scalar_one())

    def remember(self, found: dict[str, str]) -> None:
        """Keep committed bindings (a rolled-back first write must leave none behind)."""
        with self._lock:
            self._known.update(found)

    def model(self, engine: Engine, collection: str) -> str | None:
        """The model ``collection`` is bound to; None if it is not bound."""
        with self._lock:
            if (known := self._known.get(collection)) is not None:
                return known
        query = select(self.table.c.model).where(self.table.c.name == collection)
        with engine.connect() as conn:
            bound = conn.execute(query).scalar_one_or_none()
        if bound is not None:
            self.remember({collection: bound})
        return bound
