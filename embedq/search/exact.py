"""Exact (brute-force) cosine search: a backend of :class:`Index`, and the recall check."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class RecallCheck:
    """How well an index finds the exact top ``k`` of some queries (none of them stored in
    it: the collection's recent queries, or stored vectors held out of the index while it
    is checked).

    Recall is tie-aware: a hit counts when its exact score reaches the ``k``-th best score
    (duplicates tie; which of them is listed is arbitrary). The exact answers are computed
    once; each ``ef`` tried costs only the index's queries."""

    queries: np.ndarray  # normalized, one per row
    kth: np.ndarray  # the k-th best exact score of each query
    k: int

    def recall(self, index: Index, unit: np.ndarray, labels: np.ndarray) -> float:
        """Share of the exact top ``k`` the index finds (``unit``: the normalized vectors
        it holds, under ``labels``, sorted)."""
        if not len(self.queries) or self.k == 0:
            return 1.0
        found, _ = index.query(self.queries, self.k)
        rows = np.searchsorted(labels, found)
        scores = np.einsum("qkd,qd->qk", unit[rows], self.queries)
        return float((scores >= self.kth[:, None] - 1e-6).sum() / found.size)


def recall_check(
    unit: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int = 10
) -> RecallCheck:
    """The check of an index holding ``unit`` (normalized vectors under ``labels``) on
    ``queries``: their exact top-``k`` scores, computed a block of queries at a time
    (~64 MiB of scores whatever the collection's size)."""
    chosen = normalize(queries)
    k = min(k, len(unit))
    kth = np.zeros(len(chosen), np.float32)
    if k == 0:
        return RecallCheck(chosen, kth, 0)
    step = max(1, 2**24 // len(unit))
    for start in range(0, len(chosen), step):
        scores = chosen[start : start + step] @ unit.T
        kth[start : start + step] = -np.partition(-scores, k - 1, axis=1)[:, k - 1]
    return RecallCheck(chosen, kth, k)


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

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Keep normalized copies of ``vectors`` under ``labels`` too."""
        more = normalize(np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim))
        self._labels = np.concatenate([self._labels, np.asarray(labels, dtype=np.int64)])
        self._vectors = np.vstack([self._vectors, more])

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
