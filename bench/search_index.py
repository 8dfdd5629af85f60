"""HNSW index at 100k vectors: build time, recall@10 vs exact, latency, queries/s (1 thread).

Vectors are 384-dim, drawn around 1,000 cluster centres (real embeddings cluster; uniform
noise is a much harder, unrealistic case); queries are drawn the same way, never stored.
Also times full searches through the store. The build tunes ``ef`` on stored vectors held
out (a new collection has no recent queries), or, with ``--recent-queries N``, on N queries
of the same kind pushed into the collection's query sample first. The same index is then
measured at ``--compare-ef`` too (1024: what the builder picked before, tuning on
synthetic probes), in the same run, so the ratio holds on a loaded machine.

    .venv/bin/python bench/search_index.py --n 100000 --queries 2000
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from embedq.broker.client import shared_client
from embedq.search.build import build_index
from embedq.search.exact import exact_top_k
from embedq.search.queries import remember
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


def fill(store: Any, collection: str, data: np.ndarray) -> float:
    """Store ``data`` in ``collection``, 5,000 rows a write; the seconds it took."""
    start = time.perf_counter()
    for s in range(0, len(data), 5000):
        store.upsert(
            [
                Item(collection, str(i), f"t{i}", data[i], "m", "h")
                for i in range(s, min(s + 5000, len(data)))
            ]
        )
    return time.perf_counter() - start


def index_run(
    index: Any, queries: np.ndarray, truth: np.ndarray, ef: int
) -> tuple[list[float], float]:
    """Each query alone at ``ef``, timed: the latencies and recall@10 against ``truth``."""
    index.ef = ef
    latencies, found = [], []
    for q in queries:
        t = time.perf_counter()
        labels, _ = index.query(q[None, :], 10)
        latencies.append(time.perf_counter() - t)
        found.append(labels[0])
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found, strict=True)])
    return latencies, float(recall)


def index_figures(index: Any, queries: np.ndarray, truth: np.ndarray, ef: int) -> dict[str, Any]:
    """Recall and speed of the index at ``ef`` (its own ef is restored by the caller)."""
    latencies, recall = index_run(index, queries, truth, ef)
    return {
        "recall_at_10_vs_exact": round(recall, 4),
        "index_p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 3),
        "index_queries_per_s_1_thread": round(1 / statistics.mean(latencies)),
    }


def main() -> None:
    """Print one JSON report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--recent-queries", type=int, default=0)
    parser.add_argument("--compare-ef", type=int, default=1024)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="embedq-bench-"))
    store = create_store(args.database_url or f"sqlite:///{tmp / 'bench.db'}")
    data = vectors(args.n, 0)
    collection = f"bench-{int(time.time())}"
    load_s = fill(store, collection, data)

    for q in vectors(args.recent_queries, 2):
        remember(shared_client(), collection, q)
    start = time.perf_counter()
    _, meta = build_index(store, collection, tmp)
    build_s = time.perf_counter() - start
    searcher = Searcher(store, Settings(data_dir=tmp / "reader"))
    index = searcher.indexes.get(collection).index

    queries = vectors(args.queries, 1)
    truth, _ = exact_top_k(queries, data, np.arange(args.n, dtype=np.int64) + 1, 10)
    latencies, recall = index_run(index, queries, truth, meta["ef"])
    compared = index_figures(index, queries, truth, args.compare_ef)
    index.ef = meta["ef"]
    qps = 1 / statistics.mean(latencies)
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
        "tuned_on": f"{meta['tuned_queries']} {meta['tuned_on']}",
        "build_recall_at_10": meta["recall_at_10"],
        "recall_at_10_vs_exact": round(float(recall), 4),
        "index_p50_ms": ms(latencies, 50),
        "index_p99_ms": ms(latencies, 99),
        "index_queries_per_s_1_thread": round(qps),
        f"at_ef_{args.compare_ef}": compared,
        "speedup_vs_compare_ef": round(qps / compared["index_queries_per_s_1_thread"], 2),
        "search_with_store_p50_ms": ms(full, 50),
        "search_with_store_p99_ms": ms(full, 99),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
