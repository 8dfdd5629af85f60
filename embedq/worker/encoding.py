"""Encoding packed batches: token-budget packing, and every failure handled per batch.

``encode_all`` sorts texts by length, packs them into batches whose padded cost (longest x
count) fits the token budget, and encodes them, launching the next batch before fetching
the last (on cuda the host pads and copies while the GPU runs). A batch that fails is split
in halves until the failing text is alone; out of memory lowers the budget of the batches
still to come; a fatal device error stops the worker. ``preempt`` lets a caller stop
between batches (interactive work waiting): the positions not started are handed back.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

from embedq.encode.base import Encoder, Tokenized, is_fatal_device_error, is_out_of_memory
from embedq.errors import DeviceFailedError, NonFiniteVectorError
from embedq.ops import metrics

log = logging.getLogger(__name__)


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
    """Vectors for every position, the positions that failed with why, and those not
    encoded because ``preempt`` stopped the run first."""

    vectors: np.ndarray
    failed: dict[int, str] = field(default_factory=dict)
    skipped: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def encode_all(
    encoder: Encoder,
    tok: Tokenized,
    normalize: bool,
    max_tokens: int,
    max_items: int,
    on_batch: Callable[[int, int, int, float], None] | None = None,
    on_oom: Callable[[], None] | None = None,
    on_fatal: Callable[[DeviceFailedError], None] | None = None,
    preempt: Callable[[], bool] | None = None,
) -> Encoded:
    """Encode every tokenized text in packed batches, splitting any batch that fails.

    Out of memory (at launch or at fetch) halves the budget of the batches still to come
    and splits the failed one; a fatal device error calls ``on_fatal`` and raises
    :class:`~embedq.errors.DeviceFailedError` (no split can help a broken device).
    ``preempt()`` is asked before each batch after the first: true stops the run, and the
    positions not started are left in ``skipped``."""
    out = Encoded(np.zeros((len(tok.ids), encoder.dim), dtype=np.float32))
    run = _Run(encoder, tok, tok.lengths, normalize, out, max_tokens, max_items)
    run.on_batch, run.on_oom, run.on_fatal = on_batch, on_oom, on_fatal
    batches = deque(pack(run.lengths, max_tokens, max_items))
    pending: _Launched | None = None
    started = False
    while batches:
        if started and preempt is not None and preempt():
            out.skipped = np.concatenate(list(batches))
            break
        started = True
        positions = batches.popleft()
        # The next batch starts before the last one is fetched: on cuda the host pads and
        # copies it while the GPU still runs the previous one.
        launched = _launch(run, positions)
        if pending is not None:
            _fetch(run, pending)
        pending = launched if isinstance(launched, _Launched) else None
        if isinstance(launched, _Failure):
            _recover(run, positions, launched)
        if run.repack:
            batches = _repack(run, batches)
    if pending is not None:
        _fetch(run, pending)
    return out


@dataclass
class _Run:
    """One ``encode_all`` call: what its batches share, and its hooks."""

    encoder: Encoder
    tok: Tokenized
    lengths: np.ndarray
    normalize: bool
    out: Encoded
    max_tokens: int
    max_items: int
    on_batch: Callable[[int, int, int, float], None] | None = None
    on_oom: Callable[[], None] | None = None
    on_fatal: Callable[[DeviceFailedError], None] | None = None
    repack: bool = False

    def ids(self, positions: np.ndarray) -> list[list[int]]:
        """The token ids of ``positions``."""
        return [self.tok.ids[i] for i in positions]


@dataclass(frozen=True)
class _Failure:
    """What a failed call leaves: never the exception, whose traceback holds the failed
    batch's tensors (kept, they would block the very memory a split needs)."""

    reason: str
    oom: bool
    fatal: bool


@dataclass
class _Launched:
    positions: np.ndarray
    handle: object
    launch_s: float


