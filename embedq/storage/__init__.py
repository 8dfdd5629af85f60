"""The ``Store`` seam: durable items (text, metadata, vector) per collection."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from embedq.errors import ConfigurationError


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
    created_at: datetime | None = None
    updated_at: datetime | None = None


class Store(ABC):
    """Durable storage of items. Upserts are idempotent on (collection, id)."""

    @abstractmethod
    def upsert(self, items: Sequence[Item]) -> int:
        """Insert or replace ``items``; returns how many were written."""

    @abstractmethod
    def get(self, collection: str, ids: Sequence[str]) -> list[Item]:
        """The stored items among ``ids`` (absent ids are left out)."""

    @abstractmethod
    def count(self, collection: str) -> int:
        """Items in ``collection``."""

    @abstractmethod
    def delete(self, collection: str, ids: Sequence[str]) -> int:
        """Remove ``ids``; returns how many existed."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""


def create_store(url: str) -> Store:
    """The store for a database URL (``sqlite:///...`` or ``postgresql://...``)."""
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if scheme in ("sqlite", "postgresql", "postgres"):
        from embedq.storage.sql import SQLStore

        return SQLStore(url)
    raise ConfigurationError(f"EMBEDQ_DATABASE_URL scheme {scheme!r}: use sqlite or postgresql")
