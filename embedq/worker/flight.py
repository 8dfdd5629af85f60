"""Single flight across workers: concurrent misses of one cache key are encoded once.

For the keys a batch misses, one pipeline sets a short lease per key (SET NX PX,
:meth:`Flight.claim`). The worker encodes the keys it leased, fills the cache, then drops its
leases (:meth:`Flight.release`). The keys leased by others it *watches*
(:meth:`Flight.watch`): a thread of its own polls, one MGET per round for every watched key,
their cache entries and leases together; an entry that arrives is handed over, a lease that
ends without one (its holder failed or died) or a wait outlasting the lease TTL hands the
key back to be encoded here. The batcher never waits: it encodes other texts meanwhile. A
dead holder delays its keys by at most the lease TTL, and Redis trouble only costs
duplicate encoding.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
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
# Keys watched at once, at most: beyond, a key is handed back at once (encoded here).
MAX_WATCHED = 100_000

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

#: Called once per watched key from the watcher thread: its cache value, or None when this
#: worker must encode it itself.
Landed = Callable[[str, bytes | None], None]


@dataclass
class FlightStats:
    """What single flight did since the worker started."""

    leased: int = 0
    waited_hits: int = 0
    waited_misses: int = 0
    errors: int = 0


@dataclass
class _Watch:
    key: str
    until: float
    landed: Landed


class Flight:
    """Leases missed cache keys in the cache's Redis; watches the ones others hold."""

    def __init__(self, cache: RedisCache, lease_ms: int) -> None:
        self.cache = cache
        self.client: redis.Redis = cache.client
        self.lease_ms = lease_ms
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stats = FlightStats()
        self._release = self.client.register_script(_RELEASE)
        self._watched: list[_Watch] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def claim(self, keys: Sequence[str]) -> list[bool] | None:
        """One pipeline of SET NX PX: True where this worker now holds the lease. None when
        nobody could wait for its vectors (cache writes do not reach Redis) or Redis failed:
        this worker then encodes them all itself."""
        if not self.cache.writable:
            return None
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

    def release(self, keys: Sequence[str]) -> None:
        """Drop this worker's leases of ``keys`` (after filling their cache entries)."""
        if not keys:
            return
        try:
            self._release(keys=[vector_lease_key(k) for k in keys], args=[self.token])
        except redis.RedisError as exc:
            self._failed("release", exc)  # the leases expire on their own

    def watch(self, keys: Sequence[str], landed: Landed) -> None:
        """Hand each of ``keys`` (leased by another worker) to ``landed`` once its entry
        arrives, or with None once its lease ends without one or the lease TTL passed."""
        until = time.monotonic() + self.lease_ms / 1000
        with self._lock:
            room = MAX_WATCHED - len(self._watched)
            self._watched += [_Watch(k, until, landed) for k in keys[:room]]
            self._start()
        for key in keys[room:]:
            landed(key, None)
        self._wake.set()

    def watching(self) -> int:
        """Keys watched now."""
        with self._lock:
            return len(self._watched)

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="embedq-flight", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        pause = POLL_FIRST_S
        while True:
            if self._wake.wait(pause):
                self._wake.clear()
                pause = POLL_FIRST_S
            else:
                pause = min(pause * 2, POLL_MAX_S)
            with self._lock:
                watched = list(self._watched)
            if watched:
                self._settle(self._poll(watched))

    def _poll(self, watched: list[_Watch]) -> dict[int, bytes | None]:
        """One MGET of entries and leases: position -> value (or None: encode it here) for
        every watch that is over; still-leased ones within their TTL are left out."""
        keys = [w.key for w in watched]
        try:
            values = self.client.mget(keys + [vector_lease_key(k) for k in keys])
        except redis.RedisError as exc:
            self._failed("wait", exc)
            return dict.fromkeys(range(len(watched)))
        now, over = time.monotonic(), {}
        for i, watch in enumerate(watched):
            entry, lease = values[i], values[len(watched) + i]
            if entry is not None:
                over[i] = entry
            elif lease is None or now >= watch.until:
                over[i] = None
        return over

    def _settle(self, over: dict[int, bytes | None]) -> None:
        if not over:
            return
        with self._lock:
            done = [(self._watched[i], value) for i, value in over.items()]
            self._watched = [w for i, w in enumerate(self._watched) if i not in over]
        hits = {w.key: v for w, v in done if v is not None}
        self.stats.waited_hits += len(hits)
        self.stats.waited_misses += len(done) - len(hits)
        self.cache.warm(hits)
        for watch, value in done:
            watch.landed(watch.key, value)

    def _failed(self, op: str, exc: redis.RedisError) -> None:
        self.stats.errors += 1
        self.cache.failed(op, exc, f"single flight {op} failed (encoding here)")
