"""The index build's ``ef`` on real text: pydoc docstrings searched with real sentences.

The 3,795 docstrings of ``../shared/data/pydoc.jsonl`` and 1,000 queries (500 SICK
sentences, 500 docstring first lines), encoded with the real model (raw
sentence-transformers, cached with ``--vectors-cache``), stored in a fresh SQLite store.
Two builds, as a collection lives them:

1. ``held_out``: a new collection has no recent queries: the build tunes on stored
   docstrings held out of the index while it is checked;
2. ``queries``: after 200 searches (100 SICK, 100 first lines) fed the collection's query
   sample, the rebuild tunes on them; recall is measured on the 800 queries not in it.

Recall@10 is the index's (tie-aware: a hit counts when its exact score reaches the 10th
best, duplicate docstrings tie) against exact search of the same vectors, for each half of
the queries and all; ``curve`` gives the real queries' recall at every ef the build may try.

    .venv/bin/python bench/search_queries.py --vectors-cache /tmp/pydoc-vectors.npz
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from embedq.broker.client import shared_client
from embedq.search.base import normalize
from embedq.search.build import EF_STEPS, build_index
from embedq.search.exact import recall_check
from embedq.search.queries import remember
from embedq.search.searcher import Searcher
from embedq.settings import Settings
from embedq.store.base import Item
from embedq.store.sql import SQLStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_texts
from compact_vectors import queries, vectors_for

COLLECTION = "pydoc-search"
SAMPLED = np.r_[0:100, 500:600]  # the queries fed to the sample: 100 SICK, 100 first lines


def recalls(index: Any, vecs: np.ndarray, qvecs: np.ndarray, ef: int) -> dict[str, float]:
    """Recall@10 at ``ef`` on SICK queries, first-line queries and all of ``qvecs``."""
    unit, labels = normalize(vecs), np.arange(len(vecs), dtype=np.int64) + 1
    index.ef = ef
    half = len(qvecs) // 2
    parts = {"sick": qvecs[:half], "first_lines": qvecs[half:], "all": qvecs}
    return {
        name: round(recall_check(unit, labels, part).recall(index, unit, labels), 4)
        for name, part in parts.items()
    }


def build(store: SQLStore, folder: Path, vecs: np.ndarray, qvecs: np.ndarray) -> dict[str, Any]:
    """Build the collection's index; what it chose, and what real queries find with it."""
    _, meta = build_index(store, COLLECTION, folder)
    index = Searcher(store, Settings(data_dir=folder / "reader")).indexes.get(COLLECTION).index
    curve = {ef: recalls(index, vecs, qvecs, ef)["all"] for ef in EF_STEPS if ef <= 256}
    return {
        "ef": meta["ef"],
        "tuned_on": f"{meta['tuned_queries']} {meta['tuned_on']}",
        "build_recall_at_10": meta["recall_at_10"],
        "recall_at_10": recalls(index, vecs, qvecs, meta["ef"]),
        "curve": curve,
    }


def main() -> None:
    """Print one JSON report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vectors-cache", type=Path, default=None)
    args = parser.parse_args()
    docs = load_texts("pydoc")
    asks = queries(docs, 1000)
    vecs, qvecs = vectors_for(docs, asks, args.vectors_cache)
    folder = Path(tempfile.mkdtemp(prefix="embedq-search-queries-"))
    store = SQLStore(f"sqlite:///{folder / 'store.db'}")
    items = [
        Item(COLLECTION, str(i), d, vecs[i], "all-MiniLM-L6-v2", f"h{i}")
        for i, d in enumerate(docs)
    ]
    store.upsert(items)
    client = shared_client()
    client.delete(f"embedq:queries:{COLLECTION}")
    report = {
        "documents": len(docs),
        "query_count": len(asks),
        "held_out": build(store, folder / "a", vecs, qvecs),
    }
    for q in qvecs[SAMPLED]:
        remember(client, COLLECTION, q)
    rest = np.delete(qvecs, SAMPLED, axis=0)
    report["queries"] = build(store, folder / "b", vecs, rest)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
