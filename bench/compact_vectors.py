"""Compact vectors (EMBEDQ_VECTOR_DTYPE): bytes per vector, store size, recall@10 vs float32.

Encodes the pydoc docstrings (documents) and queries (SICK sentences and docstring first
lines) with the real model (raw sentence-transformers, normalized), writes the documents into
one fresh SQLite store per dtype, builds the collection's index (int8: recalibrated there),
then compares with exact float32 search of the original vectors:

- ``recall_exact``: exact search over the vectors as the store decodes them (the codec alone);
- ``recall_search``: ``Searcher.search`` through the built HNSW index (what users get);
- ``recall_search_ef256``: the same with the index searched wider (ef 256): the float32
  row shows the index's own loss, the same for every dtype.

Recall counts a hit as right when its float32 score reaches the 10th best float32 score
(duplicate docstrings tie; which of them is listed is arbitrary).

    .venv/bin/python bench/compact_vectors.py --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import redis

from embedq.codec import VECTOR_DTYPES
from embedq.search.build import build_index
from embedq.search.queries import SAMPLE_SIZE, remember
from embedq.search.searcher import Searcher
from embedq.settings import Settings
from embedq.store.base import Item
from embedq.store.sql import SQLStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, load_texts

COLLECTION = "pydoc"
K = 10
WRITE_BATCH = 500
# A wider HNSW search than the build's tuned ef: shows what the index, not the dtype, loses.
WIDE_EF = 256


def encode(texts: list[str]) -> np.ndarray:
    """Normalized float32 vectors from raw sentence-transformers (the configured model)."""
    from sentence_transformers import SentenceTransformer

    from embedq.encode.models import resolve_model_path
    from embedq.settings import get_settings

    path = resolve_model_path(get_settings().model)
    model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    vectors = model.encode(texts, batch_size=64, normalize_embeddings=True)
    return np.asarray(vectors, dtype=np.float32)


def queries(docs: list[str], n: int) -> list[str]:
    """Half SICK sentences, half docstring first lines (every other one, for variety)."""
    sick = load_texts("sick")[: n // 2]
    firsts = list(dict.fromkeys(d.strip().splitlines()[0] for d in docs if d.strip()))
    return sick + firsts[:: max(1, len(firsts) // (n - len(sick)))][: n - len(sick)]


def vectors_for(docs: list[str], asks: list[str], cache: Path | None) -> tuple[Any, Any]:
    """Document and query vectors, read from ``cache`` when it holds this run's."""
    if cache and cache.exists():
        saved = np.load(cache)
        if len(saved["docs"]) == len(docs) and len(saved["queries"]) == len(asks):
            return saved["docs"], saved["queries"]
    both = encode(docs + asks)
    if cache:
        np.savez(cache, docs=both[: len(docs)], queries=both[len(docs) :])
    return both[: len(docs)], both[len(docs) :]


def recall(truth_scores: np.ndarray, found: list[list[int]]) -> float:
    """Tie-aware recall@K: hits whose float32 score reaches the K-th best float32 score."""
    kth = np.sort(truth_scores, axis=1)[:, -K]
    right = [
        sum(truth_scores[q, i] >= kth[q] - 1e-6 for i in ids[:K]) / K for q, ids in enumerate(found)
    ]
    return float(np.mean(right))


def fill(store: SQLStore, docs: list[str], vectors: np.ndarray) -> None:
    """Write the documents in batches, as ingest does (int8: the first batch calibrates)."""
    for s in range(0, len(docs), WRITE_BATCH):
        items = [
            Item(COLLECTION, str(i), docs[i], vectors[i], "all-MiniLM-L6-v2", f"h{i}")
            for i in range(s, min(s + WRITE_BATCH, len(docs)))
        ]
        store.upsert(items)


def measure(dtype: str, docs: list[str], vecs: Any, qvecs: Any, client: redis.Redis) -> dict:
    """One dtype's row of the table."""
    folder = Path(tempfile.mkdtemp(prefix=f"embedq-compact-{dtype}-"))
    db = folder / "store.db"
    settings = Settings(vector_dtype=dtype, data_dir=folder / "reader")
    store = SQLStore(f"sqlite:///{db}", settings)
    fill(store, docs, vecs)
    # A collection in use: its recent queries (every 5th of these) are what its build tunes on.
    for q in qvecs[::5][:SAMPLE_SIZE]:
        remember(client, COLLECTION, q)
    _, meta = build_index(store, COLLECTION, folder, client=client)
    truth = qvecs @ vecs.T
    snap = store.snapshot(COLLECTION)
    decoded = (qvecs @ snap.vectors.T).argsort(axis=1)[:, ::-1][:, :K]
    exact = [[int(snap.pks[j]) - 1 for j in row] for row in decoded]
    searcher = Searcher(store, settings)
    searched = [[int(h.id) for h in searcher.search(q, COLLECTION, k=K)] for q in qvecs]
    loaded = searcher.indexes.get(COLLECTION)
    assert loaded is not None
    loaded.index.ef = WIDE_EF
    wide = [[int(h.id) for h in searcher.search(q, COLLECTION, k=K)] for q in qvecs]
    store.close()
    return {
        "dtype": dtype,
        **_sizes(db),
        "recall_exact": round(recall(truth, exact), 4),
        "recall_search": round(recall(truth, searched), 4),
        f"recall_search_ef{WIDE_EF}": round(recall(truth, wide), 4),
        "index_ef": meta["ef"],
        "int8_scale": meta.get("int8_scale"),
    }


def _sizes(db: Path) -> dict[str, Any]:
    with sqlite3.connect(db) as conn:
        count, total = conn.execute(
            "SELECT COUNT(*), SUM(LENGTH(vector)) FROM embedq_items"
        ).fetchone()
        conn.execute("VACUUM")
    return {
        "bytes_per_vector": round(total / count, 1),
        "vector_bytes_total": int(total),
        "store_file_bytes": db.stat().st_size,
    }


def main() -> None:
    """Print one JSON line per dtype."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--vectors-cache", type=Path, default=None)
    args = parser.parse_args()
    docs = load_texts("pydoc")
    asks = queries(docs, args.queries)
    vecs, qvecs = vectors_for(docs, asks, args.vectors_cache)
    client = redis.Redis.from_url(args.redis_url)
    print(json.dumps({"docs": len(docs), "queries": len(asks), "data": str(DATA)}))
    for dtype in VECTOR_DTYPES:
        print(json.dumps(measure(dtype, docs, vecs, qvecs, client)))


if __name__ == "__main__":
    main()
