"""Service level objectives: per-minute counters in Redis, shared by every worker.

Workers count what they serve into one Redis hash per minute (``embedq:stats:slo:<minute>``);
heartbeats mark each minute a worker was alive. An SLI is read over the last
``EMBEDQ_SLO_WINDOW_S`` seconds, so every worker, ``embedq status`` and the metrics agree.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import redis
from redis.client import Pipeline

from embedq.keys import alive_key, slo_key
from embedq.settings import Settings

# A request of at most this many texts is interactive: the latency objective applies to it.
INTERACTIVE_TEXTS = 8
FIELDS = ("requests", "errors", "interactive", "slow", "cache_hits", "cache_misses", "texts")


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


def _writer(client: redis.Redis, pipeline: Pipeline | None) -> Pipeline:
    return pipeline if pipeline is not None else client.pipeline(transaction=False)


def record_request(
    client: redis.Redis,
    *,
    texts: int,
    failed: bool,
    seconds: float,
    latency_target_s: float,
    ttl_s: int,
    pipeline: Pipeline | None = None,
) -> None:
    """Count one finished task (``failed``: for a reason other than the caller's input)."""
    key = slo_key(minute())
    counts = {"requests": 1, "texts": texts, "errors": int(failed)}
    if texts <= INTERACTIVE_TEXTS:
        counts |= {"interactive": 1, "slow": int(seconds > latency_target_s)}
    pipe = _writer(client, pipeline)
    for field, value in counts.items():
        if value:
            pipe.hincrby(key, field, value)
    pipe.expire(key, ttl_s)
    if pipeline is None:
        pipe.execute()


def record_cache(
    client: redis.Redis, hits: int, misses: int, ttl_s: int, pipeline: Pipeline | None = None
) -> None:
    """Count cache answers of one batch group."""
    key = slo_key(minute())
    pipe = _writer(client, pipeline)
    pipe.hincrby(key, "cache_hits", hits)
    pipe.hincrby(key, "cache_misses", misses)
    pipe.expire(key, ttl_s)
    if pipeline is None:
        pipe.execute()


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
