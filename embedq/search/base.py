"""The ``Index`` seam: nearest neighbours over one collection's vectors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np


class Index(ABC):
    """Cosine-space k-NN over float32 vectors labelled by store row keys."""

    dim: int
    #: Query breadth: candidates a query explores (more: better recall, slower). The builder
    #: raises it until recall holds; backends that always search everything ignore it.
    ef: int = 0

    @abstractmethod
    def build(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Index ``vectors`` under ``labels`` (replacing anything indexed before)."""

    @abstractmethod
    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Index ``vectors`` under ``labels`` too (labels not indexed yet)."""

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


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
