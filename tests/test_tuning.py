"""The index build tunes ``ef`` on queries like the real ones: the collection's recent
queries (a capped, expiring Redis list each search feeds) when there are enough, else stored
vectors held out of the check; never on synthetic probes. ``embedq status`` shows the result."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest

from embedq.keys import query_sample_key
from embedq.ops.status import Report, read_indexes, render
from embedq.search.base import normalize
from embedq.search.build import build_index, rebuild_changed
from embedq.search.exact import recall_check
from embedq.search.hnsw import HNSWIndex
from embedq.search.queries import MIN_QUERIES, SAMPLE_SIZE, SAMPLE_TTL_S, recent, remember
from embedq.search.searcher import Searcher
from embedq.settings import Settings
from embedq.store.factory import create_store
from tests.helpers import clustered, items_of

DIM = 32


@pytest.fixture
def store(tmp_path):
    s = create_store(f"sqlite:///{tmp_path / 'tune.db'}")
    yield s
    s.close()


def _points(n: int, seed: int) -> np.ndarray:
    """``n`` vectors around the same 40 centres whatever the seed (new noise each seed),
    spread wide: at ef 16 an index finds ~0.90 of new points' neighbours (and ~0.99 of a
    stored point's, leaving the point itself out: such a check would stop at 16)."""
    centres = np.random.default_rng(100).normal(size=(40, DIM))
    rng = np.random.default_rng(seed)
    return (centres[rng.integers(0, 40, n)] + 1.5 * rng.normal(size=(n, DIM))).astype(np.float32)


def _between(vectors: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Queries halfway between two stored vectors of different clusters: far from all data,
    where an index needs a wider search than at any stored vector."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(vectors), (2, n))
    return (vectors[a] + vectors[b]) / 2


def test_the_sample_keeps_the_newest_queries_bounded_and_expiring(redis_client):
    collection = f"q-{uuid.uuid4().hex[:8]}"
    vectors = np.random.default_rng(1).normal(size=(SAMPLE_SIZE + 25, DIM)).astype(np.float32)
    for v in vectors:
        remember(redis_client, collection, v)
    kept = recent(redis_client, collection, DIM)
    assert kept.shape == (SAMPLE_SIZE, DIM)
    # Newest first; int8 with its own scale: cosine to the original above 0.999.
    cosines = (normalize(kept) * normalize(vectors[::-1][:SAMPLE_SIZE])).sum(axis=1)
    assert cosines.min() > 0.999
    assert 0 < redis_client.ttl(query_sample_key(collection)) <= SAMPLE_TTL_S
    assert recent(redis_client, collection, DIM + 1).shape == (0, DIM + 1)  # another width


def test_held_out_vectors_are_checked_outside_the_index_then_indexed(store, tmp_path, redis_client):
    collection = f"h-{uuid.uuid4().hex[:8]}"
    vectors = _points(3000, seed=4)
    store.upsert(items_of(collection, vectors))
    _, meta = build_index(store, collection, tmp_path, client=redis_client)
    assert (meta["tuned_on"], meta["tuned_queries"], meta["count"]) == ("held_out", 200, 3000)
    # Its estimate is that of queries it never held (in the graph, a stored vector is one
    # hop from its neighbours: a check on those would pass at almost any ef).
    fresh = _points(400, seed=5)  # same centres, new points
    real = _recall(vectors, fresh, meta["ef"])
    assert real >= 0.97 and abs(real - meta["recall_at_10"]) < 0.02, (real, meta)
    # The held-out items are in the published index all the same.
    searcher = Searcher(store, Settings(data_dir=tmp_path / "reader"))
    loaded = searcher.indexes.get(collection)
    assert len(loaded.index) == 3000
    found, _ = loaded.index.query(vectors, 1)
    assert (found[:, 0] == np.arange(3000) + 1).mean() > 0.999


def test_a_build_tunes_on_recent_queries_when_there_are_enough(store, tmp_path, redis_client):
    collection = f"t-{uuid.uuid4().hex[:8]}"
    vectors = clustered(5000, 7, DIM, clusters=50)
    store.upsert(items_of(collection, vectors))
    _, held = build_index(store, collection, tmp_path / "a", client=redis_client)
    assert held["tuned_on"] == "held_out" and held["tuned_queries"] == 200
    hard = _between(vectors, MIN_QUERIES + 50, seed=8)
    for q in hard[: MIN_QUERIES - 1]:
        remember(redis_client, collection, q)
    _, still = build_index(store, collection, tmp_path / "b", client=redis_client)
    assert still["tuned_on"] == "held_out"  # 99 queries: not enough yet
    for q in hard[MIN_QUERIES - 1 :]:
        remember(redis_client, collection, q)
    _, tuned = build_index(store, collection, tmp_path / "c", client=redis_client)
    assert tuned["tuned_on"] == "queries" and tuned["tuned_queries"] == MIN_QUERIES + 50
    # Queries far from the data need a wider search than stored vectors suggest; the ef
    # tuned on them holds on fresh queries of the same kind.
    assert tuned["ef"] > held["ef"], (held, tuned)
    assert _recall(vectors, _between(vectors, 300, seed=9), tuned["ef"]) >= 0.97
    lines = _status(store)
    assert f"ef {tuned['ef']} (recall@10 {tuned['recall_at_10']} on 150 recent queries)" in lines


def _recall(vectors: np.ndarray, queries: np.ndarray, ef: int) -> float:
    labels = np.arange(len(vectors), dtype=np.int64) + 1
    index = HNSWIndex(DIM, ef=ef)
    index.build(labels, vectors)
    return recall_check(normalize(vectors), labels, queries).recall(
        index, normalize(vectors), labels
    )


def _status(store: Any) -> str:
    report = Report(
        workers={},
        queue_depths={},
        texts_last_minute=0,
        requests_last_minute=0,
        cache_hit_rate=None,
        slos=[],
        indexes=read_indexes(store, Settings()),
    )
    return render(report)


def test_an_unchanged_collection_is_retuned_once_its_queries_arrive(store, tmp_path, redis_client):
    collection = f"r-{uuid.uuid4().hex[:8]}"
    vectors = _points(1000, seed=11)
    store.upsert(items_of(collection, vectors))

    def rebuild() -> Any:
        return rebuild_changed(store, tmp_path, only=collection, client=redis_client)[collection]

    assert rebuild()["tuned_on"] == "held_out"
    assert rebuild() == "unchanged"
    for q in _points(MIN_QUERIES, seed=12):
        remember(redis_client, collection, q)
    assert rebuild()["tuned_on"] == "queries"  # the same items, tuned on what users ask
    assert rebuild() == "unchanged"
