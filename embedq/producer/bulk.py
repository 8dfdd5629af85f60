"""Bulk ingestion: stream documents into ``ingest_documents`` tasks with bounded in-flight work.

Nothing is held in memory but the tasks in flight. Documents already stored with the same
text are skipped by the worker, so a rerun after an interruption stores each one once.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeout

from embedq.broker.client import (
    BROKER_ERRORS,
    MemoryWatch,
    shared_client,
    throttled_warning,
    wait_while_full,
)
from embedq.broker.results import get_and_forget
from embedq.broker.traffic import new_job
from embedq.errors import InvalidInputError
from embedq.inputs import parse_documents
from embedq.producer.chunker import chunk_spans
from embedq.producer.reader import BadRecord, Document, to_document
from embedq.settings import get_settings
from embedq.store.base import now_version

log = logging.getLogger(__name__)

MAX_FAILURES_KEPT = 50
# While waiting for results, Redis's memory is read at most this often (INFO memory, cheap).
MEMORY_CHECK_S = 5.0


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
    resent: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    error: str | None = None
    wall_s: float = 0.0
    #: Why the run is waiting right now (a full Redis), for the progress line; else None.
    waiting: str | None = None
    #: Times a full Redis made the run (or the workers it waits for) wait.
    redis_full_waits: int = 0

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


def refusal(doc: Document) -> str | None:
    """Why the worker would refuse ``doc``, checked here so it fails alone, not its task."""
    try:
        parse_documents("check", [{"id": doc.id, "text": doc.text, "metadata": doc.metadata}])
    except InvalidInputError as exc:
        return str(exc).replace("texts[0] ", "the text ").replace("[0]", "")
    return None


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


def batches(
    records: Iterable[Any],
    summary: IngestSummary,
    chunk_size: int,
    chunk_tokens: int | None,
    overlap: int,
    model: str | None = None,
) -> Iterator[tuple[list[dict[str, Any]], dict[str, int], int]]:
    """The ``ingest_documents`` tasks ``records`` make: (payloads of about ``chunk_size``
    items, chunk counts per chunked document, documents), a document's chunks in one task.
    Records that cannot be stored are counted in ``summary`` and left out. ``model`` names
    the tokenizer chunks are cut with (default: the default model's)."""
    # Chunks are cut with the tokenizer of the model that will embed them.
    model = model or get_settings().model
    batch: list[dict[str, Any]] = []
    parents: dict[str, int] = {}
    docs = 0
    for n, record in enumerate(records, 1):
        doc = _as_document(record, n)
        summary.read += 1
        if isinstance(doc, BadRecord):
            summary.fail(f"line {doc.line}", doc.reason)
            continue
        if reason := refusal(doc):
            summary.fail(f"record {n} (id {doc.id[:64]!r})", reason)
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


def _publish(sent: Sent) -> Any:
    from embedq.tasks import ingest_documents

    return ingest_documents.apply_async(sent.args, **sent.options)


def task_wait_s() -> float:
    """How long a task may take to finish after it was sent, in the worst case."""
    limit = get_settings().task_time_limit_s
    # A task whose worker died (or whose ack a Redis restart lost) comes back after the
    # visibility timeout (two hard limits), then runs for at most one more.
    return 3.0 * limit


def ingest(
    records: Iterable[Document | BadRecord | dict[str, Any]],
    collection: str,
    *,
    chunk_size: int = 64,
    max_in_flight: int = 16,
    queue: str | None = None,
    chunk_tokens: int | None = None,
    overlap: int = 0,
    timeout_s: float | None = None,
    on_progress: Callable[[IngestSummary, int], None] | None = None,
    model: str | None = None,
    traffic: str | None = None,
) -> IngestSummary:
    """Ingest ``records`` (Documents, or dicts with id/text and other fields as metadata).

    At most ``max_in_flight`` tasks of ``chunk_size`` texts are queued at once. On Ctrl-C
    it stops sending, waits up to ``EMBEDQ_INGEST_DRAIN_TIMEOUT_S`` for the tasks in flight,
    and returns with ``interrupted``. ``on_progress(summary, documents_done)`` is called
    after each finished task. A broker outage is waited out; one that outlasts the publish
    retries stops the run with ``error`` set. ``timeout_s`` bounds the wait for one task
    (default: three hard time limits, see :func:`task_wait_s`); a task unanswered that long
    is sent once more (``resent``), then its documents are reported failed. ``model``
    selects one of the workers' models by name (default: their first). The run's tasks are
    one bulk job (``traffic="interactive"`` makes them interactive): two runs share the
    workers in turn, whatever their sizes.
    """
    timeout_s = timeout_s or task_wait_s()
    summary, started = IngestSummary(), time.perf_counter()
    inflight = InFlight(summary, timeout_s, on_progress)
    options: dict[str, Any] = {"queue": queue} if queue else {}
    options |= {"job": new_job()} | ({"traffic": traffic} if traffic else {})
    try:
        tasks = batches(records, summary, chunk_size, chunk_tokens, overlap, model)
        _send_all(tasks, inflight, max_in_flight, (collection, model), options)
    except KeyboardInterrupt:
        summary.interrupted = True
    deadline = time.monotonic() + get_settings().ingest_drain_timeout_s
    try:
        # Stopped by Ctrl-C or a lost broker: the tasks in flight get the drain timeout.
        inflight.drain(deadline if summary.interrupted or summary.error else None)
    except KeyboardInterrupt:
        summary.interrupted = True
        inflight.abandon("interrupted twice")
    summary.wall_s = round(time.perf_counter() - started, 3)
    return summary


def _send_all(
    tasks: Iterable[tuple[list[dict[str, Any]], dict[str, int], int]],
    inflight: InFlight,
    max_in_flight: int,
    target: tuple[str, str | None],
    options: dict[str, Any],
) -> None:
    """Send every task, at most ``max_in_flight`` unsettled at once; a broker that stays
    unreachable stops the sending (``summary.error``)."""
    collection, model = target
    summary = inflight.summary
    for batch, parents, docs in tasks:
        while len(inflight.pending) >= max_in_flight:
            inflight.settle_oldest()
        # The version orders writes of one item: an older task never undoes a newer one.
        sent = Sent((collection, batch, parents, model, now_version()), options, docs, len(batch))
        try:
            inflight.send(sent)
        except BROKER_ERRORS as exc:
            summary.fail("broker", f"could not queue a task: {exc}", len(batch))
            summary.error = f"the broker stayed unreachable: {exc}"
            return
        except InvalidInputError as exc:
            summary.fail("task not sent", str(exc), len(batch))


@dataclass
class Sent:
    """One ``ingest_documents`` task: what it carries, and its result once sent."""

    args: tuple[Any, ...]
    options: dict[str, Any]
    docs: int
    texts: int
    result: Any = None
    resent: bool = False


class InFlight:
    """The tasks sent and not yet settled, oldest first.

    A full Redis (maxmemory, noeviction) is waited out, never a failure: publishing retries
    with backoff, and while a result is awaited Redis's memory is checked every few seconds.
    Either way ``summary.waiting`` says why nothing moves, and ``on_progress`` shows it."""

    def __init__(
        self,
        summary: IngestSummary,
        timeout_s: float,
        on_progress: Callable[[IngestSummary, int], None] | None,
    ) -> None:
        self.summary, self.timeout_s, self.on_progress = summary, timeout_s, on_progress
        self.pending: deque[Sent] = deque()
        self.memory = MemoryWatch(shared_client(), MEMORY_CHECK_S)

    def send(self, sent: Sent) -> None:
        """Queue ``sent`` as a task (waiting while Redis is full) and keep it in flight."""
        sent.result = wait_while_full(lambda: _publish(sent), "ingest", on_wait=self._waiting)
        self._waiting(None)
        self.pending.append(sent)

    def _waiting(self, why: str | None) -> None:
        if why is not None:
            self.summary.redis_full_waits += 1
        if why != self.summary.waiting:
            self.summary.waiting = why
            if self.on_progress:
                self.on_progress(self.summary, 0)

    def _check_memory(self) -> None:
        state = self.memory.state()
        if state is None or not state.full:
            self._waiting(None)
            return
        used = state.as_dict()
        why = f"Redis is full ({used['used_mb']} of {used['maxmemory_mb']} MB): workers wait"
        throttled_warning(log, "ingest-full", "%s for room; nothing is lost", why)
        self._waiting(why)

    def settle_oldest(self, deadline: float | None = None) -> None:
        """Wait for the oldest task; a broker outage meanwhile is waited out, not a failure."""
        sent = self.pending.popleft()
        try:
            counts = get_and_forget(sent.result, self.timeout_s, deadline, self._check_memory)
            self.summary.add(counts)
        except CeleryTimeout as exc:
            if sent.resent or deadline is not None or not self._resend(sent):
                self.summary.fail(f"task {sent.result.id}", f"TimeoutError: {exc}", sent.texts)
            else:
                return
        except Exception as exc:
            self.summary.fail(f"task {sent.result.id}", f"{type(exc).__name__}: {exc}", sent.texts)
        if self.on_progress:
            self.on_progress(self.summary, sent.docs)

    def _resend(self, sent: Sent) -> bool:
        # Redis can lose a task message across a restart (kombu pops it with BRPOP and the
        # reply dies with the connection): one unanswered for a whole task wait is sent
        # once more. Documents it already stored are skipped.
        waited = f"{self.timeout_s:.0f} s"
        log.warning("task %s: no answer in %s, sending it again", sent.result.id, waited)
        try:
            sent.result = wait_while_full(lambda: _publish(sent), "ingest", on_wait=self._waiting)
        except BROKER_ERRORS:
            return False
        sent.resent = True
        self.pending.appendleft(sent)
        self.summary.resent += 1
        return True

    def drain(self, deadline: float | None) -> None:
        """Settle every task; past ``deadline`` the rest are reported unfinished."""
        while self.pending:
            if deadline is not None and time.monotonic() >= deadline:
                self.abandon("still running when the drain timeout ran out")
                return
            self.settle_oldest(deadline)

    def abandon(self, why: str) -> None:
        """Report every unsettled task as unfinished (a rerun stores what they did not)."""
        while self.pending:
            sent = self.pending.popleft()
            self.summary.fail(f"task {sent.result.id}", f"{why}; rerun to finish", sent.texts)
