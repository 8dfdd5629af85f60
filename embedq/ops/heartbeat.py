"""Worker heartbeats: one registry in Redis saying "alive, this fast" per worker and queue.

The registry is two keys (see :mod:`embedq.keys`): a hash of ``queue:hostname`` -> payload
and a sorted set of the same members scored by when each heartbeat expires, in Redis server
time (so hosts' clocks need not agree). Readers take the members scored after "now": one
ZRANGEBYSCORE and a HGET per live worker in one Lua call, whatever else the database
holds (no keyspace scan).
Heartbeats expired for more than ``PRUNE_AFTER_S`` are removed by the next live beat.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import redis

from embedq.broker.client import describe, is_redis_full, throttled_warning
from embedq.keys import (
    HEARTBEAT_EXPIRY_KEY,
    HEARTBEATS_KEY,
    direct_queue,
    heartbeat_member,
)
from embedq.ops import slo

# The readers live in registry.py (metrics imports them); re-exported for existing callers.
from embedq.ops.registry import (
    NOW_LUA,
    live_hostnames,
    read_expired_heartbeats,
    read_heartbeats,
)
from embedq.settings import get_settings

if TYPE_CHECKING:
    from embedq.encode.base import Encoder

log = logging.getLogger(__name__)

__all__ = ["Heartbeat", "Meter", "live_hostnames", "read_expired_heartbeats", "read_heartbeats"]

INTERVAL_S = 2.0
TTL_S = 10
# Alive marks outlive the longest SLO window anyone is likely to set.
ALIVE_TTL_S = 8 * 24 * 3600
# Expired heartbeats stay readable this long (read_expired_heartbeats), then go.
PRUNE_AFTER_S = 3600
# Both registry keys vanish a day after the last beat of any worker.
REGISTRY_TTL_S = 24 * 3600

# KEYS: payloads, expiry. ARGV: ttl, prune_after, registry ttl, then member, payload pairs.
BEAT_LUA = (
    NOW_LUA
    + """
local bound = now - tonumber(ARGV[2])
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', bound)) do
  redis.call('HDEL', KEYS[1], member)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', bound)
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), ARGV[i])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""
)
# Redis 7 runs a script flagged allow-oom even when full: a heartbeat overwrites its own
# few hundred bytes, and a full Redis must not make every live worker look dead.
BEAT_LUA_ALLOW_OOM = "#!lua flags=allow-oom\n" + BEAT_LUA

# Smoothing of utilisation (every beat, idle ones too): a price needs a steadier figure
# than the router's texts/s.
UTILISATION_WEIGHT = 0.1


class Meter:
    """Token speed while encoding and the share of time spent encoding, smoothed."""

    def __init__(self, work: Callable[[], tuple[int, float]]) -> None:
        self.work = work
        self.tokens_per_s: float | None = None
        self.utilisation: float | None = None
        self._last = (time.monotonic(), *work())

    def update(self) -> dict[str, float | None]:
        """Measure since the last call; the payload's ``tokens_per_s`` and ``utilisation``."""
        now, (tokens, busy) = time.monotonic(), self.work()
        then, tokens_before, busy_before = self._last
        self._last = (now, tokens, busy)
        used_s = max(busy - busy_before, 0.0)
        if used_s > 0 and tokens > tokens_before:
            rate = (tokens - tokens_before) / used_s
            old = self.tokens_per_s
            self.tokens_per_s = rate if old is None else 0.7 * old + 0.3 * rate
        share = min(used_s / max(now - then, 1e-6), 1.0)
        old_share = self.utilisation
        w = UTILISATION_WEIGHT
        self.utilisation = share if old_share is None else (1 - w) * old_share + w * share
        return {"tokens_per_s": self.tokens_per_s, "utilisation": round(self.utilisation, 4)}


def split_queues(queues: Sequence[str], hostname: str) -> tuple[list[str], str | None]:
    """(shared queues, this worker's direct queue or None) of a worker's consumed queues."""
    direct = {direct_queue(q, hostname) for q in queues}
    own = [q for q in queues if q in direct]
    return [q for q in queues if q not in direct], own[0] if own else None


def _server_major(client: redis.Redis) -> int:
    try:
        return int(str(client.info("server").get("redis_version", "0")).split(".")[0])
    except (redis.RedisError, ValueError):
        return 0


