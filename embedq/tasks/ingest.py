"""``ingest_documents`` and ``rebuild_index``: the bulk side. Results are counts, never vectors."""

from __future__ import annotations

from typing import Any

from embedq.app import app
from embedq.broker.traffic import Traffic, ticket_of
from embedq.inputs import parse_documents
from embedq.search.build import rebuild_changed
from embedq.settings import get_settings
from embedq.tasks.embed import retry_options
from embedq.worker.runtime import get_runtime


@app.task(name="embedq.ingest_documents", traffic=Traffic.BULK, **retry_options())
def ingest_documents(
    collection: str,
    documents: list[dict[str, Any]],
    chunks: dict[str, int] | None = None,
    model: str | None = None,
    version: int | None = None,
) -> dict[str, int]:
    """Embed and store ``documents`` (dicts: id, text, metadata, parent, chunk) unless they
    are stored already just so; returns counts. ``version`` (microseconds since the epoch,
    set by the producer when it made the task) keeps a redelivered older task from
    replacing what a newer one stored."""
    request = parse_documents(collection, documents, model, version=version)
    return get_runtime().ingest(request, dict(chunks or {}), ticket_of(ingest_documents.request))


ingest_documents.validate = parse_documents


@app.task(name="embedq.rebuild_index")
def rebuild_index(collection: str | None = None) -> dict[str, Any]:
    """Rebuild the HNSW index of each collection that changed (Celery beat runs this)."""
    runtime = get_runtime()
    return rebuild_changed(runtime.store, get_settings().data_dir, only=collection)
