"""Index builds under contention and corruption, on a real store and a real Redis: one build
per collection at a time (a lock renewed while it runs), unique temp files, a sha256 checked
before loading, versions that only move forward, one bad collection failing alone."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime

import numpy as np
import pytest
from sqlalchemy import text

from embedq.broker.client import connect
from embedq.errors import IndexBuildBusyError, StaleVersionError
from embedq.keys import index_build_lock_key
from embedq.search.build import (
    blob_name,
    build_index,
    index_dir,
    rebuild_changed,
    sha256,
    unpack_blob,
    write_atomically,
)
from embedq.search.loader import IndexCache
from embedq.search.lock import BuildLock
from embedq.search.searcher import Searcher
from embedq.settings import Settings
from embedq.store.factory import create_store
from tests.helpers import clustered, items_of

DIM = 16


def _vectors(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    return clustered(n, seed, dim, clusters=20)


@pytest.mark.usefixtures("redis_client")
def test_two_concurrent_rebuilds_of_one_collection_publish_one_whole_version(db_url, tmp_path):
    """Two hosts (own store connection and data dir each) rebuild at the same instant."""
    collection = f"race-{uuid.uuid4().hex[:8]}"
    setup = create_store(db_url)
    setup.upsert(items_of(collection, _vectors(3000, 1)))
    stores = [create_store(db_url) for _ in range(2)]
    barrier = threading.Barrier(2)
    reports: list[object] = [None, None]

    def host(n: int) -> None:
        barrier.wait()
        reports[n] = rebuild_changed(stores[n], tmp_path / f"host-{n}", only=collection)

    threads = [threading.Thread(target=host, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    outcomes = [r[collection] for r in reports]  # type: ignore[index]
    built = [o for o in outcomes if isinstance(o, dict)]
    others = [o for o in outcomes if not isinstance(o, dict)]
    assert len(built) == 1 and len(others) == 1, outcomes
    assert others[0] == "unchanged" or others[0].startswith("skipped: another build"), others
    version, meta = setup.blob_version(blob_name(collection))
    assert version == 1, "exactly one version published"
    data = setup.get_blob(blob_name(collection), version)
    assert sha256(data) == meta["sha256"]
    _, pks, _ = unpack_blob(data)
    assert len(pks) == meta["count"] == 3000
    loaded = IndexCache(setup, tmp_path / "reader").get(collection)
    assert loaded is not None and len(loaded.index) == 3000
    for n in range(2):
        assert not list(index_dir(tmp_path / f"host-{n}", collection).glob(".*tmp")), "temp left"
    for store in (setup, *stores):
        store.close()


@pytest.mark.usefixtures("redis_client")
def test_a_build_lock_outlives_its_ttl_while_held_and_frees_when_its_holder_dies():
    client = connect()
    collection = f"lock-{uuid.uuid4().hex[:8]}"
    with BuildLock(client, collection, ttl_s=1.0) as held:
        time.sleep(2.5)  # more than two TTLs: only the renewal keeps it
        with pytest.raises(IndexBuildBusyError, match="another build"):
            BuildLock(client, collection).__enter__()
        assert client.pttl(index_build_lock_key(collection)) > 0
        held.check()
    assert client.exists(index_build_lock_key(collection)) == 0, "released at the end"
    # A holder that died (no renewal, no release): its lock expires after one TTL.
    client.lock(index_build_lock_key(collection), timeout=1.0).acquire(blocking=False)
    with pytest.raises(IndexBuildBusyError):
        BuildLock(client, collection).__enter__()
    time.sleep(1.3)
    with BuildLock(client, collection):
        pass


def test_concurrent_atomic_writes_of_one_path_never_tear_it(tmp_path):
    """Threads of one process (one pid) write the same file: each result is one whole payload."""
    path = tmp_path / "v1.blob"
    payloads = [bytes([n]) * 2_000_000 for n in range(4)]
    errors: list[BaseException] = []

    def writer(payload: bytes) -> None:
        try:
            for _ in range(15):
                write_atomically(path, payload)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert path.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["v1.blob"], "no temp file left"


@pytest.mark.usefixtures("redis_client")
def test_an_older_snapshot_is_never_published_after_a_newer_one(db_url, tmp_path):
    store = create_store(db_url)
    collection = f"order-{uuid.uuid4().hex[:8]}"
    store.upsert(items_of(collection, _vectors(200, 2)))
    old = store.snapshot(collection)  # an early build's snapshot, slow to finish
    version, meta = build_index(store, collection, tmp_path)  # a later build publishes
    with pytest.raises(StaleVersionError, match="not after the published version"):
        store.put_blob(blob_name(collection), b"older", {"count": 0}, taken_at=old.taken_at)
    same = datetime.fromisoformat(meta["built_at"])
    with pytest.raises(StaleVersionError):
        store.put_blob(blob_name(collection), b"same", {}, taken_at=same)
    assert store.blob_version(blob_name(collection)) == (
        version,
        meta | {"taken_at": meta["built_at"]},
    )
    store.upsert(items_of(collection, _vectors(10, 3), prefix="more"))
    assert build_index(store, collection, tmp_path)[0] == version + 1, "newer ones still publish"
    store.close()


@pytest.mark.usefixtures("redis_client")
def test_a_corrupted_blob_is_refused_reported_and_the_old_index_keeps_serving(db_url, tmp_path):
    store = create_store(db_url)
    collection = f"rot-{uuid.uuid4().hex[:8]}"
    vectors = _vectors(800, 4)
    store.upsert(items_of(collection, vectors))
    build_index(store, collection, tmp_path / "builder")
    searcher = Searcher(store, Settings(data_dir=tmp_path / "reader"))
    searcher.indexes.check_interval_s = 0.0
    assert searcher.search(vectors[5], collection, k=1)[0].id == "id-5"
    assert searcher.indexes.get(collection).version == 1

    store.upsert(items_of(collection, _vectors(50, 5), prefix="new"))
    build_index(store, collection, tmp_path / "builder")
    _flip_a_byte(store, blob_name(collection), version=2)
    assert searcher.indexes.get(collection).version == 1, "v2 refused, v1 kept"
    assert "sha256" in searcher.indexes.failures[collection]
    hits = searcher.search(vectors[7], collection, k=3)
    assert hits[0].id == "id-7" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert not (index_dir(tmp_path / "reader", collection) / "v2.blob").exists()

    # A host that never loaded a good version searches exactly rather than crash.
    fresh = Searcher(store, Settings(data_dir=tmp_path / "fresh"))
    assert fresh.indexes.get(collection) is None
    assert fresh.search(vectors[9], collection, k=1)[0].id == "id-9"
    assert collection in fresh.indexes.failures

    store.upsert(items_of(collection, _vectors(5, 6), prefix="later"))
    assert build_index(store, collection, tmp_path / "builder")[0] == 3
    assert searcher.indexes.get(collection).version == 3
    assert collection not in searcher.indexes.failures
    store.close()


@pytest.mark.usefixtures("redis_client")
def test_a_damaged_local_copy_is_fetched_again_from_the_store(tmp_path):
    store = create_store(f"sqlite:///{tmp_path / 'local.db'}")
    store.upsert(items_of("c", _vectors(300, 7)))
    build_index(store, "c", tmp_path)  # the builder's own copy: tmp_path/index/.../v1.blob
    local = index_dir(tmp_path, "c") / "v1.blob"
    local.write_bytes(local.read_bytes()[:-100] + b"\0" * 100)
    cache = IndexCache(store, tmp_path)
    assert cache.get("c").version == 1 and not cache.failures
    assert sha256(local.read_bytes()) == store.blob_version(blob_name("c"))[1]["sha256"]
    store.close()


@pytest.mark.usefixtures("redis_client")
def test_a_mixed_dimension_collection_fails_alone_and_the_others_rebuild(tmp_path, db_url):
    store = create_store(db_url)
    store.upsert(items_of("a-mixed", _vectors(100, 8)))
    store.upsert(items_of("a-mixed", _vectors(20, 9, dim=DIM * 2), prefix="wide"))
    store.upsert(items_of("b-good", _vectors(100, 10)))
    store.upsert(items_of("c-good", _vectors(100, 11)))
    report = rebuild_changed(store, tmp_path)
    assert report["a-mixed"].startswith("failed: StoreError:"), report["a-mixed"]
    assert f"mixes vector dimensions [{DIM}, {DIM * 2}]" in report["a-mixed"]
    assert report["b-good"]["count"] == 100 and report["c-good"]["count"] == 100
    assert store.blob_version(blob_name("a-mixed")) is None
    assert store.blob_version(blob_name("b-good"))[0] == 1
    store.close()


def _flip_a_byte(store, name: str, version: int) -> None:
    """Damage one published part in the database (bit rot, a bad restore, a crafted row)."""
    with store.engine.begin() as conn:
        data = conn.execute(
            text(
                "SELECT data FROM embedq_blob_parts WHERE name = :n AND version = :v AND part = 0"
            ),
            {"n": name, "v": version},
        ).scalar_one()
        middle = len(data) // 2
        damaged = bytes(data[:middle]) + bytes([data[middle] ^ 0xFF]) + bytes(data[middle + 1 :])
        conn.execute(
            text("UPDATE embedq_blob_parts SET data = :d WHERE name = :n AND version = :v"),
            {"d": damaged, "n": name, "v": version},
        )