class Heartbeat:
    """Publishes liveness and throughput (texts/s, smoothed) every ``INTERVAL_S``."""

    def __init__(
        self,
        client: redis.Redis,
        queues: Sequence[str],
        hostname: str,
        encoder: Encoder,
        texts_encoded: Callable[[], int],
        extra: dict[str, Any] | None = None,
        live: Callable[[], dict[str, Any]] | None = None,
        work: Callable[[], tuple[int, float]] | None = None,
    ) -> None:
        self.client = client
        # A direct queue is announced in the payload, never registered as a queue of its own.
        self.queues, direct = split_queues(queues, hostname)
        self.hostname = hostname
        self.device = encoder.device
        # What status, the API's /metadata and the router read about this worker.
        self.about = {
            "model": encoder.name,
            "model_id": encoder.model_id,
            "dim": encoder.dim,
            "max_batch_tokens": encoder.max_batch_tokens,
            "cost_per_hour": get_settings().cost_per_hour,
            **({"direct_queue": direct} if direct else {}),
            # Every model this worker serves (the router sends a model's tasks only here);
            # a worker with several passes them in ``live``.
            "models": [{"name": encoder.name, "model_id": encoder.model_id, "dim": encoder.dim}],
            **(extra or {}),
        }
        # Tokens and model seconds so far, for the price per token (cost.py).
        self.meter = Meter(work) if work else None
        self.texts_encoded = texts_encoded
        # Figures that change while the worker runs (the learned batch budget).
        self.live = live or dict
        self.texts_per_s: float | None = None
        self._last = (time.monotonic(), texts_encoded())
        # Scripts with flags need Redis 7; older servers get the plain one.
        lua = BEAT_LUA_ALLOW_OOM if _server_major(client) >= 7 else BEAT_LUA
        self._beat_script = client.register_script(lua)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embedq-heartbeat", daemon=True)

    def start(self) -> None:
        """Beat now and then every interval, in a daemon thread."""
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and remove this worker from the registry."""
        self._stop.set()
        members = [heartbeat_member(q, self.hostname) for q in self.queues]
        with contextlib.suppress(redis.RedisError):
            pipe = self.client.pipeline(transaction=False)
            pipe.hdel(HEARTBEATS_KEY, *members)
            pipe.zrem(HEARTBEAT_EXPIRY_KEY, *members)
            pipe.execute()

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            try:
                self.beat()
            except redis.RedisError as exc:
                throttled_warning(log, "heartbeat", "heartbeat failed: %s", describe(exc))

    def beat(self) -> None:
        """Measure throughput since the last beat and publish it."""
        now, count = time.monotonic(), self.texts_encoded()
        then, before = self._last
        if count > before:
            rate = (count - before) / max(now - then, 1e-6)
            # Smoothed, and only from busy intervals: an idle worker is not a slow one.
            self.texts_per_s = (
                rate if self.texts_per_s is None else 0.7 * self.texts_per_s + 0.3 * rate
            )
        self._last = (now, count)
        payload = json.dumps(
            {
                "hostname": self.hostname,
                "device": self.device,
                "texts_per_s": self.texts_per_s,
                "texts_encoded": count,
                **self.about,
                **(self.meter.update() if self.meter else {}),
                **self.live(),
            }
        )
        self.publish(payload)

    def publish(self, payload: str, pipeline: redis.client.Pipeline | None = None) -> None:
        """Write ``payload`` for each queue into the registry, and mark this minute alive."""
        args: list[Any] = [TTL_S, PRUNE_AFTER_S, REGISTRY_TTL_S]
        for queue in self.queues:
            args += [heartbeat_member(queue, self.hostname), payload]
        pipe = pipeline if pipeline is not None else self.client.pipeline(transaction=False)
        self._beat_script(keys=[HEARTBEATS_KEY, HEARTBEAT_EXPIRY_KEY], args=args, client=pipe)
        slo.mark_alive(self.client, ALIVE_TTL_S, pipeline=pipe)
        if pipeline is not None:
            return
        beat, alive = pipe.execute(raise_on_error=False)
        if isinstance(beat, Exception):
            raise beat
        # A full Redis refuses the alive mark; the SLO then counts that minute as down.
        if isinstance(alive, Exception) and not is_redis_full(alive):
            raise alive
