"""redis-py clients for embedq's own Redis calls, and what a Redis outage looks like."""

from __future__ import annotations

import functools
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from kombu.exceptions import OperationalError
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from embedq.broker.url import redis_url
from embedq.errors import BrokerUnavailableError
from embedq.ops import metrics

log = logging.getLogger(__name__)

T = TypeVar("T")


# What a Redis outage looks like from a client, through kombu or redis-py (or embedq's
# producers, embedq.ops.probe.publishing).
BROKER_ERRORS = (
    OperationalError,
    redis.ConnectionError,
    redis.TimeoutError,
    BrokerUnavailableError,
)

# A full Redis (maxmemory reached, noeviction) refuses writes: waited out, first retry after
# this long, doubling up to the cap.
FULL_FIRST_WAIT_S = 0.2
FULL_MAX_WAIT_S = 5.0
# Warnings about the same trouble are logged at most this often.
WARN_EVERY_S = 60.0
# Redis refuses writes from here on (it counts client buffers too, so "full" starts early).
FULL_SHARE = 0.98
# The cache's own client: a dead cache costs a short wait, then misses.
CACHE_RETRIES = 1
CACHE_SOCKET_TIMEOUT_S = 2.0

_warned: dict[str, float] = {}
_warned_lock = threading.Lock()


def throttled_warning(logger: logging.Logger, topic: str, message: str, *args: Any) -> bool:
    """Log ``message`` unless the same ``topic`` was logged in the last ``WARN_EVERY_S``."""
    now = time.monotonic()
    with _warned_lock:
        if now - _warned.get(topic, -math.inf) < WARN_EVERY_S:
            return False
        _warned[topic] = now
    logger.warning(message, *args)
    return True


def is_redis_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an error it wraps) is Redis refusing a write for want of memory."""
    for _ in range(5):
        if exc is None:
            return False
        if isinstance(exc, redis.exceptions.OutOfMemoryError) or "> 'maxmemory'" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def describe(exc: BaseException) -> str:
    """A Redis error in a few words for a log line (never the command's arguments, which
    can be vectors or document text)."""
    if is_redis_full(exc):
        return "Redis is full (maxmemory reached, noeviction)"
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."


def wait_while_full(
    write: Callable[[], T],
    where: str,
    deadline: float | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> T:
    """``write()``, retried with backoff while Redis is full (until ``deadline``, a
    ``time.monotonic()`` value, if given). Each wait is counted and said (``on_wait``)."""
    delay = FULL_FIRST_WAIT_S
    while True:
        try:
            return write()
        except Exception as exc:
            if not is_redis_full(exc) or (deadline is not None and time.monotonic() >= deadline):
                raise
            why = f"Redis is full (maxmemory reached), {where} waits for room"
            metrics.REDIS_FULL_WAITS.labels(where).inc()
            throttled_warning(log, f"full:{where}", "%s; nothing is lost", why)
            if on_wait is not None:
                on_wait(why)
        # Full jitter, so many waiting writers do not retry in step.
        time.sleep(random.uniform(delay / 2, delay))
        delay = min(FULL_MAX_WAIT_S, delay * 2)


def client_url(url: str) -> str:
    """The redis-py form of a Celery/kombu Redis URL (``redis+socket://`` -> ``unix://``)."""
    if url.startswith("redis+socket://"):
        return "unix://" + url.removeprefix("redis+socket://")
    return url


def connect(
    url: str | None = None, retries: int = 8, socket_timeout_s: float | None = None
) -> redis.Redis:
    """A redis-py client for ``url`` (default: the resolved embedq URL).

    Commands retry with backoff (``retries`` times, about 10 s for the default 8) on
    connection errors, so a Redis restart costs a pause, not a failed request.
    """
    target = client_url(url or redis_url())
    # TCP keepalive spots a dead peer; a Unix socket (the embedded Redis) has no such option.
    tcp = {} if target.startswith("unix://") else {"socket_keepalive": True}
    return redis.Redis.from_url(
        target,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=retries),
        health_check_interval=30,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        **tcp,
    )


