"""Loading published indexes: each process keeps the newest version of each collection's
index in memory, swapped in locally (``os.replace`` after ``fsync``) when a new one is
published. Items written since the snapshot are searched exactly, as a small delta.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from embedq.errors import StoreError
from embedq.search.base import Index
from embedq.search.build import INDEX_KIND, blob_name, index_dir, unpack_blob, write_atomically
from embedq.search.factory import create_index
from embedq.store.base import Store

log = logging.getLogger(__name__)


# Rows whose write began before a snapshot may commit after it: the delta looks back this far.
DELTA_MARGIN = timedelta(minutes=5)


@dataclass
class LoadedIndex:
    """An index in memory, with the version of each row it holds."""

    collection: str
    version: int
    index: Index
    built_at: datetime
    pks: np.ndarray  # sorted
    stamps: np.ndarray
    checked_at: float = field(default_factory=time.monotonic)

    def covers(self, pks: np.ndarray, stamps: np.ndarray) -> np.ndarray:
        """For each row, whether the index holds it at exactly that update."""
        at = np.clip(np.searchsorted(self.pks, pks), 0, max(len(self.pks) - 1, 0))
        if not len(self.pks):
            return np.zeros(len(pks), dtype=bool)
        return (self.pks[at] == pks) & (self.stamps[at] == stamps)


class IndexCache:
    """Per-process cache of loaded indexes; checks the store for a newer version at most
    every ``check_interval_s`` and swaps to it (searches in flight keep the old object)."""

    def __init__(self, store: Store, data_dir: Path, check_interval_s: float = 1.0) -> None:
        self.store = store
        self.data_dir = data_dir
        self.check_interval_s = check_interval_s
        self._loaded: dict[str, LoadedIndex] = {}
        self._lock = threading.Lock()

    def get(self, collection: str) -> LoadedIndex | None:
        """The newest published index of ``collection``, or None if none was built."""
        current = self._loaded.get(collection)
        if current and time.monotonic() - current.checked_at < self.check_interval_s:
            return current
        with self._lock:
            return self._refresh(collection, self._loaded.get(collection))

    def _refresh(self, collection: str, current: LoadedIndex | None) -> LoadedIndex | None:
        published = self.store.blob_version(blob_name(collection))
        if published is None:
            self._loaded.pop(collection, None)
            return None
        version, meta = published
        if current and current.version == version:
            current.checked_at = time.monotonic()
            return current
        try:
            loaded = self._load(collection, version, meta)
        except (OSError, StoreError, RuntimeError) as exc:
            if current is None:
                raise
            log.error(
                "index %s v%d not loaded, v%d kept: %s", collection, version, current.version, exc
            )
            current.checked_at = time.monotonic()
            return current
        self._loaded[collection] = loaded
        return loaded

    def _load(self, collection: str, version: int, meta: dict[str, Any]) -> LoadedIndex:
        folder = index_dir(self.data_dir, collection)
        path = folder / f"v{version}.blob"
        if not path.exists():
            write_atomically(path, self.store.get_blob(blob_name(collection), version))
        index_bytes, pks, stamps = unpack_blob(path.read_bytes())
        local = folder / f"v{version}.{INDEX_KIND}"
        write_atomically(local, index_bytes)
        index = create_index(INDEX_KIND, int(meta["dim"]))
        index.load(local)
        if meta.get("ef"):
            index.ef = int(meta["ef"])  # type: ignore[attr-defined]
        built_at = datetime.fromisoformat(meta["built_at"])
        for old in folder.glob("v*"):
            if not old.name.startswith(f"v{version}."):
                old.unlink(missing_ok=True)  # older versions: already loaded or replaced
        return LoadedIndex(collection, version, index, built_at, pks.copy(), stamps.copy())
