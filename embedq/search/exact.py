"""Exact (brute-force) cosine search: a backend of :class:`Index`, and the recall check."""

from __future__ import annotations

import numpy as np

from embedq.search.base import Index, normalize


def exact_top_k(
    queries: np.ndarray, vectors: np.ndarray, labels: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force cosine top-k (vectors need not be normalized)."""
    if len(vectors) == 0:
        empty = np.zeros((len(queries), 0))
        return empty.astype(np.int64), empty.astype(np.float32)
    scores = normalize(queries) @ normalize(vectors).T
    k = min(k, len(vectors))
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(-scores, top, axis=1).argsort(axis=1)
    top = np.take_along_axis(top, order, axis=1)
    return labels[top], np.take_along_axis(scores, top, axis=1)


def recall_at_k(
    index: Index, vectors: np.ndarray, labels: np.ndarray, sample: int, k: int = 10
) -> float:
    """Share of the exact top-k that the index finds, on ``sample`` stored vectors as queries."""
    if len(vectors) == 0:
        return 1.0
    rng = np.random.default_rng(0)
    picks = rng.choice(len(vectors), size=min(sample, len(vectors)), replace=False)
    k = min(k, len(vectors))
    truth, _ = exact_top_k(vectors[picks], vectors, labels, k)
    found, _ = index.query(vectors[picks], k)
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth, found, strict=True))
    return hits / truth.size
