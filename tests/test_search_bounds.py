"""Search memory is bounded whatever the filter or the collection's size (real SQLite and
Postgres stores): exact search streams (row key, vector) pages, every statement binds few
keys, the over-fetch is capped, and the per-collection caches keep a set number."""

from __future__ import annotations

import tracemalloc
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy import event, update

from embedq.search import searcher as searching
from embedq.search.build import build_index
from embedq.search.searcher import Searcher
from embedq.settings import Settings
from embedq.store.base import Item
from embedq.store.factory import create_store
from embedq.store.sql import ItemRow

DIM = 8
N = 40_000
IN_GROUP_B = 30_000
# SQLite's default bound-variable limit (SQLITE_MAX_VARIABLE_NUMBER since 3.32; Debian's
# build raises it, most others do not): no statement of a search may bind more.
SQLITE_DEFAULT_MAX_VARIABLES = 32_766


def _data() -> tuple[np.ndarray, list[str]]:
    """Group a (10,000 items) crowds around e0; group b (30,000) lies elsewhere, so a query
    near e0 filtered to b finds nothing in the index's top few thousand."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(N, DIM)).astype(np.float32)
    groups = ["b"] * IN_GROUP_B + ["a"] * (N - IN_GROUP_B)
    vectors[IN_GROUP_B:] = 0.05 * vectors[IN_GROUP_B:]
    vectors[IN_GROUP_B:, 0] += 1.0
    vectors[:IN_GROUP_B, 0] = -np.abs(vectors[:IN_GROUP_B, 0])
    return vectors, groups


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One 40,000-item collection on SQLite, written once for the module."""
    folder = tmp_path_factory.mktemp("bounds")
    store = create_store(f"sqlite:///{folder / 'big.db'}")
    vectors, groups = _data()
    items = [
        Item("big", f"id-{i}", f"text {i} " + "x" * 200, v, "m@1", f"h{i}", {"g": g, "i": i})
        for i, (v, g) in enumerate(zip(vectors, groups, strict=True))
    ]
    store.upsert(items)
    # Written an hour ago, as a real collection's rows mostly are: searches then re-read
    # only the last seconds' update stamps, and what a search allocates is its own.
    with store.engine.begin() as conn:
        an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
        conn.execute(update(ItemRow).values(updated_at=an_hour_ago))
    yield {"store": store, "vectors": vectors, "groups": np.array(groups), "dir": folder}
    store.close()


def _exact(vectors: np.ndarray, mask: np.ndarray, query: np.ndarray, k: int) -> list[str]:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = unit @ (query / np.linalg.norm(query))
    scores[~mask] = -np.inf
    return [f"id-{i}" for i in np.argsort(-scores)[:k]]


