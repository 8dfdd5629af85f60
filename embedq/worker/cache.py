"""The ``Cache`` seam: content-hash vector cache, in-process LRU in front of Redis.

The cache is an optimisation only: any failure of its Redis (out of memory, connection
lost) is a miss, logged at most once a minute and counted in ``embedq_cache_errors``.
When it shares the broker's Redis it stops writing past ``max_share`` of ``maxmemory``,
so vectors can never crowd out queued tasks and results.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import redis
from cachetools import LRUCache

from embedq.broker.client import MemoryWatch, describe, throttled_warning
from embedq.codec import decode_vector, encode_vector
from embedq.ops import metrics

log = logging.getLogger(__name__)

# After a failure the cache's Redis is left alone this long (LRU only): an outage costs one
# slow call per pause, not one per batch.
PAUSE_S = 5.0

_TRUNCATED = b"\x01"
_WHOLE = b"\x00"


def pack_vector(vector: np.ndarray, truncated: bool, dtype: str = "float32") -> bytes:
    """Cache value: the vector in ``dtype`` (int8: scaled to itself, see
    :func:`~embedq.codec.encode_vector`), then one byte saying whether the text was cut."""
    return encode_vector(vector, dtype) + (_TRUNCATED if truncated else _WHOLE)


def unpack_vector(value: bytes) -> tuple[np.ndarray, bool]:
    """Inverse of :func:`pack_vector`: a float32 vector, whatever dtype it was cached in."""
    return decode_vector(value[:-1]), value[-1:] == _TRUNCATED


@dataclass
class CacheStats:
    """What the cache answered since the worker started."""

    lru_hits: int = 0
    redis_hits: int = 0
    misses: int = 0
    errors: int = 0
    skipped_writes: int = 0


class Cache(ABC):
    """Maps cache keys to packed vectors. Misses are ``None``."""

    stats: CacheStats
    # How vectors are packed into this cache (EMBEDQ_VECTOR_DTYPE).
    dtype: str = "float32"

    def pack(self, vector: np.ndarray, truncated: bool) -> bytes:
        """One cache value in this cache's dtype."""
        return pack_vector(vector, truncated, self.dtype)

    @abstractmethod
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values for ``keys``, in order; ``None`` where absent."""

    @abstractmethod
    def set_many(self, items: Mapping[str, bytes]) -> None:
        """Store ``items`` (best effort: a failure is logged and counted, never raised)."""


class RedisCache(Cache):
    """A worker-local LRU in front of Redis: one MGET per lookup, one pipeline per fill.

    Redis trouble degrades to misses (logged and counted); it never fails a request.
    ``max_share`` (for a cache on the broker's Redis): no writes while Redis uses more than
    this share of its ``maxmemory``, read from ``INFO memory`` at most every ``check_s``.
    """

    def __init__(
        self,
        client: redis.Redis,
        ttl_s: int,
        lru_items: int,
        max_share: float | None = None,
        check_s: float = 5.0,
        dtype: str = "float32",
    ) -> None:
        self.client = client
        self.dtype = dtype
        self.ttl_s = ttl_s
        self.lru: LRUCache[str, bytes] = LRUCache(maxsize=max(1, lru_items))
        self.stats = CacheStats()
        self.max_share = max_share
        self.memory = MemoryWatch(client, check_s) if max_share is not None else None
        self._lock = threading.Lock()
        self._paused_until = -math.inf

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """LRU first; the rest in one MGET; Redis hits warm the LRU."""
        with self._lock:
            found: list[bytes | None] = [self.lru.get(k) for k in keys]
        missing = [i for i, v in enumerate(found) if v is None]
        self.stats.lru_hits += len(keys) - len(missing)
        if missing:
            remote = self._mget([keys[i] for i in missing])
            with self._lock:
                for i, value in zip(missing, remote, strict=True):
                    if value is not None:
                        found[i] = value
                        self.lru[keys[i]] = value
            hits = sum(v is not None for v in remote)
            self.stats.redis_hits += hits
            self.stats.misses += len(missing) - hits
        return found

    def set_many(
        self, items: Mapping[str, bytes], pipeline: redis.client.Pipeline | None = None
    ) -> None:
        """Fill the LRU and Redis (SET with TTL for each key, pipelined), room permitting."""
        if not items:
            return
        self.warm(items)
        if self._paused() or not self._has_room(len(items)):
            return
        pipe = pipeline if pipeline is not None else self.client.pipeline(transaction=False)
        for key, value in items.items():
            pipe.set(key, value, ex=self.ttl_s)
        if pipeline is None:
            self._execute(pipe)

    def warm(self, items: Mapping[str, bytes]) -> None:
        """Put ``items`` (read from Redis elsewhere) in the in-process LRU only."""
        with self._lock:
            self.lru.update(items)

    def _paused(self) -> bool:
        return time.monotonic() < self._paused_until

    @property
    def available(self) -> bool:
        """False while Redis is left alone after a failure (the LRU answers alone)."""
        return not self._paused()

    @property
    def writable(self) -> bool:
        """Whether vectors written now reach Redis (not paused, not over the cache's share
        of the broker's memory): only then can another worker wait for them."""
        return self.available and self._room()

    def _room(self) -> bool:
        state = self.memory.state() if self.memory is not None else None
        share = state.share if state is not None else None
        return share is None or self.max_share is None or share < self.max_share

    def pause(self) -> None:
        """Leave Redis alone for :data:`PAUSE_S` (after a failure)."""
        self._paused_until = time.monotonic() + PAUSE_S

    def _has_room(self, count: int) -> bool:
        if self._room():
            return True
        state = self.memory.state() if self.memory is not None else None
        share = (state.share if state is not None else None) or 0.0
        self.stats.skipped_writes += count
        metrics.CACHE_WRITES_SKIPPED.inc(count)
        throttled_warning(
            log,
            "cache-share",
            "cache writes paused: the broker's Redis is at %.0f%% of maxmemory, over "
            "EMBEDQ_CACHE_MAX_SHARE=%s (give the cache its own Redis: EMBEDQ_CACHE_URL)",
            share * 100,
            self.max_share,
        )
        return False

    def _failed(self, op: str, exc: redis.RedisError) -> None:
        self.stats.errors += 1
        what = "lookup failed, encoding instead" if op == "read" else "fill failed"
        self.failed(op, exc, f"cache {what} (a miss, not an error)")

    def failed(self, op: str, exc: redis.RedisError, what: str) -> None:
        """A Redis error on ``op``: counted, Redis left alone a while, logged (throttled)."""
        metrics.CACHE_ERRORS.labels(op).inc()
        self.pause()
        throttled_warning(log, f"cache-{op}", "%s: %s", what, describe(exc))

    def _mget(self, keys: list[str]) -> list[bytes | None]:
        if self._paused():
            return [None] * len(keys)
        try:
            return list(self.client.mget(keys))
        except redis.RedisError as exc:
            self._failed("read", exc)
            return [None] * len(keys)

    def _execute(self, pipe: redis.client.Pipeline) -> None:
        try:
            pipe.execute()
        except redis.RedisError as exc:
            self._failed("write", exc)
