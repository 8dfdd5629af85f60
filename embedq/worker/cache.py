"""The ``Cache`` seam: content-hash vector cache, in-process LRU in front of Redis."""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import redis
from cachetools import LRUCache

log = logging.getLogger(__name__)

_TRUNCATED = b"\x01"
_WHOLE = b"\x00"


def pack_vector(vector: np.ndarray, truncated: bool) -> bytes:
    """Cache value: the float32 bytes, then one byte saying whether the text was cut."""
    return np.asarray(vector, dtype=np.float32).tobytes() + (_TRUNCATED if truncated else _WHOLE)


def unpack_vector(value: bytes) -> tuple[np.ndarray, bool]:
    """Inverse of :func:`pack_vector`."""
    return np.frombuffer(value[:-1], dtype=np.float32), value[-1:] == _TRUNCATED


@dataclass
class CacheStats:
    """What the cache answered since the worker started."""

    lru_hits: int = 0
    redis_hits: int = 0
    misses: int = 0
    errors: int = 0


class Cache(ABC):
    """Maps cache keys to packed vectors. Misses are ``None``."""

    stats: CacheStats

    @abstractmethod
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values for ``keys``, in order; ``None`` where absent."""

    @abstractmethod
    def set_many(self, items: Mapping[str, bytes]) -> None:
        """Store ``items`` (best effort: a failure is logged and counted, never raised)."""


class RedisCache(Cache):
    """A worker-local LRU in front of Redis: one MGET per lookup, one pipeline per fill.

    Redis trouble degrades to misses (logged and counted); it never fails a request.
    """

    def __init__(self, client: redis.Redis, ttl_s: int, lru_items: int) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.lru: LRUCache[str, bytes] = LRUCache(maxsize=max(1, lru_items))
        self.stats = CacheStats()
        self._lock = threading.Lock()

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
        """Fill the LRU and Redis (SET with TTL for each key, pipelined)."""
        if not items:
            return
        with self._lock:
            self.lru.update(items)
        pipe = pipeline if pipeline is not None else self.client.pipeline(transaction=False)
        for key, value in items.items():
            pipe.set(key, value, ex=self.ttl_s)
        if pipeline is None:
            self._execute(pipe)

    def _mget(self, keys: list[str]) -> list[bytes | None]:
        try:
            return list(self.client.mget(keys))
        except redis.RedisError as exc:
            self.stats.errors += 1
            log.warning("cache lookup failed, encoding instead: %s", exc)
            return [None] * len(keys)

    def _execute(self, pipe: redis.client.Pipeline) -> None:
        try:
            pipe.execute()
        except redis.RedisError as exc:
            self.stats.errors += 1
            log.warning("cache fill failed (vectors still returned): %s", exc)
