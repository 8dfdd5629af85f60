"""Search a collection: the published HNSW index plus an exact delta of recent writes.

Hits are always read back from the store, so a deleted item is never returned, and an item
updated since the index was built is scored with its new vector (it is in the delta).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedq.errors import InvalidInputError
from embedq.indexes import DELTA_MARGIN, IndexCache
from embedq.settings import Settings, get_settings
from embedq.storage import Item, Store, create_store
from embedq.storage.index import exact_top_k, normalize

MAX_K = 1000
# Metadata filters that match at most this many items are searched exactly.
EXACT_FILTER_LIMIT = 20_000


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
        query = normalize(np.asarray(vector, dtype=np.float32).reshape(1, -1))
        if where:
            allowed = self.store.filter_pks(collection, where)
            if len(allowed) <= EXACT_FILTER_LIMIT:
                return self._exact(query, allowed, k, parents)
        else:
            allowed = None
        fetch = k * 3 + 16 if not parents else k * 10 + 16
        while True:
            candidates, exhausted = self._candidates(query, collection, fetch)
            hits = self._hits(candidates, allowed, k, parents)
            if len(hits) >= k or exhausted:
                return hits
            fetch *= 4

    def _candidates(
        self, query: np.ndarray, collection: str, fetch: int
    ) -> tuple[dict[int, float], bool]:
        loaded = self.indexes.get(collection)
        since = loaded.built_at - DELTA_MARGIN if loaded else None
        delta = self.store.snapshot(collection, since=since)
        scores: dict[int, float] = {}
        exhausted = True
        if loaded is not None:
            labels, sims = loaded.index.query(query, fetch)
            fresh = set(delta.pks.tolist())
            scores = {
                int(p): float(s)
                for p, s in zip(labels[0], sims[0], strict=True)
                if int(p) not in fresh
            }
            exhausted = labels.shape[1] >= len(loaded.index)
        labels, sims = exact_top_k(query, delta.vectors, delta.pks, fetch)
        scores.update({int(p): float(s) for p, s in zip(labels[0], sims[0], strict=True)})
        return scores, exhausted

    def _hits(
        self, scores: dict[int, float], allowed: np.ndarray | None, k: int, parents: bool
    ) -> list[Hit]:
        if allowed is not None:
            keep = set(allowed.tolist())
            scores = {p: s for p, s in scores.items() if p in keep}
        ranked = sorted(scores.items(), key=lambda kv: -kv[1])
        items = {item.pk: item for item in self.store.by_pk([p for p, _ in ranked])}
        hits = [_hit(items[p], s) for p, s in ranked if p in items]
        return _top(hits, k, parents)

    def _exact(self, query: np.ndarray, allowed: np.ndarray, k: int, parents: bool) -> list[Hit]:
        items = self.store.by_pk(allowed)
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
    return np.asarray(embed_texts.delay([text]).get(timeout=timeout_s))[0]


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
    return get_searcher().search(embed_query(text), collection, k, where, parents)


def lookup(text: str, collection: str, threshold: float = 0.9) -> Hit | None:
    """The nearest stored item if its cosine similarity is at least ``threshold``, else None.

    The semantic-cache use: store an answer in metadata, reuse it for near-identical questions.
    """
    hits = search(text, collection, k=1)
    return hits[0] if hits and hits[0].score >= threshold else None
