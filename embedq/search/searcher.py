"""Search a collection: the published HNSW index plus an exact delta of recent writes.

Hits are always read back from the store, so a deleted item is never returned, and an item
updated since the index was built is scored with its new vector (it is in the delta).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from embedq.broker.results import get_and_forget
from embedq.errors import InvalidInputError
from embedq.inputs import parse_collection
from embedq.search.base import normalize
from embedq.search.exact import exact_top_k
from embedq.search.loader import DELTA_MARGIN, IndexCache, LoadedIndex
from embedq.settings import Settings, get_settings
from embedq.store.base import Item, Store
from embedq.store.factory import create_store

MAX_K = 1000
# Metadata filters that match at most this many items are searched exactly.
EXACT_FILTER_LIMIT = 20_000


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Writes commit a little after they are stamped (by the writer's clock); re-reading this
# far before the previous read catches them.
RECENT_LOOKBACK = timedelta(seconds=30)


@dataclass
class _Delta:
    version: int | None
    watermark: datetime
    rows: dict[int, tuple[int, np.ndarray]] = field(default_factory=dict)
    _arrays: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, stamps: dict[int, int], items: list[Item]) -> None:
        for item in items:
            assert item.pk is not None
            self.rows[item.pk] = (stamps[item.pk], item.vector)
        if items:
            self._arrays = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            pks = np.fromiter(self.rows, dtype=np.int64, count=len(self.rows))
            vectors = [v for _, v in self.rows.values()]
            self._arrays = (pks, np.vstack(vectors) if vectors else np.zeros((0, 1), np.float32))
        return self._arrays


@dataclass(frozen=True)
class Hit:
    """One search result."""

    id: str
    score: float
    text: str
    metadata: dict[str, Any]
    parent_id: str | None = None
    chunk_index: int | None = None


class Searcher:
    """Searches the collections of one store (one per process is enough)."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.indexes = IndexCache(store, settings.data_dir)
        self._deltas: dict[str, _Delta] = {}
        self._delta_lock = threading.Lock()

    def search(
        self,
        vector: np.ndarray,
        collection: str,
        k: int = 10,
        where: dict[str, Any] | None = None,
        parents: bool = False,
    ) -> list[Hit]:
        """The ``k`` items nearest to ``vector`` (cosine), best first."""
        check_k(k)
        parse_collection(collection)
        query = normalize(np.asarray(vector, dtype=np.float32).reshape(1, -1))
        if where:
            allowed = self.store.filter_pks(collection, where)
            if len(allowed) <= EXACT_FILTER_LIMIT:
                return self._exact(query, collection, allowed, k, parents)
        else:
            allowed = None
        fetch = k * 3 + 16 if not parents else k * 10 + 16
        while True:
            candidates, exhausted = self._candidates(query, collection, fetch)
            hits = self._hits(collection, candidates, allowed, k, parents)
            if len(hits) >= k or exhausted:
                return hits
            fetch *= 4

    def _candidates(
        self, query: np.ndarray, collection: str, fetch: int
    ) -> tuple[dict[int, float], bool]:
        loaded = self.indexes.get(collection)
        delta_pks, delta_vectors = self._delta(collection, loaded)
        scores: dict[int, float] = {}
        exhausted = True
        if loaded is not None:
            labels, sims = loaded.index.query(query, fetch)
            fresh = set(delta_pks.tolist())
            scores = {
                int(p): float(s)
                for p, s in zip(labels[0], sims[0], strict=True)
                if int(p) not in fresh
            }
            exhausted = labels.shape[1] >= len(loaded.index)
        labels, sims = exact_top_k(query, delta_vectors, delta_pks, fetch)
        scores.update({int(p): float(s) for p, s in zip(labels[0], sims[0], strict=True)})
        return scores, exhausted

    def _delta(self, collection: str, loaded: LoadedIndex | None) -> tuple[np.ndarray, np.ndarray]:
        """Rows the index does not hold at their current version, kept up to date cheaply:
        after the first read, only rows stamped within ``RECENT_LOOKBACK`` of the previous
        read are read again (hosts' clocks must agree to within that, e.g. by NTP)."""
        version = loaded.version if loaded else None
        with self._delta_lock:
            delta = self._deltas.get(collection)
            if delta is None or delta.version != version:
                start = loaded.built_at - DELTA_MARGIN if loaded else EPOCH
                delta = self._deltas[collection] = _Delta(version, start)
            read_at = datetime.now(UTC)
            pks, stamps = self.store.stamps(collection, delta.watermark)
            keep = ~loaded.covers(pks, stamps) if loaded else np.ones(len(pks), dtype=bool)
            changed = {
                int(p): int(s)
                for p, s in zip(pks[keep], stamps[keep], strict=True)
                if delta.rows.get(int(p), (None,))[0] != int(s)
            }
            delta.add(changed, self.store.by_pk(collection, list(changed)) if changed else [])
            # Next time read only what changed since shortly before this read.
            delta.watermark = max(delta.watermark, read_at - RECENT_LOOKBACK)
            return delta.arrays()

    def _hits(
        self,
        collection: str,
        scores: dict[int, float],
        allowed: np.ndarray | None,
        k: int,
        parents: bool,
    ) -> list[Hit]:
        if allowed is not None:
            keep = set(allowed.tolist())
            scores = {p: s for p, s in scores.items() if p in keep}
        ranked = sorted(scores.items(), key=lambda kv: -kv[1])
        items = {item.pk: item for item in self.store.by_pk(collection, [p for p, _ in ranked])}
        hits = [_hit(items[p], s) for p, s in ranked if p in items]
        return _top(hits, k, parents)

    def _exact(
        self, query: np.ndarray, collection: str, allowed: np.ndarray, k: int, parents: bool
    ) -> list[Hit]:
        items = self.store.by_pk(collection, allowed)
        if not items:
            return []
        vectors = np.vstack([item.vector for item in items])
        sims = (normalize(vectors) @ query[0]).tolist()
        hits = sorted(
            (_hit(item, s) for item, s in zip(items, sims, strict=True)), key=lambda h: -h.score
        )
        return _top(hits, k, parents)