class _Bindings:
    """The most bound parameters any one statement of the store used, while active."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.most = 0

        self.filtering = 0

    def _seen(self, _conn: Any, _cursor: Any, sql: str, params: Any, *_: Any) -> None:
        batch = params if isinstance(params, list) else [params]
        self.most = max(self.most, max((len(p or ()) for p in batch), default=0))
        # Statements that evaluate a metadata filter (SQLite reads metadata with json_each).
        self.filtering += "json_each" in sql

    def __enter__(self) -> _Bindings:
        event.listen(self.engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *_: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)


def _search(searcher: Searcher, query: np.ndarray, **kwargs: Any) -> tuple[list[Any], int, int]:
    """Hits, the most bound parameters of one statement, and the peak of new allocations."""
    with _Bindings(searcher.store.engine) as bindings:
        tracemalloc.start()
        try:
            hits = searcher.search(query, "big", **kwargs)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    return hits, bindings.most, peak


@pytest.mark.parametrize("indexed", [False, True], ids=["before-a-build", "with-an-index"])
def test_a_filter_matching_30000_of_40000_items_is_searched_in_bounded_memory(
    big, indexed, redis_client
):
    store, vectors, groups = big["store"], big["vectors"], big["groups"]
    if indexed:
        build_index(store, "big", big["dir"] / "builder")
    searcher = Searcher(store, Settings(data_dir=big["dir"] / f"reader-{indexed}"))
    query = np.eye(DIM, dtype=np.float32)[0]  # near group a: b's best are far down the index
    # The first search fills the delta (before a build: every row's vector, a cache bounded
    # by DELTA_MAX_ROWS); what one search itself allocates is measured on the next.
    _, most_bound, first_peak = _search(searcher, query, k=10, where={"g": "b"})
    hits, most_bound, peak = _search(searcher, query, k=10, where={"g": "b"})
    print(
        f"indexed={indexed}: <= {most_bound} bound per statement, peak {peak / 2**20:.1f} MiB "
        f"(first search, filling the delta: {first_peak / 2**20:.1f} MiB)"
    )
    assert [h.id for h in hits] == _exact(vectors, groups == "b", query, 10)
    assert all(h.metadata["g"] == "b" for h in hits)
    assert most_bound <= SQLITE_DEFAULT_MAX_VARIABLES
    # The 30,000 matching items read whole would take ~35 MiB; pages of keys and vectors ~1.
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MiB"

    hits, most_bound, _ = _search(searcher, vectors[123], k=5)
    assert hits[0].id == "id-123" and most_bound <= SQLITE_DEFAULT_MAX_VARIABLES
    with _Bindings(store.engine) as bindings:
        hits = searcher.search(query, "big", k=10, where={"g": "a"})  # 10,000: exact
    assert [h.id for h in hits] == _exact(vectors, groups == "a", query, 10)
    # The filter ran once (counting the keys); the exact scan read vectors of those keys.
    assert bindings.filtering == 1


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Any]:
    url = (
        f"sqlite:///{tmp_path / 'small.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    s = create_store(url)
    yield s
    s.close()


def _collection(store: Any, n: int, seed: int) -> tuple[str, np.ndarray]:
    name = f"lru-{uuid.uuid4().hex[:8]}"
    vectors = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    store.upsert(
        [
            Item(name, f"id-{i}", f"{name} {i}", v, "m@1", "h", {"odd": i % 2})
            for i, v in enumerate(vectors)
        ]
    )
    return name, vectors


@pytest.mark.usefixtures("redis_client")
def test_per_collection_caches_keep_the_configured_number(store, tmp_path):
    searcher = Searcher(store, Settings(data_dir=tmp_path, search_collections_kept=2))
    searcher.indexes.check_interval_s = 0.0
    made = [_collection(store, 300, seed) for seed in range(4)]
    for name, _ in made[:2]:
        build_index(store, name, tmp_path / "builder")
    for _ in range(2):
        for name, vectors in made:
            hits = searcher.search(vectors[17], name, k=3)
            assert hits[0].id == "id-17" and hits[0].text == f"{name} 17"
            assert len(searcher._deltas) <= 2 and len(searcher.indexes._loaded) <= 2


@pytest.mark.usefixtures("redis_client")
def test_a_delta_over_its_cap_is_dropped_and_the_search_is_exact(store, tmp_path, monkeypatch):
    monkeypatch.setattr(searching, "DELTA_MAX_ROWS", 100)
    searcher = Searcher(store, Settings(data_dir=tmp_path))
    name, vectors = _collection(store, 500, 9)  # never indexed: all 500 rows are new
    query = vectors[42] + 0.01
    hits = searcher.search(query, name, k=5, where={"odd": 0})
    assert [h.id for h in hits] == _exact(vectors, np.arange(500) % 2 == 0, query, 5)
    assert searcher.search(query, name, k=1)[0].id == "id-42"
    assert name not in searcher._deltas
    build_index(store, name, tmp_path / "builder")
    assert searcher.search(query, name, k=1)[0].id == "id-42"
    assert name in searcher._deltas, "with an index, the few new rows fit"


@pytest.mark.usefixtures("redis_client")
def test_past_the_exact_limit_and_the_fetch_cap_the_search_is_still_exact(
    store, tmp_path, monkeypatch
):
    """Small limits stand in for 20,000 and 4,096 so both databases walk every path: the
    exact scan abandoned past its limit, the capped over-fetch, the streamed exact search."""
    monkeypatch.setattr(searching, "EXACT_FILTER_LIMIT", 100)
    monkeypatch.setattr(searching, "MAX_FETCH", 64)
    monkeypatch.setattr(searching, "PAGE", 50)
    name, vectors = _collection(store, 1200, 12)
    vectors[:600] = np.abs(vectors[:600])  # the even items are spread over both halves
    store.upsert(
        [
            Item(name, f"id-{i}", f"{name} {i}", v, "m@1", "h", {"odd": i % 2, "low": i < 600})
            for i, v in enumerate(vectors)
        ]
    )
    build_index(store, name, tmp_path / "builder")
    searcher = Searcher(store, Settings(data_dir=tmp_path))
    query = np.ones(DIM, dtype=np.float32)  # nearest: the low half, which the filter excludes
    for where in ({"low": False}, {"low": False, "odd": 1}):
        mask = np.arange(1200) >= 600
        if "odd" in where:
            mask &= np.arange(1200) % 2 == 1
        hits = searcher.search(query, name, k=7, where=where)
        assert [h.id for h in hits] == _exact(vectors, mask, query, 7), where
    hits = searcher.search(query, name, k=5, parents=True)
    assert [h.id for h in hits] == _exact(vectors, np.ones(1200, bool), query, 5)
