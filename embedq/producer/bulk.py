"""Bulk ingestion: stream documents into ``ingest_documents`` tasks with bounded in-flight work.

Nothing is held in memory but the tasks in flight. Documents already stored with the same
text are skipped by the worker, so a rerun after an interruption stores each one once.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from embedq.producer.chunker import chunk_spans
from embedq.producer.reader import BadRecord, Document, to_document
from embedq.settings import get_settings

MAX_FAILURES_KEPT = 50


@dataclass
class IngestSummary:
    """Counts of one ingestion run."""

    read: int = 0
    stored: int = 0
    embedded: int = 0
    cached: int = 0
    skipped: int = 0
    truncated: int = 0
    failed: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    wall_s: float = 0.0

    def add(self, counts: dict[str, int]) -> None:
        """Add the counts one task returned."""
        for name in ("stored", "embedded", "cached", "skipped", "truncated"):
            setattr(self, name, getattr(self, name) + int(counts.get(name, 0)))

    def fail(self, where: str, reason: str, count: int = 1) -> None:
        """Record ``count`` documents that failed at ``where``."""
        self.failed += count
        if len(self.failures) < MAX_FAILURES_KEPT:
            self.failures.append({"where": where, "reason": reason, "documents": count})

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json``)."""
        return asdict(self)


def _as_document(record: Document | BadRecord | dict[str, Any], n: int) -> Document | BadRecord:
    if isinstance(record, Document | BadRecord):
        return record

    return to_document(record, n, "id", "text")


def _payloads(
    doc: Document, chunk_tokens: int | None, overlap: int, model: str
) -> list[dict[str, Any]]:
    if not chunk_tokens:
        return [{"id": doc.id, "text": doc.text, "metadata": doc.metadata}]
    spans = chunk_spans(doc.text, chunk_tokens, overlap, model)
    return [
        {
            "id": f"{doc.id}#{i}",
            "text": doc.text[a:b],
            "metadata": doc.metadata,
            "parent": doc.id,
            "chunk": i,
        }
        for i, (a, b) in enumerate(spans)
    ]


def _tasks(
    records: Iterable[Any],
    summary: IngestSummary,
    chunk_size: int,
    chunk_tokens: int | None,
    overlap: int,
) -> Iterator[tuple[list[dict[str, Any]], dict[str, int], int]]:
    model = get_settings().model
    batch: list[dict[str, Any]] = []
    parents: dict[str, int] = {}
    docs = 0
    for n, record in enumerate(records, 1):
        doc = _as_document(record, n)
        summary.read += 1
        if isinstance(doc, BadRecord):
            summary.fail(f"line {doc.line}", doc.reason)
            continue
        payloads = _payloads(doc, chunk_tokens, overlap, model)
        batch += payloads
        docs += 1
        if chunk_tokens:
            parents[doc.id] = len(payloads)
        if len(batch) >= chunk_size:
            yield batch, parents, docs
            batch, parents, docs = [], {}, 0
    if batch:
        yield batch, parents, docs


def ingest(
    records: Iterable[Document | BadRecord | dict[str, Any]],
    collection: str,
    *,
    chunk_size: int = 64,
    max_in_flight: int = 16,
    queue: str | None = None,
    chunk_tokens: int | None = None,
    overlap: int = 0,
    timeout_s: float = 600.0,
    on_progress: Callable[[IngestSummary, int], None] | None = None,
) -> IngestSummary:
    """Ingest ``records`` (Documents, or dicts with id/text and other fields as metadata).

    At most ``max_in_flight`` tasks of ``chunk_size`` texts are queued at once. On Ctrl-C
    it stops sending, waits for the tasks in flight, and returns with ``interrupted``.
    ``on_progress(summary, documents_done)`` is called after each finished task.
    """
    from embedq.tasks import ingest_documents

    summary, started = IngestSummary(), time.perf_counter()
    pending: deque[tuple[Any, int, int]] = deque()
    options = {"queue": queue} if queue else {}

    def settle_oldest() -> None:
        result, docs, texts = pending.popleft()
        try:
            summary.add(result.get(timeout=timeout_s))
        except Exception as exc:
            summary.fail(f"task {result.id}", f"{type(exc).__name__}: {exc}", texts)
        if on_progress:
            on_progress(summary, docs)

    try:
        for batch, parents, docs in _tasks(records, summary, chunk_size, chunk_tokens, overlap):
            while len(pending) >= max_in_flight:
                settle_oldest()
            result = ingest_documents.apply_async((collection, batch, parents), **options)
            pending.append((result, docs, len(batch)))
    except KeyboardInterrupt:
        summary.interrupted = True
    try:
        while pending:
            settle_oldest()
    except KeyboardInterrupt:
        summary.interrupted = True
    summary.wall_s = round(time.perf_counter() - started, 3)
    return summary
