"""What waits in a worker's batcher: requests, the texts they need, by traffic class.

A *request* is one task's texts. Each distinct text (per model and normalize flag) is one
*slot*, shared by every request waiting for it, however many tasks sent it. Slots wait for
the encoder in two lines: interactive slots in arrival order, bulk slots per job, taken in
turn (round robin: two ingests share the encoder, a small one is never stuck behind a
large one). A slot any interactive request waits for moves to the interactive line.

Deadlines: a request whose deadline passed is answered ``DeadlineExceededError`` and stops
waiting; a slot nobody waits for any more is dropped before it reaches the encoder.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from embedq.broker.traffic import Traffic
from embedq.errors import DeadlineExceededError, EncoderError


@dataclass(frozen=True)
class BatchResult:
    """What one request gets back: its vectors and which of its texts were cut."""

    vectors: np.ndarray
    truncated: tuple[int, ...]
    cache_hits: int = 0


@dataclass(eq=False)
class Slot:
    """One distinct text to embed, and everyone waiting for its vector."""

    key: str
    text: str
    normalize: bool
    waiters: list[Request] = field(default_factory=list)
    ids: list[int] | None = None
    truncated: bool = False
    vector: np.ndarray | None = None
    error: str | None = None
    #: Answered from a cache (or another worker's single flight), not encoded here.
    hit: bool = False
    #: Whether it waits in a line of the pool now (a slot runs or is fetched meanwhile).
    queued: bool = False
    #: Whether this worker holds its single-flight lease (released once encoded).
    leased: bool = False

    @property
    def length(self) -> int:
        """Its tokens (known once tokenized)."""
        return len(self.ids) if self.ids is not None else 0

    @property
    def done(self) -> bool:
        """Whether it has its vector, or failed."""
        return self.vector is not None or self.error is not None

    @property
    def interactive(self) -> bool:
        """Whether an interactive request waits for it."""
        return any(r.traffic is Traffic.INTERACTIVE for r in self.waiters)


@dataclass(eq=False)
class Request:
    """One task's texts, its class, job and deadline, and the future its task waits on."""

    texts: list[str]
    normalize: bool
    traffic: Traffic = Traffic.INTERACTIVE
    job: str = "-"
    #: ``time.monotonic()`` after which nobody waits for the answer; None: no deadline.
    deadline: float | None = None
    future: Future[BatchResult] = field(default_factory=Future)
    slots: list[Slot] = field(default_factory=list)
    rows: np.ndarray | None = None
    left: int = 0

    def expired(self, now: float) -> bool:
        """Whether the deadline has passed."""
        return self.deadline is not None and now >= self.deadline

    def answer(self) -> None:
        """Resolve the future from the slots (all done): the rows in input order."""
        bad = [s.error for s in self.slots if s.error is not None]
        if bad:
            what = f"{len(bad)} of {len(self.texts)} texts could not be encoded: {bad[0]}"
            self.future.set_exception(EncoderError(what))
            return
        assert self.rows is not None
        vectors = np.stack([s.vector for s in self.slots]) if self.slots else None
        cut = np.array([s.truncated for s in self.slots], dtype=bool)
        hits = np.array([s.hit for s in self.slots], dtype=bool)
        dim = 0 if vectors is None else vectors.shape[1]
        rows = vectors[self.rows] if vectors is not None else np.zeros((0, dim), np.float32)
        truncated = tuple(np.flatnonzero(cut[self.rows]).tolist()) if len(self.rows) else ()
        self.future.set_result(BatchResult(rows, truncated, int(hits[self.rows].sum())))


