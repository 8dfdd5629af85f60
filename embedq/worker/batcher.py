"""Cross-task batching: requests from many tasks -> token-budget batches -> encoder.

Data flow (as in TEI): tasks ``submit`` texts; one thread admits whatever requests arrived
(distinct texts only, one cache lookup for all of them, the misses tokenized once, single
flight leases taken in one pipeline), then encodes one *round* and loops:

- interactive texts waiting: one batch of them, cut to ``EMBEDQ_INTERACTIVE_BATCH_MS``;
- else bulk texts, jobs in turn: up to ``ROUND_BATCHES`` batches sorted by length (padded
  cost longest x count within the token budget), stopped between two batches when an
  interactive request arrives; while interactive traffic is present each batch is cut to
  ``EMBEDQ_INTERACTIVE_BATCH_MS`` too, so an interactive text waits at most one short batch;
- bulk below ``EMBEDQ_BULK_MIN_SHARE`` of the tokens lately: one bulk batch first.

After each round the cache is filled (one pipeline) and every request whose texts are all
done gets its rows in its own order. Requests past their deadline are answered
``DeadlineExceededError`` and their texts are not encoded for them (:mod:`.pool`).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from embedq.broker.traffic import Traffic
from embedq.encode.base import Encoder, Tokenized
from embedq.errors import DeviceFailedError
from embedq.keys import vector_key
from embedq.ops import metrics
from embedq.worker.budget import BudgetTuner, Pace
from embedq.worker.cache import Cache, unpack_vector
from embedq.worker.encoding import Encoded, encode_all, pack
from embedq.worker.flight import Flight
from embedq.worker.pool import BatchResult, Pool, Request, Slot

__all__ = ["BatchResult", "Batcher", "BatcherStats", "encode_all", "pack"]

log = logging.getLogger(__name__)

# Interactive traffic counts as present this long after an interactive request came:
# meanwhile every batch is cut to EMBEDQ_INTERACTIVE_BATCH_MS.
PRESENT_S = 2.0
# A round of bulk work is this many batches at most (encoded sorted by length, so they pad
# little); interactive work arriving meanwhile stops it between two batches.
ROUND_BATCHES = 4
# Each batch weighs this much less in the recent shares of the classes.
SHARE_DECAY = 0.95


@dataclass
class BatcherStats:
    """Counters since the worker started (read by tests, status and metrics)."""

    requests: int = 0
    batches: int = 0
    texts_encoded: int = 0
    padded_tokens: int = 0
    largest_batch: int = 0
    splits: int = 0
    failed_texts: int = 0
    #: Real (unpadded) tokens encoded, and the model's seconds spent on them (for cost).
    tokens_encoded: int = 0
    encode_seconds: float = 0.0
    #: Requests dropped unencoded because their deadline passed.
    expired: int = 0

    def record_batch(self, count: int, padded: int, tokens: int = 0, seconds: float = 0.0) -> None:
        """Count one encoded batch of ``count`` texts costing ``padded`` tokens."""
        self.batches += 1
        self.texts_encoded += count
        self.padded_tokens += padded
        self.largest_batch = max(self.largest_batch, count)
        self.tokens_encoded += tokens
        self.encode_seconds += seconds


@dataclass
class Shares:
    """Tokens encoded lately per class (each batch weighs a little less than the one after
    it), for bulk's minimum share of the encoder."""

    interactive: float = 0.0
    bulk: float = 0.0

    def add(self, traffic: Traffic, tokens: int) -> None:
        """Count one batch of ``tokens`` real tokens of ``traffic``."""
        self.interactive *= SHARE_DECAY
        self.bulk *= SHARE_DECAY
        if traffic is Traffic.BULK:
            self.bulk += tokens
        else:
            self.interactive += tokens

    def bulk_below(self, share: float) -> bool:
        """Whether bulk got less than ``share`` of the tokens lately."""
        total = self.interactive + self.bulk
        return total > 0 and self.bulk < share * total


@dataclass(frozen=True)
class _Landed:
    """A key another worker was encoding: its cache value, or None (encode it here)."""

    key: str
    value: bytes | None


