"""Exact (brute-force) cosine search: a backend of :class:`Index`, and the recall check."""

from __future__ import annotations

from pathlib import Path

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


def probe_queries(vectors: np.ndarray, sample: int, seed: int = 0) -> np.ndarray:
    """``sample`` unit queries drawn from the collection's own spread (per-dimension mean
    and deviation), none of them stored.

    Why: a stored vector is its own nearest neighbour, so an index looks near-perfect on
    them; users' queries lie between documents. On pydoc docstrings with SICK and first-line
    queries these probes track real recall within 0.01 at every ef (docs/benchmarks.md).
    """
    rng = np.random.default_rng(seed)
    mean, spread = vectors.mean(axis=0), vectors.std(axis=0)
    probes = mean + rng.standard_normal((sample, vectors.shape[1])) * spread
    norms = np.linalg.norm(probes, axis=1, keepdims=True)
    return (probes / np.maximum(norms, 1e-12)).astype(np.float32)


def recall_at_k(
    index: Index, vectors: np.ndarray, labels: np.ndarray, sample: int, k: int = 10
) -> float:
    """Share of the exact top-k that the index finds, on ``sample`` probe queries."""
    if len(vectors) == 0:
        return 1.0
    queries = probe_queries(vectors, sample)
    k = min(k, len(vectors))
    truth, _ = exact_top_k(queries, vectors, labels, k)
    found, _ = index.query(queries, k)
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth, found, strict=True))
    return hits / truth.size


class ExactIndex(Index):
    """Every vector compared with every query: exact results, memory of the vectors
    themselves. For small collections, and the reference the recall check uses."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._labels = np.zeros(0, dtype=np.int64)
        self._vectors = np.zeros((0, dim), dtype=np.float32)

    def build(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Keep normalized copies of ``vectors`` under ``labels``."""
        self._labels = np.asarray(labels, dtype=np.int64).copy()
        self._vectors = normalize(np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim))

    def query(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact top ``k`` (fewer when the index holds fewer)."""
        queries = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        return exact_top_k(queries, self._vectors, self._labels, k)

    def save(self, path: Path) -> None:
        """Labels and vectors in numpy's ``.npz`` format."""
        with Path(path).open("wb") as fh:
            np.savez(fh, labels=self._labels, vectors=self._vectors)

    def load(self, path: Path) -> None:
        """Read a file written by :meth:`save`."""
        with np.load(Path(path)) as data:
            self._labels, self._vectors = data["labels"], data["vectors"]

    def __len__(self) -> int:
        return len(self._labels)
