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
from cachetools import LRUCache

from embedq.errors import IndexIntegrityError, StoreError
from embedq.search.base import Index
from embedq.search.build import (
    INDEX_KIND,
    blob_name,
    index_dir,
    sha256,
    unpack_blob,
    write_atomically,
)
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
    every ``check_interval_s`` and swaps to it (searches in flight keep the old object).

    At most ``keep`` collections stay loaded (least recently searched dropped first). A
    version that fails its sha256 or cannot be loaded is not used: the previous one keeps
    serving (or, with none, the searcher searches exactly) and the reason is in
    :attr:`failures` until a good version loads.
    """

    def __init__(
        self, store: Store, data_dir: Path, check_interval_s: float = 1.0, keep: int = 64
    ) -> None:
        self.store = store
        self.data_dir = data_dir
        self.check_interval_s = check_interval_s
        self._loaded: LRUCache[str, LoadedIndex] = LRUCache(maxsize=keep)
        # collection -> (version that failed, when, whether retrying can help)
        self._failed: LRUCache[str, tuple[int, float, bool]] = LRUCache(maxsize=keep)
        self._failures: LRUCache[str, str] = LRUCache(maxsize=keep)
        self._lock = threading.Lock()

    @property
    def failures(self) -> dict[str, str]:
        """Why each collection's published index is not the one in use (collection -> why)."""
        with self._lock:
            return dict(self._failures)

    def get(self, collection: str) -> LoadedIndex | None:
        """The newest usable published index of ``collection``, or None if there is none."""
        with self._lock:  # an LRU read reorders it
            current = self._loaded.get(collection)
            if current and time.monotonic() - current.checked_at < self.check_interval_s:
                return current
            return self._refresh(collection, current)

    def _refresh(self, collection: str, current: LoadedIndex | None) -> LoadedIndex | None:
        published = self.store.blob_version(blob_name(collection))
        if published is None:
            self._loaded.pop(collection, None)
            return None
        version, meta = published
        if (current and current.version == version) or self._gave_up(collection, version):
            if current:
                current.checked_at = time.monotonic()
            return current
        try:
            loaded = self._load(collection, version, meta)
        except IndexIntegrityError as exc:
            return self._keep(collection, version, current, exc, final=True)
        except (OSError, StoreError, RuntimeError, ValueError) as exc:
            return self._keep(collection, version, current, exc, final=False)
        self._failures.pop(collection, None)
        self._failed.pop(collection, None)
        self._loaded[collection] = loaded
        return loaded

    def _gave_up(self, collection: str, version: int) -> bool:
        failed = self._failed.get(collection)
        if failed is None or failed[0] != version:
            return False
        return failed[2] or time.monotonic() - failed[1] < self.check_interval_s

    def _keep(
        self,
        collection: str,
        version: int,
        current: LoadedIndex | None,
        exc: Exception,
        final: bool,
    ) -> LoadedIndex | None:
        kept = f"v{current.version} kept" if current else "searched exactly meanwhile"
        reason = f"v{version} not loaded ({kept}): {type(exc).__name__}: {exc}"
        log.error("index %s %s", collection, reason)
        self._failures[collection] = reason
        self._failed[collection] = (version, time.monotonic(), final)
        if current:
            current.checked_at = time.monotonic()
        return current

    def _load(self, collection: str, version: int, meta: dict[str, Any]) -> LoadedIndex:
        folder = index_dir(self.data_dir, collection)
        index_bytes, pks, stamps = unpack_blob(self._verified(collection, version, meta))
        local = folder / f"v{version}.{INDEX_KIND}"
        write_atomically(local, index_bytes)
        index = create_index(INDEX_KIND, int(meta["dim"]))
        index.load(local)
        if meta.get("ef"):
            index.ef = int(meta["ef"])
        built_at = datetime.fromisoformat(meta["built_at"])
        for old in folder.glob("v*"):
            if not old.name.startswith(f"v{version}."):
                old.unlink(missing_ok=True)  # older versions: already loaded or replaced
        return LoadedIndex(collection, version, index, built_at, pks.copy(), stamps.copy())

    def _verified(self, collection: str, version: int, meta: dict[str, Any]) -> bytes:
        """The version's bytes (local copy, else the store's) once their sha256 matches."""
        path = index_dir(self.data_dir, collection) / f"v{version}.blob"
        if path.exists():
            data = path.read_bytes()
            if _matches(data, meta):
                return data
            path.unlink(missing_ok=True)  # damaged on this disk: fetch it again
        data = self.store.get_blob(blob_name(collection), version)
        if not _matches(data, meta):
            raise IndexIntegrityError(
                f"sha256 {sha256(data)[:16]}... of the stored bytes is not the published "
                f"{str(meta.get('sha256'))[:16]}..."
            )
        write_atomically(path, data)
        return data


def _matches(data: bytes, meta: dict[str, Any]) -> bool:
    # Versions published before checksums existed have none to check.
    return "sha256" not in meta or sha256(data) == meta["sha256"]
