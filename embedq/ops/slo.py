"""Service level objectives: per-minute counters in Redis, shared by every worker.

Workers count what they serve into one Redis hash per minute (``embedq:stats:slo:<minute>``);
heartbeats mark each minute a worker was alive. An SLI is read over the last
``EMBEDQ_SLO_WINDOW_S`` seconds, so every worker, ``embedq status`` and the metrics agree.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

import redis
from redis.client import Pipeline

from embedq.flusher import Flusher
from embedq.keys import alive_key, slo_key
from embedq.settings import Settings

log = logging.getLogger(__name__)

# A request of at most this many texts is interactive: the latency objective applies to it.
INTERACTIVE_TEXTS = 8
FIELDS = ("requests", "errors", "interactive", "slow", "cache_hits", "cache_misses", "texts")
# Counts of this process reach Redis this often (one pipeline for all tasks meanwhile).
FLUSH_INTERVAL_S = 0.25
# Minutes of counts kept in memory while Redis cannot take them; older ones are dropped.
MAX_PENDING_MINUTES = 120


def minute(now: float | None = None) -> int:
    """The minute bucket of ``now`` (epoch minutes)."""
    return int((time.time() if now is None else now) // 60)


@dataclass
class Usage:
    """What was counted over a window (summed over minutes and workers)."""

    requests: int = 0
    errors: int = 0
    interactive: int = 0
    slow: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    texts: int = 0
    alive_minutes: int = 0
    minutes: int = 0


def request_counts(
    texts: int, failed: bool, seconds: float, latency_target_s: float
) -> dict[str, int]:
    """What one finished task adds to the SLO counters."""
    counts = {"requests": 1, "texts": texts, "errors": int(failed)}
    if texts <= INTERACTIVE_TEXTS:
        counts |= {"interactive": 1, "slow": int(seconds > latency_target_s)}
    return counts


class Tally:
    """Counts of this process, summed per bucket (by default: SLO counts per minute) in
    memory and written to Redis by :meth:`flush` in one pipeline: one round trip per flush
    instead of one per task.

    Thread-safe. Bounded: at most ``MAX_PENDING_MINUTES`` buckets wait for Redis."""

    def __init__(
        self,
        key_of: Callable[[int], str] = slo_key,
        bucket_of: Callable[[float | None], int] = minute,
    ) -> None:
        self.key_of, self.bucket_of = key_of, bucket_of
        self._lock = threading.Lock()
        self._minutes: dict[int, Counter[str]] = {}
        self.flusher: Flusher | None = None

    def add(self, counts: dict[str, int], now: float | None = None) -> None:
        """Add ``counts`` (field -> amount) to the bucket of ``now``."""
        self._merge(self.bucket_of(now), counts)

    def _merge(self, bucket: int, counts: dict[str, int]) -> None:
        with self._lock:
            self._minutes.setdefault(bucket, Counter()).update(counts)
            while len(self._minutes) > MAX_PENDING_MINUTES:
                del self._minutes[min(self._minutes)]
        if self.flusher is not None:
            self.flusher.wake()

    def add_request(self, texts: int, failed: bool, seconds: float, target_s: float) -> None:
        """Count one finished task (see :func:`request_counts`)."""
        self.add(request_counts(texts, failed, seconds, target_s))

    def add_cache(self, hits: int, misses: int) -> None:
        """Count cache answers (hits and misses of one batch group)."""
        self.add({"cache_hits": hits, "cache_misses": misses})

    def pending(self) -> dict[int, dict[str, int]]:
        """What waits to be written, per bucket (a copy)."""
        with self._lock:
            return {m: dict(c) for m, c in self._minutes.items()}

    def flush(self, client: redis.Redis, ttl_s: int) -> int:
        """Write what was counted in one pipeline (keys expire after ``ttl_s``; 0: never);
        how many buckets it touched. On a Redis error the counts stay here (merged with
        newer ones) and the error is raised."""
        with self._lock:
            taken, self._minutes = self._minutes, {}
        if not taken:
            return 0
        try:
            self._write(client, taken, ttl_s)
        except Exception:
            for bucket, counts in taken.items():
                self._merge(bucket, counts)
            raise
        return len(taken)

    def _write(self, client: redis.Redis, buckets: dict[int, Counter[str]], ttl_s: int) -> None:
        pipe = client.pipeline(transaction=False)
        for bucket, counts in buckets.items():
            key = self.key_of(bucket)
            for field, value in counts.items():
                if value:
                    pipe.hincrby(key, field, value)
            if ttl_s:
                pipe.expire(key, ttl_s)
        pipe.execute()

    def counting(
        self, client: Callable[[], redis.Redis], ttl_s: Callable[[], int], name: str
    ) -> Tally:
        """This tally, written by a :class:`~embedq.flusher.Flusher` thread (``name``) into
        ``client()`` at most every ``FLUSH_INTERVAL_S``."""
        if self.flusher is None:
            self.flusher = Flusher(lambda: self.flush(client(), ttl_s()), FLUSH_INTERVAL_S, name)
        return self


TALLY = Tally()


def counting(client: Callable[[], redis.Redis], ttl_s: Callable[[], int]) -> Tally:
    """This process's SLO tally, written by its flusher thread (started once per process:
    a forked child starts its own)."""
    return TALLY.counting(client, ttl_s, "embedq-slo-flush")


def stop_counting() -> None:
    """Flush this process's SLO tally one last time and stop its flusher."""
    if TALLY.flusher is not None:
        TALLY.flusher.stop()


