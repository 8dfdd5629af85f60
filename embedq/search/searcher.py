"""Search a collection: the published HNSW index plus an exact delta of recent writes.

Hits are always read back from the store, so a deleted item is never returned, and an item
updated since the index was built is scored with its new vector (it is in the delta).

Memory is bounded whatever the filter or the collection's size: exact search streams
(row key, vector) pages and keeps a running top-k; the index is over-fetched at most
``MAX_FETCH`` deep, with the filter checked in the database on the candidates only; every IN
list holds at most ``PAGE`` keys; the delta holds at most ``DELTA_MAX_ROWS`` rows; and the
per-collection caches keep ``EMBEDQ_SEARCH_COLLECTIONS_KEPT`` collections.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from cachetools import LRUCache

from embedq.broker.client import shared_client
from embedq.broker.results import get_and_forget
from embedq.errors import InvalidInputError
from embedq.inputs import parse_collection
from embedq.search.base import normalize
from embedq.search.exact import exact_top_k
from embedq.search.loader import DELTA_MARGIN, IndexCache, LoadedIndex
from embedq.search.queries import remember
from embedq.settings import Settings, get_settings
from embedq.store.base import Item, Store
from embedq.store.factory import create_store
from embedq.store.filters import Filter, parse_where

log = logging.getLogger(__name__)

MAX_K = 1000
# Metadata filters that match at most this many items are searched exactly.
EXACT_FILTER_LIMIT = 20_000
# Deepest over-fetch from the index; past it, the search is exact (streamed).
MAX_FETCH = 4096
# Keys per IN list and rows per page: far below SQLite's 32,766 bound variables.
PAGE = 1000
# Rows a delta may hold (a collection with more unindexed rows is searched exactly).
DELTA_MAX_ROWS = 100_000


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Writes commit a little after they are stamped (by the writer's clock); re-reading this
# far before the previous read catches them.
RECENT_LOOKBACK = timedelta(seconds=30)


@dataclass
class _Delta:
    version: int | None
    dim: int
    watermark: datetime
    rows: dict[int, tuple[int, np.ndarray]] = field(default_factory=dict)
    _arrays: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, stamps: dict[int, int], pks: np.ndarray, vectors: np.ndarray) -> None:
        for pk, vector in zip(pks.tolist(), vectors, strict=True):
            self.rows[pk] = (stamps[pk], vector.copy())
        if len(pks):
            self._arrays = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            pks = np.fromiter(self.rows, dtype=np.int64, count=len(self.rows))
            vectors = [v for _, v in self.rows.values()]
            empty = np.zeros((0, self.dim), np.float32)
            self._arrays = (pks, np.vstack(vectors) if vectors else empty)
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
        kept = settings.search_collections_kept
        self.indexes = IndexCache(store, settings.data_dir, keep=kept)
        self._deltas: LRUCache[str, _Delta] = LRUCache(maxsize=kept)
        self._delta_lock = threading.Lock()

    def search(
        self,
        vector: np.ndarray,
        collection: str,
        k: int = 10,
        where: Filter | dict[str, Any] | None = None,
        parents: bool = False,
    ) -> list[Hit]:
        """The ``k`` items nearest to ``vector`` (cosine), best first, among those whose
        metadata passes ``where`` (see :mod:`embedq.store.filters`)."""
        check_k(k)
        parse_collection(collection)
        parsed = parse_where(where)
        query = normalize(np.asarray(vector, dtype=np.float32).reshape(1, -1))
        if parsed is not None and (keys := self._narrow(collection, parsed)) is not None:
            # Searched exactly among the keys counted: the filter runs once, not again in
            # the scan or its retries.
            return self._exact(query, collection, k, parents, among=keys)
        hits = self._approximate(query, collection, k, parents, parsed)
        if hits is not None:
            return hits
        return self._exact(query, collection, k, parents, where=parsed)

    def _narrow(self, collection: str, where: Filter) -> np.ndarray | None:
        """The keys matching ``where`` if at most ``EXACT_FILTER_LIMIT`` (reading no vector);
        None for a broader filter."""
        keys = self.store.filter_pks(collection, where, limit=EXACT_FILTER_LIMIT + 1)
        return keys if len(keys) <= EXACT_FILTER_LIMIT else None

    def _approximate(
        self,
        query: np.ndarray,
        collection: str,
        k: int,
        parents: bool,
        where: Filter | None,
    ) -> list[Hit] | None:
        """Over-fetch from index + delta until k hits pass; None past ``MAX_FETCH``."""
        fetch = k * 3 + 16 if not parents else k * 10 + 16
        cap = max(MAX_FETCH, fetch)
        loaded = self.indexes.get(collection)
        delta = self._delta(collection, loaded, query.shape[1])
        if delta is None:
            return None
        while True:
            candidates, exhausted = self._candidates(query, loaded, delta, fetch)
            if where is not None:
                candidates = self._matching(collection, candidates, where)
            hits = self._hits(collection, candidates, k, parents)
            if len(hits) >= k or exhausted:
                return hits
            if fetch >= cap:
                return None
            fetch = min(fetch * 4, cap)

    def _candidates(
        self,
        query: np.ndarray,
        loaded: LoadedIndex | None,
        delta: tuple[np.ndarray, np.ndarray],
        fetch: int,
    ) -> tuple[dict[int, float], bool]:
        delta_pks, delta_vectors = delta
        scores: dict[int, float] = {}
        exhausted = True
        if loaded is not None and loaded.index.dim == query.shape[1]:
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
        return scores, exhausted and len(delta_pks) <= fetch

    def _delta(
        self, collection: str, loaded: LoadedIndex | None, dim: int
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Rows the index does not hold at their current version, kept up to date cheaply:
        after the first read, only rows stamped within ``RECENT_LOOKBACK`` of the previous
        read are read again (hosts' clocks must agree to within that, e.g. by NTP).
        None when there are more than ``DELTA_MAX_ROWS`` (then the search is exact)."""
        version = loaded.version if loaded else None
        with self._delta_lock:
            delta = self._deltas.get(collection)
            if delta is None or delta.version != version or delta.dim != dim:
                start = loaded.built_at - DELTA_MARGIN if loaded else EPOCH
                delta = self._deltas[collection] = _Delta(version, dim, start)
            read_at = datetime.now(UTC)
            pks, stamps = self.store.stamps(collection, delta.watermark)
            keep = ~loaded.covers(pks, stamps) if loaded else np.ones(len(pks), dtype=bool)
            changed = {
                int(p): int(s)
                for p, s in zip(pks[keep], stamps[keep], strict=True)
                if delta.rows.get(int(p), (None,))[0] != int(s)
            }
            if len(delta.rows) + len(changed) > DELTA_MAX_ROWS:
                del self._deltas[collection]
                log.warning("%s: over %d rows not in its index: exact", collection, DELTA_MAX_ROWS)
                return None
            for page_pks, vectors in self.store.vectors(collection, dim, among=list(changed)):
                delta.add(changed, page_pks, vectors)
            # Next time read only what changed since shortly before this read.
            delta.watermark = max(delta.watermark, read_at - RECENT_LOOKBACK)
            return delta.arrays()

    def _matching(
        self, collection: str, candidates: dict[int, float], where: Filter
    ) -> dict[int, float]:
        """The candidates that match ``where``, as the database evaluates it."""
        keep = set(self.store.filter_pks(collection, where, among=list(candidates)).tolist())
        return {p: s for p, s in candidates.items() if p in keep}

    def _hits(self, collection: str, scores: dict[int, float], k: int, parents: bool) -> list[Hit]:
        """The best candidates read back from the store (a page of keys at a time)."""
        ranked = sorted(scores.items(), key=lambda kv: -kv[1])
        hits: list[Hit] = []
        for start in range(0, len(ranked), PAGE):
            page = ranked[start : start + PAGE]
            items = {i.pk: i for i in self.store.by_pk(collection, [p for p, _ in page])}
            hits.extend(_hit(items[p], s) for p, s in page if p in items)
            if len(_top(hits, k, parents)) >= k:
                break
        return _top(hits, k, parents)

    def _exact(
        self,
        query: np.ndarray,
        collection: str,
        k: int,
        parents: bool,
        where: Filter | None = None,
        among: np.ndarray | None = None,
    ) -> list[Hit]:
        """Exact search over the store: the rows matching ``where``, or those among the row
        keys ``among`` (already filtered)."""
        keep = k if not parents else k * 10 + 16
        while True:
            ranked = self._scan(query, collection, keep, where, among)
            hits = self._hits(collection, ranked, k, parents)
            if len(hits) >= k or len(ranked) < keep:
                return hits
            keep *= 4  # deleted meanwhile, or chunks of too few parents: look deeper

    def _scan(
        self,
        query: np.ndarray,
        collection: str,
        keep: int,
        where: Filter | None,
        among: np.ndarray | None,
    ) -> dict[int, float]:
        """The ``keep`` best (row key, score) of a streamed scan."""
        best_pks, best = np.zeros(0, np.int64), np.zeros(0, np.float32)
        pages = self.store.vectors(collection, query.shape[1], where, among)
        with contextlib.closing(pages):
            for pks, vectors in pages:
                best_pks = np.concatenate([best_pks, pks])
                best = np.concatenate([best, normalize(vectors) @ query[0]])
                if len(best) > keep:
                    top = np.argpartition(-best, keep - 1)[:keep]
                    best_pks, best = best_pks[top], best[top]
        return dict(zip(best_pks.tolist(), best.tolist(), strict=True))


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


