"""Single flight across workers: concurrent misses of one cache key are encoded once.

For the keys a batch misses, one pipeline sets a short lease per key (SET NX PX). The
worker encodes the keys it leased, fills the cache, then drops its leases. The keys leased
by others it waits for: one MGET per poll reads their cache entries and leases together; an
entry that arrives is used, a lease that ends without one (its holder failed or died) or the
wait outlasting the lease TTL means this worker encodes the text itself. So a dead holder
delays others by at most the lease TTL, and Redis trouble only costs duplicate encoding.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from embedq.keys import vector_lease_key
from embedq.worker.cache import RedisCache

log = logging.getLogger(__name__)

# First pause between polls; it doubles up to POLL_MAX_S (a fast holder is seen quickly,
# a slow one costs few round trips).
POLL_FIRST_S = 0.005
POLL_MAX_S = 0.05

# Drops only the leases this worker still holds (one that expired may be someone else's).
_RELEASE = """
local dropped = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
    dropped = dropped + 1
  end
end
return dropped
"""


@dataclass
class FlightStats:
    """What single flight did since the worker started."""

    leased: int = 0
    waited_hits: int = 0
    waited_misses: int = 0
    errors: int = 0


class Flight:
    """Leases missed cache keys in the cache's Redis; waits for the ones others hold."""

    def __init__(self, cache: RedisCache, lease_ms: int) -> None:
        self.cache = cache
        self.client: redis.Redis = cache.client
        self.lease_ms = lease_ms
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stats = FlightStats()
        self._release = self.client.register_script(_RELEASE)

    def serve(self, keys: Sequence[str], encode: Callable[[list[int]], None]) -> dict[int, bytes]:
        """Have every position of ``keys`` encoded once cluster-wide: ``encode(positions)``
        encodes (and caches) those this worker must do; returns the cache values that other
        workers filled meanwhile, by position."""
        # Nobody could wait for vectors that will not reach Redis: encode them here.
        if not self.cache.writable:
            encode(list(range(len(keys))))
            return {}
        held = self._claim(keys)
        if held is None:
            encode(list(range(len(keys))))
            return {}
        mine = [i for i, ok in enumerate(held) if ok]
        theirs = [i for i, ok in enumerate(held) if not ok]
        if mine:
            try:
                encode(mine)
            finally:
                self._drop([keys[i] for i in mine])
        found = self._wait(keys, theirs) if theirs else {}
        rest = [i for i in theirs if i not in found]
        if rest:
            encode(rest)
        return found

    def _claim(self, keys: Sequence[str]) -> list[bool] | None:
        """One pipeline of SET NX PX: True where this worker now holds the lease; None
        when Redis failed (this worker then encodes everything itself)."""
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.set(vector_lease_key(key), self.token, nx=True, px=self.lease_ms)
        try:
            held = [bool(ok) for ok in pipe.execute()]
        except redis.RedisError as exc:
            self._failed("lease", exc)
            return None
        self.stats.leased += sum(held)
        return held

    def _drop(self, keys: list[str]) -> None:
        try:
            self._release(keys=[vector_lease_key(k) for k in keys], args=[self.token])
        except redis.RedisError as exc:
            self._failed("release", exc)  # the leases expire on their own

    def _wait(self, keys: Sequence[str], positions: list[int]) -> dict[int, bytes]:
        """Poll (one MGET of entries and leases) until each entry came or its lease ended,
        for at most the lease TTL."""
        found: dict[int, bytes] = {}
        pending = list(positions)
        deadline = time.monotonic() + self.lease_ms / 1000
        pause = POLL_FIRST_S
        while pending and time.monotonic() < deadline:
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, POLL_MAX_S)
            pending = self._poll(keys, pending, found)
        self.stats.waited_hits += len(found)
        self.stats.waited_misses += len(positions) - len(found)
        self.cache.warm({keys[i]: value for i, value in found.items()})
        return found

    def _poll(self, keys: Sequence[str], pending: list[int], found: dict[int, bytes]) -> list[int]:
        """One MGET; records arrived entries in ``found``; returns positions still leased."""
        names = [keys[i] for i in pending] + [vector_lease_key(keys[i]) for i in pending]
        try:
            values = self.client.mget(names)
        except redis.RedisError as exc:
            self._failed("wait", exc)
            return []
        still = []
        for n, i in enumerate(pending):
            if values[n] is not None:
                found[i] = values[n]
            elif values[len(pending) + n] is not None:
                still.append(i)
        return still

    def _failed(self, op: str, exc: redis.RedisError) -> None:
        self.stats.errors += 1
        self.cache.failed(op, exc, f"single flight {op} failed (encoding here)")