def mark_alive(client: redis.Redis, ttl_s: int, pipeline: Pipeline | None = None) -> None:
    """Note that a worker was alive this minute (heartbeats call it)."""
    (pipeline or client).set(alive_key(minute()), 1, ex=ttl_s)


def read_usage(client: redis.Redis, window_s: int, now: float | None = None) -> Usage:
    """Sum the counters of the last ``window_s`` seconds (whole minutes, this one included)."""
    last = minute(now)
    minutes = list(range(last - max(1, window_s // 60) + 1, last + 1))
    pipe = client.pipeline(transaction=False)
    for m in minutes:
        pipe.hgetall(slo_key(m))
    pipe.mget([alive_key(m) for m in minutes])
    *hashes, alive = pipe.execute()
    usage = Usage()
    for counts in hashes:
        for field, value in counts.items():
            name = field.decode() if isinstance(field, bytes) else field
            if name in FIELDS:
                setattr(usage, name, getattr(usage, name) + int(value))
    # Availability counts minutes since the first one a worker was seen in this window.
    seen = [i for i, flag in enumerate(alive) if flag]
    usage.alive_minutes = len(seen)
    usage.minutes = len(minutes) - seen[0] if seen else 0
    return usage


@dataclass(frozen=True)
class SloStatus:
    """One objective: its target, the current SLI, and what is left of its error budget."""

    name: str
    objective: float
    sli: float | None
    budget_remaining: float | None
    events: int
    description: str

    @property
    def violated(self) -> bool:
        """True when the SLI is below the objective (no data is not a violation)."""
        return self.sli is not None and self.sli < self.objective

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form, with ``violated``."""
        return asdict(self) | {"violated": self.violated}


def _status(name: str, objective: float, good: int, total: int, why: str) -> SloStatus:
    if total == 0:
        return SloStatus(name, objective, None, None, 0, why)
    sli = good / total
    allowed = 1.0 - objective
    budget = 1.0 - (1.0 - sli) / allowed if allowed > 0 else float(sli >= objective)
    return SloStatus(name, objective, round(sli, 6), round(budget, 4), total, why)


def evaluate(usage: Usage, settings: Settings) -> list[SloStatus]:
    """Every SLO's status for ``usage``, with the targets from ``settings``."""
    target_ms = settings.slo_latency_ms
    return [
        _status(
            "latency",
            0.95,
            usage.interactive - usage.slow,
            usage.interactive,
            f"95% of requests of <= {INTERACTIVE_TEXTS} texts finish within {target_ms:g} ms",
        ),
        _status(
            "error_rate",
            1.0 - settings.slo_error_rate,
            usage.requests - usage.errors,
            usage.requests,
            f"at most {settings.slo_error_rate:.2%} of requests fail (bad input excluded)",
        ),
        _status(
            "availability",
            settings.slo_availability,
            usage.alive_minutes,
            usage.minutes,
            f"a worker is alive in {settings.slo_availability:.2%} of minutes",
        ),
        _status(
            "cache_hit_rate",
            settings.slo_cache_hit_rate,
            usage.cache_hits,
            usage.cache_hits + usage.cache_misses,
            f"at least {settings.slo_cache_hit_rate:.0%} of texts are answered by the cache",
        ),
    ]
