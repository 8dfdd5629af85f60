"""redis-py clients for embedq's own Redis calls, and what a Redis outage looks like."""

from __future__ import annotations

import functools
import logging

import redis
from kombu.exceptions import OperationalError
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from embedq.broker.url import redis_url

log = logging.getLogger(__name__)


# What a Redis outage looks like from a client, through kombu or redis-py.
BROKER_ERRORS = (OperationalError, redis.ConnectionError, redis.TimeoutError)


def client_url(url: str) -> str:
    """The redis-py form of a Celery/kombu Redis URL (``redis+socket://`` -> ``unix://``)."""
    if url.startswith("redis+socket://"):
        return "unix://" + url.removeprefix("redis+socket://")
    return url


def connect(url: str | None = None) -> redis.Redis:
    """A redis-py client for ``url`` (default: the resolved embedq URL).

    Commands retry with backoff for about 10 s on connection errors, so a Redis restart
    costs a pause, not a failed request.
    """
    target = client_url(url or redis_url())
    # TCP keepalive spots a dead peer; a Unix socket (the embedded Redis) has no such option.
    tcp = {} if target.startswith("unix://") else {"socket_keepalive": True}
    return redis.Redis.from_url(
        target,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=8),
        health_check_interval=30,
        **tcp,
    )


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


def incr_with_ttl(client: redis.Redis, key: str, ttl_s: int) -> int:
    """INCR ``key`` and (re)set its TTL in one round trip; returns the new count."""
    pipe = client.pipeline(transaction=False)
    pipe.incr(key)
    pipe.expire(key, ttl_s)
    return int(pipe.execute()[0])
