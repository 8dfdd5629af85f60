"""embedq: asynchronous text embeddings at any scale (Celery + Redis + sentence-transformers).

``embedq.search`` (callable) and ``embedq.lookup`` are imported on first use, so
``import embedq`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["lookup", "search"]


def __getattr__(name: str) -> Any:
    if name == "search":
        import embedq.search

        return embedq.search
    if name == "lookup":
        from embedq.search.searcher import lookup

        return lookup
    raise AttributeError(f"module 'embedq' has no attribute {name!r}")
