"""The ``Index`` seam: approximate nearest neighbours over one collection's vectors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from embedq.errors import ConfigurationError


class Index(ABC):
    """Cosine-space k-NN over float32 vectors labelled by store row keys."""

    dim: int

    @abstractmethod
    def build(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Index ``vectors`` under ``labels`` (replacing anything indexed before)."""

    @abstractmethod
    def query(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(labels, cosine similarities) of the ``k`` nearest, each of shape (queries, k')."""

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write the index to ``path``."""

    @abstractmethod
    def load(self, path: Path) -> None:
        """Read an index written by :meth:`save`."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of indexed vectors."""


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


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


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


def create_index(kind: str, dim: int) -> Index:
    """The index backend named ``kind`` (``hnsw``)."""
    if kind == "hnsw":
        from embedq.storage.hnsw import HNSWIndex

        return HNSWIndex(dim)
    raise ConfigurationError(f"unknown index kind {kind!r}; choose: hnsw")
