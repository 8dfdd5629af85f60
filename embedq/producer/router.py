"""Which queue a task goes to. Today: the explicit ``queue=`` or the default queue.

This is the seam the load-aware router plugs into (worker heartbeats, queue depth, size).
"""

from __future__ import annotations

from typing import Any

from embedq.settings import get_settings

ROUTED_TASKS = frozenset({"embedq.embed_texts"})


def choose_queue(n_texts: int) -> str:
    """The queue for a request of ``n_texts`` texts when the caller named none."""
    return get_settings().default_queue


def route_task(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any], **_: Any
) -> dict[str, str] | None:
    """Celery router: an explicit ``queue=`` in ``apply_async`` always wins over this."""
    if name not in ROUTED_TASKS:
        return None
    texts = args[0] if args else kwargs.get("texts")
    n_texts = len(texts) if isinstance(texts, list | tuple) else 1
    return {"queue": choose_queue(n_texts)}
