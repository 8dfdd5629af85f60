"""Cross-task batching: requests from many tasks -> token-budget batches -> encoder.

Data flow (as in TEI): tasks ``submit`` texts; one thread collects whatever requests are
waiting, removes duplicates, answers what the cache has, tokenizes the misses once, sorts
them by length, packs them into batches whose padded cost (longest x count) fits the token
budget, encodes, fills the cache, and hands each task its rows in its own order.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from embedq.encode.base import Encoder, Tokenized, is_out_of_memory
from embedq.errors import EncoderError
from embedq.keys import vector_key
from embedq.ops import metrics
from embedq.worker.budget import BudgetTuner
from embedq.worker.cache import Cache, unpack_vector
from embedq.worker.flight import Flight

log = logging.getLogger(__name__)

# A group stops growing at this many texts, which bounds the wait of the first request.
GROUP_TEXTS_PER_BATCH = 4


def pack(lengths: np.ndarray, max_tokens: int, max_items: int) -> list[np.ndarray]:
    """Split positions into batches, longest first, each with longest x count <= max_tokens.

    Returns arrays of positions into ``lengths``; a text longer than the budget gets a
    batch of its own.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = max(1, int(lengths[order[start]]))
        size = max(1, min(max_items, max_tokens // longest, len(order) - start))
        batches.append(order[start : start + size])
        start += size
    return batches


@dataclass
class Encoded:
    """Vectors for every position, and the positions that failed with why."""

    vectors: np.ndarray
    failed: dict[int, str] = field(default_factory=dict)


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

    def record_batch(self, count: int, padded: int, tokens: int = 0, seconds: float = 0.0) -> None:
        """Count one encoded batch of ``count`` texts costing ``padded`` tokens."""
        self.batches += 1
        self.texts_encoded += count
        self.padded_tokens += padded
        self.largest_batch = max(self.largest_batch, count)
        self.tokens_encoded += tokens
        self.encode_seconds += seconds


def encode_all(
    encoder: Encoder,
    tok: Tokenized,
    normalize: bool,
    max_tokens: int,
    max_items: int,
    on_batch: Callable[[int, int, int, float], None] | None = None,
    on_oom: Callable[[], None] | None = None,
) -> Encoded:
    """Encode every tokenized text in packed batches, splitting any batch that fails."""
    out = Encoded(np.zeros((len(tok.ids), encoder.dim), dtype=np.float32))
    lengths, hooks = tok.lengths, (on_batch, on_oom)
    pending: _Launched | None = None
    for positions in pack(lengths, max_tokens, max_items):
        # The next batch starts before the last one is fetched: on cuda the host pads and
        # copies it while the GPU still runs the previous one.
        launched = _launch(encoder, tok, positions, normalize)
        if pending is not None:
            _fetch(encoder, tok, lengths, pending, normalize, out, hooks)
        pending = launched
        if launched is None:
            _encode_split(encoder, tok, lengths, positions, normalize, out, hooks)
    if pending is not None:
        _fetch(encoder, tok, lengths, pending, normalize, out, hooks)
    return out


@dataclass
class _Launched:
    positions: np.ndarray
    handle: object
    launch_s: float


def _launch(
    encoder: Encoder, tok: Tokenized, positions: np.ndarray, normalize: bool
) -> _Launched | None:
    """Start a batch; None when starting failed (it is then encoded the careful way)."""
    start = time.perf_counter()
    try:
        handle = encoder.launch([tok.ids[i] for i in positions], normalize)
    except Exception as exc:
        log.debug("batch of %d failed to start: %r", len(positions), exc)
        return None
    return _Launched(positions, handle, time.perf_counter() - start)


def _fetch(
    encoder: Encoder,
    tok: Tokenized,
    lengths: np.ndarray,
    launched: _Launched,
    normalize: bool,
    out: Encoded,
    hooks: tuple[Callable[[int, int, int, float], None] | None, Callable[[], None] | None],
) -> None:
    positions, start = launched.positions, time.perf_counter()
    try:
        out.vectors[positions] = encoder.fetch(launched.handle)
    except Exception:
        _encode_split(encoder, tok, lengths, positions, normalize, out, hooks)
        return
    _report(hooks[0], lengths, positions, launched.launch_s + time.perf_counter() - start)


def _encode_split(
    encoder: Encoder,
    tok: Tokenized,
    lengths: np.ndarray,
    positions: np.ndarray,
    normalize: bool,
    out: Encoded,
    hooks: tuple[Callable[[int, int, int, float], None] | None, Callable[[], None] | None],
) -> None:
    on_batch, on_oom = hooks
    start = time.perf_counter()
    try:
        out.vectors[positions] = encoder.embed_ids([tok.ids[i] for i in positions], normalize)
    except Exception as exc:
        if len(positions) == 1:
            out.failed[int(positions[0])] = f"{type(exc).__name__}: {exc}"
            log.error("text at position %d could not be encoded: %r", positions[0], exc)
            return
        # Halving isolates both out-of-memory batches and a single poisonous text.
        kind = "out of memory" if is_out_of_memory(exc) else type(exc).__name__
        log.warning("batch of %d failed (%s): splitting it in half", len(positions), kind)
        if on_oom is not None and is_out_of_memory(exc):
            on_oom()
        metrics.SPLITS.inc()
        _free_device_memory()
        half = len(positions) // 2
        for part in (positions[:half], positions[half:]):
            _encode_split(encoder, tok, lengths, part, normalize, out, hooks)
        return
    _report(on_batch, lengths, positions, time.perf_counter() - start)


def _report(
    on_batch: Callable[[int, int, int, float], None] | None,
    lengths: np.ndarray,
    positions: np.ndarray,
    seconds: float,
) -> None:
    """Tell ``on_batch`` of one encoded batch: texts, padded cost, real tokens, seconds."""
    if on_batch is not None:
        batch = lengths[positions]
        on_batch(len(positions), int(batch.max()) * len(positions), int(batch.sum()), seconds)


def _free_device_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


@dataclass(frozen=True)
class BatchResult:
    """What one request gets back: its vectors and which of its texts were cut."""

    vectors: np.ndarray
    truncated: tuple[int, ...]
    cache_hits: int = 0


@dataclass
class _Pending:
    texts: list[str]
    normalize: bool
    future: Future[BatchResult]


class Batcher:
    """Collects requests from concurrent tasks and serves them from one encoding thread."""

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
    ) -> None:
        self.encoder = encoder
        self.cache = cache
        # Single flight across workers (None: every worker encodes its own misses).
        self.flight = flight
        self.wait_s = wait_s
        self.max_batch_size = max_batch_size
        # A budget given here is fixed; otherwise the encoder's is where learning starts.
        self.budget = BudgetTuner(
            budget=max_batch_tokens or encoder.max_batch_tokens,
            floor=encoder.max_seq_tokens,
            cap=max(max_batch_tokens or 0, encoder.max_fit_tokens),
            latency_target_s=latency_target_s,
            # A fixed budget given here is never tuned.
            adaptive=adaptive and not max_batch_tokens,
        )
        self.stats = BatcherStats()
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="embedq-batcher", daemon=True)
        self._thread.start()

    def submit(self, texts: list[str], normalize: bool) -> Future[BatchResult]:
        """Queue ``texts`` for encoding; the future resolves to this request's rows."""
        pending = _Pending(texts, normalize, Future())
        self._queue.put(pending)
        return pending.future

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    @property
    def max_batch_tokens(self) -> int:
        """The padded-token budget of the next batch (learned when adaptive)."""
        return self.budget.budget

    def _record_batch(self, count: int, padded: int, tokens: int, seconds: float) -> None:
        self.stats.record_batch(count, padded, tokens, seconds)
        self.budget.observe(padded, tokens, seconds)
        metrics.BATCH_BUDGET.set(self.budget.budget)
        metrics.TEXTS.labels(self.encoder.device).inc(count)
        metrics.TOKENS.labels(self.encoder.device).inc(tokens)
        metrics.BATCH_SIZE.observe(count)
        metrics.BATCH_TOKENS.observe(padded)
        metrics.ENCODE_SECONDS.observe(seconds)

    def _run(self) -> None:
        while (group := self._collect()) is not None:
            self.stats.requests += len(group)
            for normalize in (True, False):
                members = [p for p in group if p.normalize is normalize]
                if members:
                    self._serve(members, normalize)

    def _collect(self) -> list[_Pending] | None:
        first = self._queue.get()
        if first is None:
            return None
        group, count = [first], len(first.texts)
        deadline = time.monotonic() + self.wait_s
        while count < self.max_batch_size * GROUP_TEXTS_PER_BATCH:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # stop after serving this group
                break
            group.append(item)
            count += len(item.texts)
        return group

    def _serve(self, members: list[_Pending], normalize: bool) -> None:
        try:
            unique = list(dict.fromkeys(t for p in members for t in p.texts))
            vectors, truncated, hits, failed = self._embed_unique(unique, normalize)
            slot = {text: i for i, text in enumerate(unique)}
            for p in members:
                rows = np.fromiter((slot[t] for t in p.texts), dtype=np.int64, count=len(p.texts))
                _resolve(p, vectors, truncated, failed, rows, int(hits[rows].sum()))
        except Exception as exc:  # the thread must survive anything one group does
            log.exception("batch group failed")
            for p in members:
                if not p.future.done():
                    p.future.set_exception(EncoderError(f"encoding failed: {exc}"))

    def _embed_unique(
        self, unique: list[str], normalize: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
        keys = [vector_key(self.encoder.model_id, normalize, t) for t in unique]
        vectors = np.empty((len(unique), self.encoder.dim), dtype=np.float32)
        truncated = np.zeros(len(unique), dtype=bool)
        misses = []
        for i, value in enumerate(self.cache.get_many(keys)):
            if value is None:
                misses.append(i)
            else:
                vectors[i], truncated[i] = unpack_vector(value)
        hits = np.ones(len(unique), dtype=bool)
        hits[misses] = False
        if not misses:
            return vectors, truncated, hits, {}
        failed: dict[int, str] = {}

        def encode(rows: list[int]) -> None:
            todo = [misses[r] for r in rows]
            failed.update(self._encode_misses(unique, keys, todo, normalize, vectors, truncated))

        if self.flight is None:
            encode(list(range(len(misses))))
            return vectors, truncated, hits, failed
        # Texts another worker was encoding come from its cache entry, as hits.
        for r, value in self.flight.serve([keys[i] for i in misses], encode).items():
            vectors[misses[r]], truncated[misses[r]] = unpack_vector(value)
            hits[misses[r]] = True
        return vectors, truncated, hits, failed

    def _encode_misses(
        self,
        unique: list[str],
        keys: list[str],
        misses: list[int],
        normalize: bool,
        vectors: np.ndarray,
        truncated: np.ndarray,
    ) -> dict[int, str]:
        """Encode ``unique[misses]`` into ``vectors``, cache them; returns failures by position."""
        tok = self.encoder.tokenize([unique[i] for i in misses])
        enc = encode_all(
            self.encoder,
            tok,
            normalize,
            self.max_batch_tokens,
            self.max_batch_size,
            on_batch=self._record_batch,
            on_oom=self.budget.too_big,
        )
        vectors[misses], truncated[misses] = enc.vectors, tok.truncated
        self.stats.failed_texts += len(enc.failed)
        fills = {
            keys[i]: self.cache.pack(enc.vectors[j], bool(tok.truncated[j]))
            for j, i in enumerate(misses)
            if j not in enc.failed
        }
        self.cache.set_many(fills)
        return {misses[j]: why for j, why in enc.failed.items()}


def _resolve(
    p: _Pending,
    vectors: np.ndarray,
    truncated: np.ndarray,
    failed: dict[int, str],
    rows: np.ndarray,
    cache_hits: int,
) -> None:
    bad = [failed[int(r)] for r in rows if int(r) in failed]
    if bad:
        p.future.set_exception(
            EncoderError(f"{len(bad)} of {len(rows)} texts could not be encoded: {bad[0]}")
        )
        return
    cut = tuple(np.flatnonzero(truncated[rows]).tolist())
    p.future.set_result(BatchResult(vectors[rows], cut, cache_hits))