def cache_client(cache_url: str | None) -> tuple[redis.Redis, bool]:
    """The vector cache's client (``cache_url``, default: the broker's Redis), and whether
    it shares the broker's Redis. It gives up quickly: a cache outage is a miss."""
    broker = client_url(redis_url())
    target = client_url(cache_url) if cache_url else broker
    client = connect(target, retries=CACHE_RETRIES, socket_timeout_s=CACHE_SOCKET_TIMEOUT_S)
    return client, target == broker


def check_eviction_policy(client: redis.Redis) -> str | None:
    """A warning when Redis may evict keys (queued tasks, results) under memory pressure."""
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.RedisError:
        return None  # managed Redis often forbids CONFIG; nothing to check then
    if policy in (None, "noeviction"):
        return None
    return (
        f"Redis maxmemory-policy is {policy!r}: under memory pressure Redis may evict queued "
        "tasks and results (work silently lost). Set maxmemory-policy noeviction, and give the "
        "vector cache its own Redis if it should evict."
    )


@functools.cache
def shared_client() -> redis.Redis:
    """One client (and connection pool) per process for embedq's own small Redis calls."""
    return connect()


def incr_with_ttl(client: redis.Redis, key: str, ttl_s: int, wait_s: float | None = None) -> int:
    """INCR ``key`` and (re)set its TTL in one round trip; returns the new count.

    A full Redis is waited out (at most ``wait_s`` when given): a counter on a task's path
    must not fail the task."""

    def incr() -> int:
        pipe = client.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, ttl_s)
        return int(pipe.execute()[0])

    deadline = None if wait_s is None else time.monotonic() + wait_s
    return wait_while_full(incr, "a counter", deadline)


@dataclass(frozen=True)
class MemoryState:
    """What ``INFO memory`` says: bytes used, the ``maxmemory`` cap (0: none), the policy."""

    used: int
    maxmemory: int
    policy: str

    @property
    def share(self) -> float | None:
        """Share of ``maxmemory`` in use (None without a cap)."""
        return self.used / self.maxmemory if self.maxmemory else None

    @property
    def full(self) -> bool:
        """Whether Redis refuses writes: at its cap with nothing it may evict."""
        return self.policy == "noeviction" and (self.share or 0.0) >= FULL_SHARE

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``embedq status``, ``/health``)."""
        share = self.share
        return {
            "used_mb": round(self.used / 2**20, 1),
            "maxmemory_mb": round(self.maxmemory / 2**20, 1) if self.maxmemory else None,
            "share": None if share is None else round(share, 3),
            "policy": self.policy,
            "full": self.full,
        }


def read_memory(client: redis.Redis) -> MemoryState:
    """One ``INFO memory`` (O(1) in the size of the keyspace)."""
    info = client.info("memory")
    return MemoryState(
        int(info.get("used_memory", 0)),
        int(info.get("maxmemory", 0)),
        str(info.get("maxmemory_policy", "noeviction")),
    )


class MemoryWatch:
    """``INFO memory`` read at most once every ``every_s`` (cached), for hot paths."""

    def __init__(self, client: redis.Redis, every_s: float = 5.0) -> None:
        self.client, self.every_s = client, every_s
        self._state: MemoryState | None = None
        self._read_at = -math.inf
        self._lock = threading.Lock()

    def state(self) -> MemoryState | None:
        """The last reading; None when Redis did not answer it (or forbids INFO)."""
        with self._lock:
            if time.monotonic() - self._read_at >= self.every_s:
                self._read_at = time.monotonic()
                try:
                    self._state = read_memory(self.client)
                except redis.RedisError as exc:
                    throttled_warning(log, "memory-watch", "INFO memory failed: %s", exc)
                    self._state = None
            return self._state
