"""HNSW index at 100k vectors: build time, recall@10 vs exact, latency, queries/s (1 thread).

Vectors are 384-dim, drawn around 1,000 cluster centres (real embeddings cluster; uniform
noise is a much harder, unrealistic case). Also times full searches through the store.

    .venv/bin/python bench/search_index.py --n 100000 --queries 2000
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from embedq.search.build import build_index
from embedq.search.exact import exact_top_k
from embedq.search.searcher import Searcher
from embedq.settings import Settings
from embedq.store.base import Item
from embedq.store.factory import create_store

DIM = 384


def vectors(n: int, seed: int) -> np.ndarray:
    """Clustered float32 vectors: the same 1,000 centres for every seed, new noise."""
    centers = np.random.default_rng(12345).normal(size=(1000, DIM))
    rng = np.random.default_rng(seed)
    return (centers[rng.integers(0, 1000, n)] + 0.5 * rng.normal(size=(n, DIM))).astype(np.float32)


def main() -> None:
    """Print one JSON report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="embedq-bench-"))
    store = create_store(args.database_url or f"sqlite:///{tmp / 'bench.db'}")
    data = vectors(args.n, 0)
    collection = f"bench-{int(time.time())}"
    start = time.perf_counter()
    for s in range(0, args.n, 5000):
        store.upsert(
            [
                Item(collection, str(i), f"t{i}", data[i], "m", "h")
                for i in range(s, min(s + 5000, args.n))
            ]
        )
    load_s = time.perf_counter() - start

    start = time.perf_counter()
    _, meta = build_index(store, collection, tmp)
    build_s = time.perf_counter() - start
    searcher = Searcher(store, Settings(data_dir=tmp / "reader"))
    index = searcher.indexes.get(collection).index

    queries = vectors(args.queries, 1)
    truth, _ = exact_top_k(queries, data, np.arange(args.n, dtype=np.int64) + 1, 10)
    latencies, found = [], []
    for q in queries:
        t = time.perf_counter()
        labels, _ = index.query(q[None, :], 10)
        latencies.append(time.perf_counter() - t)
        found.append(labels[0])
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found, strict=True)])
    full = []
    for q in queries[:200]:
        t = time.perf_counter()
        searcher.search(q, collection, k=10)
        full.append(time.perf_counter() - t)
    ms = lambda xs, p: round(float(np.percentile(xs, p)) * 1000, 3)  # noqa: E731
    report = {
        "n": args.n,
        "dim": DIM,
        "store": store.dialect,
        "store_load_s": round(load_s, 1),
        "build_s": round(build_s, 1),
        "build_s_1m_extrapolated": round(build_s * 10 * np.log(1e6) / np.log(1e5), 0),
        "ef": meta["ef"],
        "recall_at_10_vs_exact": round(float(recall), 4),
        "index_p50_ms": ms(latencies, 50),
        "index_p99_ms": ms(latencies, 99),
        "index_queries_per_s_1_thread": round(1 / statistics.mean(latencies)),
        "search_with_store_p50_ms": ms(full, 50),
        "search_with_store_p99_ms": ms(full, 99),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
