"""``embed_texts``: parse, hand off to the worker's batcher, return vectors."""

from __future__ import annotations

from typing import Any

from celery import Task

from embedq.app import app
from embedq.codec import Embeddings
from embedq.errors import InvalidInputError, UnknownModelError
from embedq.requests import parse_embed_request
from embedq.worker.runtime import get_runtime


def redact(args: Any, kwargs: dict[str, Any] | None) -> tuple[str, str]:
    """Task args as shown in logs, events and Flower: counts, never document text."""
    items = [a for a in (args or ()) if isinstance(a, list | tuple)]
    items += [v for k, v in (kwargs or {}).items() if k in ("texts", "documents")]
    count = len(items[0]) if items else "?"
    named = [a for a in (args or ()) if isinstance(a, str)]
    shown = {k: v for k, v in (kwargs or {}).items() if k in ("model", "normalize", "collection")}
    return f"({', '.join(map(repr, [*named, f'<{count} items>']))})", repr(shown)


class EmbedTask(Task):
    """Keeps document text out of ``argsrepr``/``kwargsrepr``."""

    # Results are vectors: logs and Flower get a short preview, not thousands of floats.
    resultrepr_maxsize = 120

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Publish with redacted argument reprs (see :func:`redact`)."""
        argsrepr, kwargsrepr = redact(args, kwargs)
        options.setdefault("argsrepr", argsrepr)
        options.setdefault("kwargsrepr", kwargsrepr)
        return super().apply_async(args, kwargs, **options)


@app.task(
    name="embedq.embed_texts",
    base=EmbedTask,
    # Expected errors: reported to the caller, not logged with a traceback.
    throws=(InvalidInputError, UnknownModelError),
)
def embed_texts(
    texts: list[str],
    model: str | None = None,
    normalize: bool = True,
    collection: str | None = None,
    ids: list[str] | None = None,
    metadata: list[dict[str, Any]] | None = None,
) -> Embeddings:
    """Embed ``texts``; returns one float32 vector per text, in input order.

    With ``collection``, the items (``ids`` default to content hashes, optional
    ``metadata``) are also upserted into the durable store.
    """
    request = parse_embed_request(texts, model, normalize, collection, ids, metadata)
    return get_runtime().embed(request)
