"""HNSW index: build, recall gate, publish to other hosts, freshness, deletes, rebuild races."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest
from sqlalchemy import event

from embedq.errors import ConfigurationError
from embedq.search import build as indexes
from embedq.search.base import normalize
from embedq.search.build import blob_name, build_index, rebuild_changed
from embedq.search.exact import exact_top_k, recall_check
from embedq.search.factory import create_index
from embedq.search.hnsw import HNSWIndex
from embedq.search.loader import IndexCache
from embedq.search.searcher import Searcher
from embedq.settings import Settings
from embedq.store.base import Item
from embedq.store.factory import create_store
from tests.helpers import clustered, items_of

DIM = 32


def _clustered(n: int, seed: int) -> np.ndarray:
    return clustered(n, seed, DIM, clusters=50)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    url = (
        f"sqlite:///{tmp_path / 'idx.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    s = create_store(url)
    yield s
    s.close()


def _searcher(store, tmp_path, name="host-a") -> Searcher:
    return Searcher(store, Settings(data_dir=tmp_path / name))


def test_hnsw_recall_against_exact_search():
    vectors = _clustered(5000, 0)
    labels = np.arange(5000, dtype=np.int64) * 7
    index = HNSWIndex(DIM, ef=16)
    index.build(labels, vectors)
    # New queries around the same centres, never stored: a narrow search finds fewer.
    check = recall_check(normalize(vectors), labels, _clustered(300, 5))
    narrow = check.recall(index, normalize(vectors), labels)
    index.ef = 256
    assert narrow < check.recall(index, normalize(vectors), labels) >= 0.98
    found, sims = index.query(vectors[:1], 1)
    assert found[0, 0] == 0 and sims[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_exact_index_is_a_backend_that_saves_loads_and_matches_exact_search(tmp_path):
    vectors = _clustered(500, 12)
    labels = np.arange(500, dtype=np.int64) + 1000
    index = create_index("exact", DIM)
    index.build(labels, vectors)
    index.save(tmp_path / "exact.npz")
    loaded = create_index("exact", DIM)
    loaded.load(tmp_path / "exact.npz")
    found, sims = loaded.query(vectors[:5], 10)
    truth, truth_sims = exact_top_k(vectors[:5], vectors, labels, 10)
    assert len(loaded) == 500 and (found == truth).all()
    assert np.allclose(sims, truth_sims, atol=1e-5)
    check = recall_check(normalize(vectors), labels, _clustered(50, 13))
    assert check.recall(loaded, normalize(vectors), labels) == 1.0
    with pytest.raises(ConfigurationError, match="hnsw, exact"):
        create_index("annoy", DIM)


def test_exact_top_k_orders_by_cosine():
    vectors = np.array([[1, 0], [0.7, 0.7], [0, 1]], dtype=np.float32)
    labels, sims = exact_top_k(
        np.array([[1, 0.1]], dtype=np.float32), vectors, np.array([5, 6, 7]), 2
    )
    assert labels.tolist() == [[5, 6]]
    assert sims[0, 0] > sims[0, 1]


def test_build_publish_and_load_on_another_host(store, tmp_path):
    collection = f"c-{uuid.uuid4().hex[:8]}"
    vectors = _clustered(2000, 1)
    store.upsert(items_of(collection, vectors))
    version, meta = build_index(store, collection, tmp_path / "builder")
    assert meta["count"] == 2000 and meta["recall_at_10"] >= 0.98
    # A host that never built anything fetches the published version from the store.
    other = _searcher(store, tmp_path, "host-b")
    hits = other.search(vectors[42], collection, k=3)
    assert hits[0].id == "id-42" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert other.indexes.get(collection).version == version
    assert (tmp_path / "host-b" / "index").is_dir()


def test_new_updated_and_deleted_items_are_fresh_before_a_rebuild(store, tmp_path):
    collection = f"c-{uuid.uuid4().hex[:8]}"
    vectors = _clustered(1000, 2)
    store.upsert(items_of(collection, vectors))
    build_index(store, collection, tmp_path / "b")
    searcher = _searcher(store, tmp_path)
    new = _clustered(1, 99)[0]
    store.upsert(items_of(collection, np.array([new]), prefix="new"))
    assert searcher.search(new, collection, k=1)[0].id == "new-0"
    moved = -vectors[7]
    store.upsert([Item(collection, "id-7", "moved", moved, "m@1", "h")])
    top = searcher.search(moved, collection, k=1)[0]
    assert top.id == "id-7" and top.text == "moved"
    store.delete(collection, ["id-8"])
    assert all(h.id != "id-8" for h in searcher.search(vectors[8], collection, k=10))


def test_where_filter_and_parents(store, tmp_path):
    collection = f"c-{uuid.uuid4().hex[:8]}"
    vectors = _clustered(300, 3)
    store.upsert(items_of(collection, vectors))
    hits = _searcher(store, tmp_path).search(vectors[0], collection, k=5, where={"group": 1})
    assert len(hits) == 5 and all(h.metadata["group"] == 1 for h in hits)


def test_a_narrow_filter_runs_once_however_deep_the_search_looks(db_url, tmp_path):
    store = create_store(db_url)
    collection = f"c-{uuid.uuid4().hex[:8]}"
    vectors = _clustered(600, 3)
    store.upsert(items_of(collection, vectors))
    build_index(store, collection, tmp_path / "b")
    filtering: list[str] = []

    def seen(_conn, _cursor, sql: str, *_: object) -> None:
        # The filter is the only condition on metadata a search's statements hold.
        if "METADATA" in sql.upper().partition("WHERE")[2]:
            filtering.append(sql)

    event.listen(store.engine, "before_cursor_execute", seen)
    try:
        # 200 match: searched exactly among the keys the filter found, read back in pages.
        hits = _searcher(store, tmp_path).search(
            vectors[0], collection, k=150, where={"group": 1}, parents=True
        )
    finally:
        event.remove(store.engine, "before_cursor_execute", seen)
        store.close()
    assert len(hits) == 150 and all(h.metadata["group"] == 1 for h in hits)
    assert len(filtering) == 1, filtering


def test_rebuild_skips_unchanged_collections(store, tmp_path):
    collection = f"c-{uuid.uuid4().hex[:8]}"
    store.upsert(items_of(collection, _clustered(200, 4)))
    first = rebuild_changed(store, tmp_path, only=collection)
    assert isinstance(first[collection], dict)
    assert rebuild_changed(store, tmp_path, only=collection) == {collection: "unchanged"}
    store.delete(collection, ["id-1"])
    assert isinstance(rebuild_changed(store, tmp_path, only=collection)[collection], dict)


def test_a_failed_build_keeps_the_old_index(store, tmp_path, monkeypatch):
    collection = f"c-{uuid.uuid4().hex[:8]}"
    vectors = _clustered(500, 5)
    store.upsert(items_of(collection, vectors))
    version, _ = build_index(store, collection, tmp_path)
    store.upsert(items_of(collection, _clustered(10, 6), prefix="more"))
    monkeypatch.setattr(indexes, "RECALL_TARGET", 1.01)  # no index can pass
    report = rebuild_changed(store, tmp_path, only=collection)
    assert report[collection].startswith("failed: IndexQualityError: recall@10")
    assert store.blob_version(blob_name(collection))[0] == version
    assert _searcher(store, tmp_path).search(vectors[3], collection, k=1)[0].id == "id-3"


def test_rebuild_during_searches_never_fails_or_returns_deleted(store, tmp_path):
    collection = f"c-{uuid.uuid4().hex[:8]}"
    vectors = _clustered(1500, 7)
    store.upsert(items_of(collection, vectors))
    build_index(store, collection, tmp_path / "builder")
    searcher = Searcher(store, Settings(data_dir=tmp_path / "reader"))
    searcher.indexes.check_interval_s = 0.0  # look for new versions on every search
    deleted: set[str] = set()
    errors: list[BaseException] = []
    stale: list[str] = []
    stop = threading.Event()
    searches = 0

    def search_loop() -> None:
        nonlocal searches
        rng = np.random.default_rng(8)
        while not stop.is_set():
            gone = set(deleted)
            try:
                hits = searcher.search(vectors[rng.integers(0, 1500)], collection, k=10)
            except BaseException as exc:
                errors.append(exc)
                return
            stale.extend(h.id for h in hits if h.id in gone)
            searches += 1

    thread = threading.Thread(target=search_loop)
    thread.start()
    try:
        for round_ in range(3):
            ids = [f"id-{i}" for i in range(round_ * 50, round_ * 50 + 50)]
            store.delete(collection, ids)
            deleted.update(ids)
            build_index(store, collection, tmp_path / "builder")
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors
    assert not stale, f"deleted ids returned: {stale[:5]}"
    assert searches > 10
    assert IndexCache(store, tmp_path / "x").get(collection).version == 4


def _legacy_sqlite_table(url: str) -> None:
    """The items table as releases before the fix created it: SQLite may reuse row keys."""
    from sqlalchemy import create_engine
    from sqlalchemy.dialects import sqlite
    from sqlalchemy.schema import CreateTable

    from embedq.store.sql import ItemRow

    ddl = str(CreateTable(ItemRow.__table__).compile(dialect=sqlite.dialect()))
    assert "AUTOINCREMENT" in ddl
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(ddl.replace(" AUTOINCREMENT", ""))
    engine.dispose()


@pytest.mark.parametrize("legacy", [False, True], ids=["new-table", "legacy-table"])
def test_a_key_freed_in_one_collection_never_leaks_into_another(tmp_path, legacy):
    """Delete the newest item of A, insert a private item into B (old SQLite tables could
    hand it A's freed row key), all before the next rebuild: a search of A never returns
    B's item."""
    url = f"sqlite:///{tmp_path / 'leak.db'}"
    if legacy:
        _legacy_sqlite_table(url)
    store = create_store(url)
    vectors = _clustered(200, 11)
    store.upsert(items_of("a", vectors))
    build_index(store, "a", tmp_path / "builder")
    last = max(item.pk for item in store.get("a", [f"id-{i}" for i in range(200)]))
    store.delete("a", ["id-199"])
    store.upsert([Item("b", "private", "secret", vectors[199], "m@1", "h")])
    private = store.get("b", ["private"])[0]
    # Legacy tables are rebuilt with AUTOINCREMENT when the store opens them (migration 0002).
    assert private.pk != last, "SQLite reused a freed row key"
    assert store.by_pk("a", [private.pk]) == []
    assert [i.id for i in store.by_pk("b", [private.pk])] == ["private"]
    for searcher in (_searcher(store, tmp_path), _searcher(store, tmp_path, "host-b")):
        hits = searcher.search(vectors[199], "a", k=10)
        assert hits and all(h.id != "private" and h.text != "secret" for h in hits)
        hits = searcher.search(vectors[199], "a", k=5, where={"group": 199 % 3})
        assert all(h.id != "private" for h in hits)
    store.close()