def check_query(text: Any) -> None:
    """A query is a non-empty string."""
    if not isinstance(text, str) or not text:
        raise InvalidInputError("the query must be a non-empty string")


def embed_query(text: str, timeout_s: float = 60.0, model: str | None = None) -> np.ndarray:
    """The query's vector, through the queue (and so through the cache), by ``model``: an
    interactive task whose deadline is ``timeout_s``."""
    from embedq.tasks import embed_texts

    check_query(text)
    sent = embed_texts.apply_async(
        ([text],), {"model": model}, traffic="interactive", deadline_s=timeout_s
    )
    return np.asarray(get_and_forget(sent, timeout_s))[0]


def search(
    text: str,
    collection: str,
    k: int = 10,
    where: dict[str, Any] | None = None,
    parents: bool = False,
) -> list[Hit]:
    """Items of ``collection`` nearest to ``text``; ``where`` filters on metadata (see
    :mod:`embedq.store.filters`; checked before the query is embedded). The query's vector
    joins the collection's sample of recent queries (:mod:`embedq.search.queries`).

    With ``parents=True``, chunks of one document count once (best chunk), so each hit
    stands for a whole document (``parent_id``).
    """
    check_k(k)
    parse_collection(collection)
    parsed = parse_where(where)
    check_query(text)
    searcher = get_searcher()
    # The query is embedded by the model the collection is bound to.
    model = searcher.store.collection_model(collection)
    if model is None and not searcher.store.count(collection):
        return []  # nothing was ever stored there: no hits, and no query to embed
    query = embed_query(text, model=model)
    # Its index build tunes on queries like this one (embedq.search.queries).
    remember(shared_client(), collection, query)
    return searcher.search(query, collection, k, parsed, parents)


def lookup(text: str, collection: str, threshold: float = 0.9) -> Hit | None:
    """The nearest stored item if its cosine similarity is at least ``threshold``, else None.

    The semantic-cache use: store an answer in metadata, reuse it for near-identical questions.
    """
    hits = search(text, collection, k=1)
    return hits[0] if hits and hits[0].score >= threshold else None
