"""The index backend for a kind name."""

from __future__ import annotations

from embedq.errors import ConfigurationError
from embedq.search.base import Index


def create_index(kind: str, dim: int) -> Index:
    """The index backend named ``kind``: ``hnsw`` (approximate) or ``exact``."""
    if kind == "hnsw":
        from embedq.search.hnsw import HNSWIndex

        return HNSWIndex(dim)
    if kind == "exact":
        from embedq.search.exact import ExactIndex

        return ExactIndex(dim)
    raise ConfigurationError(f"unknown index kind {kind!r}; choose: hnsw, exact")
