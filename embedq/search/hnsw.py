"""hnswlib backend of :class:`~embedq.search.base.Index` (cosine space)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from embedq.search.base import Index

try:
    import hnswlib
except ImportError as exc:  # pragma: no cover - hnswlib is a core dependency
    raise ImportError("the HNSW index needs: pip install hnswlib") from exc

M = 16
EF_CONSTRUCTION = 200
DEFAULT_EF = 64


class HNSWIndex(Index):
    """An hnswlib graph; ``ef`` (query breadth) is raised by the builder until recall holds."""

    def __init__(self, dim: int, ef: int = DEFAULT_EF) -> None:
        self.dim = dim
        self.ef = ef
        self._index = hnswlib.Index(space="cosine", dim=dim)
        self._index.init_index(max_elements=1, M=M, ef_construction=EF_CONSTRUCTION)

    def build(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Build from scratch with all cores."""
        self._index = hnswlib.Index(space="cosine", dim=self.dim)
        self._index.init_index(
            max_elements=max(1, len(labels)), M=M, ef_construction=EF_CONSTRUCTION
        )
        if len(labels):
            self._index.add_items(vectors, labels, num_threads=os.cpu_count() or 1)

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Grow the graph by ``vectors`` (as if they had been in the build)."""
        if len(labels):
            self._index.resize_index(len(self) + len(labels))
            self._index.add_items(vectors, labels, num_threads=os.cpu_count() or 1)

    def query(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest ``k`` (fewer when the index holds fewer); similarity = 1 - distance."""
        k = min(k, len(self))
        if k == 0:
            empty = np.zeros((len(vectors), 0))
            return empty.astype(np.int64), empty.astype(np.float32)
        self._index.set_ef(max(self.ef, k))
        labels, distances = self._index.knn_query(vectors, k=k, num_threads=1)
        return labels.astype(np.int64), (1.0 - distances).astype(np.float32)

    def save(self, path: Path) -> None:
        """hnswlib's own file format."""
        self._index.save_index(str(path))

    def load(self, path: Path) -> None:
        """Load a file written by :meth:`save`."""
        self._index = hnswlib.Index(space="cosine", dim=self.dim)
        self._index.load_index(str(path))

    def __len__(self) -> int:
        return int(self._index.get_current_count())