class Batcher:
    """Collects requests from concurrent tasks and serves them from one encoding thread:
    interactive texts first, bulk jobs in turn, deadlines kept (see :mod:`.pool`)."""

    def __init__(
        self,
        encoder: Encoder,
        cache: Cache,
        *,
        wait_s: float,
        max_batch_size: int,
        max_batch_tokens: int | None = None,
        adaptive: bool = False,
        latency_target_s: float | None = None,
        flight: Flight | None = None,
        on_fatal: Callable[[DeviceFailedError], None] | None = None,
        interactive_batch_s: float = 0.025,
        bulk_min_share: float = 0.1,
    ) -> None:
        self.encoder = encoder
        # Called when the device fails for good (the runtime stops the worker there).
        self.on_fatal = on_fatal
        self.cache = cache
        # Single flight across workers (None: every worker encodes its own misses).
        self.flight = flight
        self.wait_s = wait_s
        self.max_batch_size = max_batch_size
        self.interactive_batch_s = interactive_batch_s
        self.bulk_min_share = bulk_min_share
        # A budget given here is fixed; otherwise the encoder's is where learning starts.
        self.budget = BudgetTuner(
            budget=max_batch_tokens or encoder.max_batch_tokens,
            floor=encoder.max_seq_tokens,
            cap=max(max_batch_tokens or 0, encoder.max_fit_tokens),
            latency_target_s=latency_target_s,
            # A fixed budget given here is never tuned.
            adaptive=adaptive and not max_batch_tokens,
        )
        self.pace = Pace()
        self.shares = Shares()
        self.stats = BatcherStats()
        self.pool = Pool()
        self._intake: queue.SimpleQueue[Request | _Landed | None] = queue.SimpleQueue()
        # Slots whose keys another worker leases: watched by the flight's thread.
        self._watched: dict[str, Slot] = {}
        # Interactive requests submitted so far, and when the last one came (task threads
        # write these; the batcher thread only reads them).
        self._arrivals, self._last_interactive = 0, -math.inf
        self._arrivals_lock = threading.Lock()
        self._round_start_arrivals = 0
        self._round_traffic = Traffic.BULK
        self._closing = False
        # Bulk requests held back one round behind interactive ones (see _take_in).
        self._later: list[Request] = []
        self._thread = threading.Thread(target=self._run, name="embedq-batcher", daemon=True)
        self._thread.start()

    def submit(
        self,
        texts: list[str],
        normalize: bool,
        traffic: Traffic = Traffic.INTERACTIVE,
        job: str = "-",
        deadline: float | None = None,
    ) -> Future[BatchResult]:
        """Queue ``texts`` for encoding; the future resolves to this request's rows.
        ``deadline`` (``time.monotonic()``): past it, the texts are not encoded for this
        request and the future fails with ``DeadlineExceededError``."""
        request = Request(texts, normalize, traffic, job, deadline)
        if traffic is Traffic.INTERACTIVE:
            with self._arrivals_lock:
                self._last_interactive = time.monotonic()
                self._arrivals += 1
        self._intake.put(request)
        return request.future

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish what is queued, then stop the thread."""
        self._intake.put(None)
        self._thread.join(timeout_s)

    @property
    def max_batch_tokens(self) -> int:
        """The padded-token budget of the next batch (learned when adaptive)."""
        return self.budget.budget

    def _record_batch(self, count: int, padded: int, tokens: int, seconds: float) -> None:
        self.stats.record_batch(count, padded, tokens, seconds)
        self.budget.observe(padded, tokens, seconds)
        self.pace.observe(padded, seconds)
        self.shares.add(self._round_traffic, tokens)
        metrics.BATCH_BUDGET.labels(self.encoder.model_id).set(self.budget.budget)
        metrics.TEXTS.labels(self.encoder.device).inc(count)
        metrics.TOKENS.labels(self.encoder.device).inc(tokens)
        metrics.BATCH_SIZE.observe(count)
        metrics.BATCH_TOKENS.observe(padded)
        metrics.ENCODE_SECONDS.observe(seconds)

    def _run(self) -> None:
        while self._take_in():
            self._expire()
            try:
                self._serve_round()
            except Exception:  # the thread must survive anything one round does
                log.exception("batch round failed")

    def _expire(self) -> None:
        """Answer requests past their deadline; release the leases of texts nobody waits
        for any more (other workers need not wait for vectors that will not come)."""
        gone = self.pool.expire()
        for request in gone:
            log.info(
                "dropped %s request of %d texts: its deadline passed",
                request.traffic,
                len(request.texts),
            )
        self.stats.expired += len(gone)
        dropped = {s.key: s for r in gone for s in r.slots if s.leased and not s.waiters}
        if dropped and self.flight is not None:
            for slot in dropped.values():
                slot.leased = False
            self.flight.release(list(dropped))

    # --- intake -------------------------------------------------------------------------

    def _take_in(self) -> bool:
        """Admit what arrived (waiting for it while there is nothing to do); False once
        closed and everything queued is served. Bulk requests that came with interactive
        ones are admitted after the interactive round (their cache lookup and tokenizing
        would delay it)."""
        items = self._arrived(block=not len(self.pool) and not self._later)
        # An interactive request arriving from here on stops the next round between batches.
        self._round_start_arrivals = self._arrivals
        later, self._later = self._later, []
        requests = [i for i in items if isinstance(i, Request)]
        # Held back one round at most: bulk is never starved by this.
        if any(r.traffic is Traffic.INTERACTIVE for r in requests):
            self._later = [r for r in requests if r.traffic is not Traffic.INTERACTIVE]
            requests = [r for r in requests if r.traffic is Traffic.INTERACTIVE]
        requests = later + requests
        self._closing = self._closing or any(i is None for i in items)
        if requests:
            self._admit(requests)
        for item in items:
            if isinstance(item, _Landed):
                self._land(item)
        idle = not len(self.pool) and not self._watched and not self._later
        return not (self._closing and idle)

    def _arrived(self, block: bool) -> list[Request | _Landed | None]:
        """Everything in the intake now; when ``block``, first wait for one item, then up
        to ``wait_s`` for more requests to batch with it."""
        items: list[Request | _Landed | None] = []
        if block and not (self._closing and not self._watched):
            items.append(self._intake.get())
            self._gather(items)
        while True:
            try:
                items.append(self._intake.get_nowait())
            except queue.Empty:
                return items

    def _gather(self, items: list[Request | _Landed | None]) -> None:
        deadline = time.monotonic() + self.wait_s
        count = sum(len(i.texts) for i in items if isinstance(i, Request))
        while count < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
            try:
                item = self._intake.get(timeout=left)
            except queue.Empty:
                return
            items.append(item)
            count += len(item.texts) if isinstance(item, Request) else 0

    def _admit(self, requests: list[Request]) -> None:
        """Join each request to the slots of its distinct texts (new slots for texts not
        waiting yet), answer what the cache has, tokenize and queue the rest."""
        self.stats.requests += len(requests)
        fresh: dict[str, Slot] = {}
        for request in requests:
            self._join(request, fresh)
        slots = list(fresh.values())
        misses = []
        for slot, value in zip(slots, self.cache.get_many([s.key for s in slots]), strict=True):
            if value is None:
                misses.append(slot)
            else:
                slot.vector, slot.truncated = unpack_vector(value)
                slot.hit = True
        self._queue_misses(misses)
        for slot in slots:
            if slot.done:
                self._complete(slot)

    def _join(self, request: Request, fresh: dict[str, Slot]) -> None:
        unique = list(dict.fromkeys(request.texts))
        model_id = self.encoder.model_id
        for text in unique:
            key = vector_key(model_id, request.normalize, text)
            slot = self.pool.by_key.get(key) or fresh.get(key)
            if slot is None:
                slot = fresh[key] = Slot(key, text, request.normalize)
            promote = request.traffic is Traffic.INTERACTIVE and not slot.interactive
            slot.waiters.append(request)
            request.slots.append(slot)
            if promote:
                self.pool.promote(slot)
        place = {text: i for i, text in enumerate(unique)}
        request.rows = np.fromiter((place[t] for t in request.texts), np.int64, len(request.texts))
        request.left = len(unique)
        self.pool.requests.add(request)
        if not unique:
            self._finish(request)

    def _queue_misses(self, misses: list[Slot]) -> None:
        """Tokenize the misses once; queue those this worker encodes, watch those another
        worker leases (single flight)."""
        if not misses:
            return
        for slot in misses:
            self.pool.by_key[slot.key] = slot
        tok = self.encoder.tokenize([s.text for s in misses])
        for slot, ids, cut in zip(misses, tok.ids, tok.truncated, strict=True):
            slot.ids, slot.truncated = ids, bool(cut)
        held = self.flight.claim([s.key for s in misses]) if self.flight else None
        theirs = [s for s, mine in zip(misses, held or [], strict=False) if not mine]
        for slot in misses:
            slot.leased = held is not None and slot not in theirs
            if slot not in theirs:
                self.pool.put(slot)
        if theirs and self.flight is not None:
            self._watched.update((s.key, s) for s in theirs)
            self.flight.watch([s.key for s in theirs], lambda k, v: self._intake.put(_Landed(k, v)))

    def _land(self, landed: _Landed) -> None:
        """A watched key: its vector came from another worker, or it is encoded here."""
        slot = self._watched.pop(landed.key, None)
        if slot is None:
            return
        if landed.value is None:
            self.pool.put(slot)
            return
        slot.vector, slot.truncated = unpack_vector(landed.value)
        slot.hit = True
        self._complete(slot)

    # --- serving ------------------------------------------------------------------------

    def _serve_round(self) -> None:
        """Encode the next round: one batch of interactive texts when any wait (unless bulk
        is below its share: one bulk batch then), else up to ``ROUND_BATCHES`` batches of
        bulk texts, stopped when interactive work arrives. While interactive traffic is
        present, bulk batches are cut to ``interactive_batch_s`` of encoding."""
        if not len(self.pool):
            return
        waiting = self.pool.has_interactive()
        bulk_due = waiting and self.pool.has_bulk() and self.shares.bulk_below(self.bulk_min_share)
        budget = self.max_batch_tokens
        if waiting and not bulk_due:
            self._round_traffic = Traffic.INTERACTIVE
            slots = self.pool.take(budget, self.max_batch_size, only=Traffic.INTERACTIVE)
            self._encode(slots, budget, preemptible=False)
            return
        self._round_traffic = Traffic.BULK
        if waiting or time.monotonic() - self._last_interactive < PRESENT_S:
            budget = self.pace.bounded(
                budget, self.interactive_batch_s, self.encoder.max_seq_tokens
            )
        rounds = 1 if bulk_due else ROUND_BATCHES
        slots = self.pool.take(
            budget * rounds, self.max_batch_size * rounds, only=Traffic.BULK, padded=rounds == 1
        )
        self._encode(slots, budget, preemptible=True)

    def _preempted(self) -> bool:
        return self._arrivals != self._round_start_arrivals

    def _encode(self, slots: list[Slot], budget: int, preemptible: bool) -> None:
        if not slots:
            return
        tok = Tokenized([s.ids or [] for s in slots], np.array([s.truncated for s in slots]))
        try:
            enc = encode_all(
                self.encoder,
                tok,
                slots[0].normalize,
                budget,
                self.max_batch_size,
                on_batch=self._record_batch,
                on_oom=self.budget.too_big,
                on_fatal=self.on_fatal,
                preempt=self._preempted if preemptible else None,
            )
        except Exception as exc:
            log.exception("encoding failed")
            enc = Encoded(np.zeros((len(slots), self.encoder.dim), np.float32))
            enc.failed = dict.fromkeys(range(len(slots)), f"encoding failed: {exc}")
        self._settle(slots, enc)

    def _settle(self, slots: list[Slot], enc: Encoded) -> None:
        """Give each encoded slot its vector (or error), fill the cache in one pipeline,
        release the leases, answer complete requests; skipped slots queue again in front."""
        skipped = set(enc.skipped.tolist())
        for i in reversed(enc.skipped.tolist()):
            self.pool.put(slots[i], front=True)
        done = [(i, s) for i, s in enumerate(slots) if i not in skipped]
        for i, slot in done:
            if i in enc.failed:
                slot.error = enc.failed[i]
            else:
                slot.vector = enc.vectors[i]
        self.stats.failed_texts += len(enc.failed)
        fills = {s.key: self.cache.pack(s.vector, s.truncated) for _, s in done if s.error is None}
        self.cache.set_many(fills)
        if self.flight is not None:
            self.flight.release([s.key for _, s in done if s.leased])
        for _, slot in done:
            self._complete(slot)

    def _complete(self, slot: Slot) -> None:
        self.pool.forget(slot)
        for request in list(slot.waiters):
            request.left -= 1
            if request.left == 0:
                self._finish(request)

    def _finish(self, request: Request) -> None:
        self.pool.requests.discard(request)
        if not request.future.done():
            request.answer()