class Pool:
    """The slots waiting for the encoder, in their two lines, and the open requests."""

    def __init__(self) -> None:
        self.interactive: deque[Slot] = deque()
        # Bulk slots per job; the first job is next in turn.
        self.bulk: OrderedDict[str, deque[Slot]] = OrderedDict()
        self.by_key: dict[str, Slot] = {}
        self.requests: set[Request] = set()

    def __len__(self) -> int:
        return len(self.interactive) + sum(len(q) for q in self.bulk.values())

    def has_interactive(self) -> bool:
        """Whether an interactive slot waits."""
        return any(s.queued and s.waiters for s in self.interactive)

    def has_bulk(self) -> bool:
        """Whether a bulk slot waits."""
        return any(s.queued and s.waiters for q in self.bulk.values() for s in q)

    def put(self, slot: Slot, front: bool = False) -> None:
        """Queue ``slot`` in its line (the interactive one if anyone interactive waits)."""
        slot.queued = True
        if slot.interactive:
            (self.interactive.appendleft if front else self.interactive.append)(slot)
            return
        line = self.bulk.setdefault(_job_of(slot), deque())
        (line.appendleft if front else line.append)(slot)

    def promote(self, slot: Slot) -> None:
        """An interactive request now waits for a queued bulk ``slot``: queue it again in
        the interactive line (its bulk entry is skipped when reached)."""
        if slot.queued:
            self.interactive.append(slot)

    def take(self, budget: int, max_items: int, only: Traffic, padded: bool = True) -> list[Slot]:
        """Slots of class ``only`` to encode next (interactive: in arrival order; bulk: jobs
        in turn) while their cost fits ``budget`` (``padded``: longest x count, one batch;
        else the sum of their tokens, a round of several batches) and ``max_items``; one
        normalize flag at a time. A taken slot leaves its line."""
        taken: list[Slot] = []
        longest = total = 0
        line = self._line(self.interactive) if only is Traffic.INTERACTIVE else self._bulk_turns()
        for slot in line:
            if not slot.queued or (taken and slot.normalize is not taken[0].normalize):
                continue
            longest, total = max(longest, slot.length), total + slot.length
            cost = longest * (len(taken) + 1) if padded else total
            if taken and (cost > budget or len(taken) >= max_items):
                break
            slot.queued = False
            taken.append(slot)
        self._compact()
        return taken

    def _line(self, line: deque[Slot]) -> Iterator[Slot]:
        for slot in list(line):
            if slot.queued and slot.waiters:
                yield slot

    def _bulk_turns(self) -> Iterator[Slot]:
        """Bulk slots, one job at a time in turn; the job served moves to the back."""
        cursors = {job: iter(self._line(line)) for job, line in self.bulk.items()}
        while cursors:
            for job in list(cursors):
                slot = next(cursors[job], None)
                if slot is None:
                    del cursors[job]
                    continue
                self.bulk.move_to_end(job)
                yield slot

    def _compact(self) -> None:
        """Drop taken, dropped and abandoned slots from the lines' heads and empty jobs."""
        _trim(self.interactive)
        for job in list(self.bulk):
            if not _trim(self.bulk[job]):
                del self.bulk[job]

    def forget(self, slot: Slot) -> None:
        """``slot`` is done (or nobody wants it): no new request joins it."""
        if self.by_key.get(slot.key) is slot:
            del self.by_key[slot.key]
        slot.queued = False

    def expire(self, now: float | None = None) -> list[Request]:
        """Requests whose deadline passed: answered ``DeadlineExceededError``, removed from
        their slots' waiters (a slot left without any is dropped from the lines)."""
        now = time.monotonic() if now is None else now
        gone = [r for r in self.requests if r.expired(now)]
        for request in gone:
            self.requests.discard(request)
            for slot in request.slots:
                if request in slot.waiters:
                    slot.waiters.remove(request)
                if not slot.waiters and slot.queued:
                    self.forget(slot)
            if not request.future.done():
                request.future.set_exception(
                    DeadlineExceededError("the caller's deadline passed before it was encoded")
                )
        if gone:
            self._compact()
        return gone


def _job_of(slot: Slot) -> str:
    return slot.waiters[0].job if slot.waiters else "-"


def _trim(line: deque[Slot]) -> int:
    """Pop slots that are no longer queued (or wanted) off the head; what is left."""
    while line and not (line[0].queued and line[0].waiters):
        line.popleft()
    return len(line)