def _attempt(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or a :class:`_Failure` describing what it raised."""
    try:
        return fn(*args)
    except Exception as exc:
        failure = _Failure(
            f"{type(exc).__name__}: {exc}", is_out_of_memory(exc), is_fatal_device_error(exc)
        )
    # Out of the handler: the exception and its traceback are gone, and with them the
    # failed batch's tensors.
    return failure


def _launch(run: _Run, positions: np.ndarray) -> _Launched | _Failure:
    """Start a batch; a :class:`_Failure` when starting it failed."""
    start = time.perf_counter()
    handle = _attempt(run.encoder.launch, run.ids(positions), run.normalize)
    if isinstance(handle, _Failure):
        return handle
    return _Launched(positions, handle, time.perf_counter() - start)


def _fetch(run: _Run, launched: _Launched) -> None:
    """Collect a launched batch; timed by its device events when the encoder has them."""
    start = time.perf_counter()
    vectors = _attempt(run.encoder.fetch, launched.handle)
    # The batch's device buffers go with its handle, before any split allocates more.
    handle, launched.handle = launched.handle, None
    if isinstance(vectors, _Failure):
        del handle
        _recover(run, launched.positions, vectors)
        return
    device_s = getattr(handle, "seconds", None)
    seconds = device_s if device_s is not None else launched.launch_s + time.perf_counter() - start
    _keep(run, launched.positions, vectors)
    _report(run, launched.positions, seconds)


def _encode_split(run: _Run, positions: np.ndarray) -> None:
    """Encode ``positions`` in one synchronous call; split it if that fails."""
    start = time.perf_counter()
    vectors = _attempt(run.encoder.embed_ids, run.ids(positions), run.normalize)
    if isinstance(vectors, _Failure):
        _recover(run, positions, vectors)
        return
    _keep(run, positions, vectors)
    _report(run, positions, time.perf_counter() - start)


def _recover(run: _Run, positions: np.ndarray, failure: _Failure) -> None:
    """After a failed batch: stop on a fatal device error; on out of memory lower the
    budget and free memory; then halve the batch (a single text fails alone)."""
    if failure.fatal:
        _give_up(run, failure)
    if failure.oom:
        if run.on_oom is not None:
            run.on_oom()
        run.max_tokens, run.repack = max(1, run.max_tokens // 2), True
        _free_device_memory()
    if len(positions) == 1:
        run.out.failed[int(positions[0])] = failure.reason
        log.error("text at position %d could not be encoded: %s", positions[0], failure.reason)
        return
    # Halving isolates both out-of-memory batches and a single poisonous text.
    kind = "out of memory" if failure.oom else failure.reason
    log.warning("batch of %d failed (%s): splitting it in half", len(positions), kind)
    metrics.SPLITS.inc()
    half = len(positions) // 2
    for part in (positions[:half], positions[half:]):
        _encode_split(run, part)


def _give_up(run: _Run, failure: _Failure) -> NoReturn:
    """A fatal device error: tell ``on_fatal`` (the worker stops) and raise."""
    error = DeviceFailedError(f"the device failed, this worker stops: {failure.reason}")
    log.critical("%s", error)
    if run.on_fatal is not None:
        run.on_fatal(error)
    raise error


def _repack(run: _Run, batches: deque[np.ndarray]) -> deque[np.ndarray]:
    """The batches not started yet, packed again at the lowered budget."""
    run.repack = False
    if not batches:
        return batches
    rest = np.concatenate(list(batches))
    return deque(rest[b] for b in pack(run.lengths[rest], run.max_tokens, run.max_items))


def _keep(run: _Run, positions: np.ndarray, vectors: np.ndarray) -> None:
    """Store the finite rows; redo the others in fp32, and refuse what stays non-finite
    (a NaN vector must never reach the cache or the store)."""
    finite = np.isfinite(vectors).all(axis=1)
    run.out.vectors[positions[finite]] = vectors[finite]
    if not finite.all():
        _redo_non_finite(run, positions[~finite])


def _redo_non_finite(run: _Run, positions: np.ndarray) -> None:
    """Rows that came out NaN or infinite, once more in fp32 when the encoder can; what
    stays non-finite fails (``NonFiniteVectorError``), alone."""
    log.warning("%d vectors came out NaN or infinite: redoing them in fp32", len(positions))
    redo = _attempt(run.encoder.embed_fp32, run.ids(positions), run.normalize)
    if isinstance(redo, _Failure) and redo.fatal:
        _give_up(run, redo)
    for j, position in enumerate(positions):
        if isinstance(redo, np.ndarray) and np.isfinite(redo[j]).all():
            run.out.vectors[position] = redo[j]
        else:
            run.out.failed[int(position)] = _non_finite_reason(redo)


def _non_finite_reason(redo: object) -> str:
    reason = f"{NonFiniteVectorError.__name__}: the model returned NaN or infinite values"
    if isinstance(redo, _Failure):
        return f"{reason} (and its fp32 retry failed: {redo.reason})"
    return f"{reason}, in fp32 too" if redo is not None else reason


def _report(run: _Run, positions: np.ndarray, seconds: float) -> None:
    """Tell ``on_batch`` of one encoded batch: texts, padded cost, real tokens, seconds."""
    if run.on_batch is not None:
        batch = run.lengths[positions]
        run.on_batch(len(positions), int(batch.max()) * len(positions), int(batch.sum()), seconds)


def _free_device_memory() -> None:
    """Return the cached blocks of freed tensors to the device (after an out of memory)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # Tensors of the failed batch caught in reference cycles go first.
        gc.collect()
        torch.cuda.empty_cache()