def check_k(k: int) -> None:
    """k must be 1..1000."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise InvalidInputError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")


def _hit(item: Item, score: float) -> Hit:
    return Hit(item.id, round(score, 6), item.text, item.metadata, item.parent_id, item.chunk_index)


def _top(hits: list[Hit], k: int, parents: bool) -> list[Hit]:
    if not parents:
        return hits[:k]
    seen: dict[str, Hit] = {}
    for hit in hits:
        seen.setdefault(hit.parent_id or hit.id, hit)
    return list(seen.values())[:k]


_lock = threading.Lock()
_searcher: Searcher | None = None


def get_searcher() -> Searcher:
    """This process's searcher over the configured store."""
    global _searcher
    with _lock:
        if _searcher is None:
            settings = get_settings()
            _searcher = Searcher(create_store(settings.database_url), settings)
        return _searcher


def embed_query(text: str, timeout_s: float = 60.0) -> np.ndarray:
    """The query's vector, through the queue (and so through the cache)."""
    from embedq.tasks import embed_texts

    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError("the query must be a non-empty string")
    return np.asarray(get_and_forget(embed_texts.delay([text]), timeout_s))[0]


def search(
    text: str,
    collection: str,
    k: int = 10,
    where: dict[str, Any] | None = None,
    parents: bool = False,
) -> list[Hit]:
    """Items of ``collection`` nearest to ``text``; ``where`` filters on metadata equality.

    With ``parents=True``, chunks of one document count once (best chunk), so each hit
    stands for a whole document (``parent_id``).
    """
    check_k(k)
    parse_collection(collection)
    return get_searcher().search(embed_query(text), collection, k, where, parents)


def lookup(text: str, collection: str, threshold: float = 0.9) -> Hit | None:
    """The nearest stored item if its cosine similarity is at least ``threshold``, else None.

    The semantic-cache use: store an answer in metadata, reuse it for near-identical questions.
    """
    hits = search(text, collection, k=1)
    return hits[0] if hits and hits[0].score >= threshold else None
