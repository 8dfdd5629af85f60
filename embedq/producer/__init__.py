"""Producer side: helpers that put work on the queues and wait for it.

``embedq.producer.ingest(documents, collection=...)`` streams a corpus into the store.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from embedq.broker.client import wait_while_full
from embedq.broker.results import forgetting, get_result
from embedq.broker.traffic import choose, new_job
from embedq.codec import Embeddings
from embedq.settings import get_settings


def embed(
    texts: Sequence[str],
    *,
    model: str | None = None,
    normalize: bool = True,
    collection: str | None = None,
    queue: str | None = None,
    timeout_s: float = 60.0,
    traffic: str | None = None,
) -> Embeddings:
    """Embed any number of texts: split into tasks of at most ``max_texts_per_task``, wait.

    Returns one array in input order; ``truncated`` positions refer to ``texts``. A full
    Redis is waited out within ``timeout_s``; results are forgotten once read. ``traffic``:
    ``interactive`` or ``bulk`` (default: bulk for more than ``EMBEDQ_INTERACTIVE_MAX_TEXTS``
    texts); the call's tasks are one job, with ``timeout_s`` as their deadline.
    """
    from embedq.tasks import embed_texts

    size = get_settings().max_texts_per_task
    options: dict[str, object] = {"queue": queue} if queue else {}
    options |= {
        "traffic": choose(traffic, None, len(texts)),
        "job": new_job(),
        "deadline_s": timeout_s,
    }
    kwargs = {"model": model, "normalize": normalize, "collection": collection}
    deadline = time.monotonic() + timeout_s
    pending: list[Any] = []
    with forgetting(pending):
        for i in range(0, max(len(texts), 1), size):
            args = (list(texts[i : i + size]),)
            send = functools.partial(embed_texts.apply_async, args, kwargs, **options)
            pending.append(wait_while_full(send, "embed", deadline))
        parts = [get_result(result, timeout_s, deadline) for result in pending]
    truncated = [i * size + j for i, part in enumerate(parts) for j in part.truncated]
    return Embeddings(np.concatenate(parts) if parts else np.zeros((0, 0)), truncated)


def ingest(documents: Any, collection: str, **options: Any) -> Any:
    """Stream ``documents`` into ``collection``; see :func:`embedq.producer.bulk.ingest`."""
    from embedq.producer.bulk import ingest as run

    return run(documents, collection, **options)
