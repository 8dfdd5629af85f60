"""The store seams: ``ItemStore`` (items per collection) and ``BlobStore`` (index files)."""

from __future__ import annotations

import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from embedq.store.filters import Filter


@dataclass(frozen=True)
class Snapshot:
    """Vectors of one collection at one moment, labelled by their row keys."""

    pks: np.ndarray
    vectors: np.ndarray
    taken_at: datetime
    # Each row's updated_at, in microseconds since the epoch.
    stamps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


@dataclass(frozen=True)
class CollectionState:
    """What changes when a collection changes: item count and latest update."""

    collection: str
    count: int
    updated_at: datetime | None

    @property
    def token(self) -> str:
        """A string that differs whenever the collection's contents may differ."""
        stamp = self.updated_at.isoformat() if self.updated_at else "-"
        return f"{self.count}:{stamp}"


@dataclass
class Item:
    """One stored embedding. ``id`` is the caller's id, unique within a collection."""

    collection: str
    id: str
    text: str
    vector: np.ndarray
    model: str
    content_hash: str
    metadata: dict[str, Any] = field(default_factory=dict)
    truncated: bool = False
    parent_id: str | None = None
    chunk_index: int | None = None
    pk: int | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    # When the request that wrote it was made (see :func:`now_version`); None: at writing.
    version: int | None = None


@dataclass(frozen=True)
class Fingerprint:
    """Everything that decides whether a stored item already holds a document, bar the
    vector (which follows from text and model)."""

    id: str
    content_hash: str
    model: str
    meta_hash: str


def now_version() -> int:
    """A version for a request made now: microseconds since the epoch. An upsert never
    replaces an item written by a request with a higher version."""
    return time.time_ns() // 1000


def meta_hash(metadata: dict[str, Any] | None, parent_id: str | None, chunk: int | None) -> str:
    """Digest of what an item carries besides its text: metadata, parent and chunk index."""
    # Sorted keys and fixed separators: the same metadata always gives the same digest.
    body = json.dumps(
        [metadata or {}, parent_id, chunk], sort_keys=True, separators=(",", ":"), default=str
    )
    return hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()


class ItemStore(ABC):
    """Durable items per collection. Upserts are idempotent on (collection, id) and never go
    backwards (an item of a lower version never replaces one of a higher); every read is
    confined to the collection it names."""

    @abstractmethod
    def upsert(self, items: Sequence[Item]) -> int:
        """Insert or replace ``items``, except where the stored item has a higher version;
        returns how many were sent."""

    @abstractmethod
    def get(self, collection: str, ids: Sequence[str]) -> list[Item]:
        """The stored items among ``ids`` (absent ids are left out)."""

    @abstractmethod
    def chunks(self, collection: str, parent_id: str) -> list[Item]:
        """The chunks of the document ``parent_id`` (items stored with that ``parent_id``),
        by chunk index."""

    @abstractmethod
    def count(self, collection: str) -> int:
        """Items in ``collection``."""

    @abstractmethod
    def delete(self, collection: str, ids: Sequence[str]) -> int:
        """Remove ``ids``; returns how many existed."""

    @abstractmethod
    def mark_current(
        self, collection: str, prints: Sequence[Fingerprint], version: int
    ) -> set[str]:
        """Raise to ``version`` the items stored exactly as ``prints`` describe; returns the
        ids that need no write: stored so, or stored by a request of a higher version."""

    @abstractmethod
    def delete_chunks(
        self, collection: str, parent_id: str, keep_below: int, version: int | None = None
    ) -> int:
        """Remove chunks of ``parent_id`` at positions >= ``keep_below`` (only those written
        by requests older than ``version``, if given)."""

    @abstractmethod
    def by_pk(self, collection: str, pks: Sequence[int]) -> list[Item]:
        """Items of ``collection`` by row key (absent keys, and keys of any other
        collection, are left out)."""

    @abstractmethod
    def snapshot(self, collection: str, since: datetime | None = None) -> Snapshot:
        """All vectors of ``collection`` (only those updated after ``since``, if given)."""

    @abstractmethod
    def stamps(self, collection: str, since: datetime) -> tuple[np.ndarray, np.ndarray]:
        """(row keys, updated_at in microseconds) of rows updated after ``since``."""

    @abstractmethod
    def filter_pks(
        self,
        collection: str,
        where: Filter | dict[str, Any],
        among: Sequence[int] | None = None,
        limit: int | None = None,
    ) -> np.ndarray:
        """Row keys of ``collection`` whose metadata passes the filter ``where`` (see
        :mod:`embedq.store.filters`; only those among ``among``, if given; at most
        ``limit``); no vector is read."""

    @abstractmethod
    def vectors(
        self,
        collection: str,
        dim: int,
        where: Filter | dict[str, Any] | None = None,
        among: Sequence[int] | None = None,
        page: int = 1000,
    ) -> Generator[tuple[np.ndarray, np.ndarray], None, None]:
        """Pages of at most ``page`` (row keys, vectors) of the ``dim``-wide rows of
        ``collection`` matching ``where`` (only those among ``among``, if given). Memory is
        bounded by ``page`` whatever the collection's size; text and metadata are not read."""

    def collection_model(self, collection: str) -> str | None:
        """The model (id without backend suffix) ``collection`` is bound to; None if unbound."""
        return None

    @abstractmethod
    def states(self) -> list[CollectionState]:
        """Count and latest update of every collection."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""


class BlobStore(ABC):
    """Versioned binary blobs (published index files), readable by every host."""

    @abstractmethod
    def put_blob(
        self, name: str, data: bytes, meta: dict[str, Any], taken_at: datetime | None = None
    ) -> int:
        """Publish ``data`` under ``name`` as a new version; returns the version.

        ``taken_at`` is when the data's source was read (kept in the metadata as
        ``taken_at``): a version read no later than the published one's raises
        :class:`~embedq.errors.StaleVersionError`, so versions only move forward.
        """

    @abstractmethod
    def blob_version(self, name: str) -> tuple[int, dict[str, Any]] | None:
        """Latest version of ``name`` and its metadata, or None."""

    @abstractmethod
    def get_blob(self, name: str, version: int) -> bytes:
        """The bytes of one published version."""


class Store(ItemStore, BlobStore):
    """What the SQL backend provides: items and blobs in one database."""

    def calibrate(self, collection: str, vectors: np.ndarray) -> float | None:
        """Recalibrate how ``collection``'s vectors are compacted from ``vectors`` (its
        stored ones, at an index rebuild); returns the new int8 scale, None if not int8."""
        return None
