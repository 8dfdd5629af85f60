"""Leases on the tasks a worker holds, so a dead worker's tasks come back in seconds.

kombu's Redis transport acknowledges by emulation: each message a worker takes off a queue is
kept in the hash ``unacked`` (tag -> message) and the sorted set ``unacked_index`` (tag ->
delivery time). Every worker's event loop calls ``QoS.restore_visible`` every
``unacked_restore_interval`` seconds; it pushes back onto its queue every message whose score
is older than ``visibility_timeout``. Alone, that forces a choice: a short timeout reruns long
tasks that are still running, a long one (720 s before) leaves a dead worker's tasks stranded.

embedq makes the score a lease. The visibility timeout is short
(``EMBEDQ_DEAD_WORKER_RESTORE_S``, 30 s) and each live worker renews, every few seconds, the
score of every tag it still holds (reserved, running, or waiting for a retry's countdown) with
one ``ZADD unacked_index XX`` (XX: a tag acked meanwhile is not added back). A running task is
never restored however long it runs; a dead worker's tags stop being renewed, and kombu's own
sweep on any live worker restores them one timeout plus one sweep after its last renewal.

The same beat renews the landing lists of the worker's channel (messages taken off a queue
but not yet recorded as unacked, :mod:`embedq.broker.landing`) and returns to their queues the
messages of landing lists whose lease expired.

A worker cut off from Redis for longer than the timeout loses its leases: its tasks run again
elsewhere. That double run is harmless (every store write is an idempotent upsert) and is
counted (:func:`count_redelivery`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from prometheus_client import Counter

from embedq.broker.client import incr_with_ttl, throttled_warning
from embedq.broker.landing import register, restore_expired
from embedq.keys import stats_key

log = logging.getLogger(__name__)

REDELIVERED = Counter(
    "embedq_redelivered_tasks",
    "Task attempts delivered to a worker again (its first worker died or lost Redis)",
)
#: Redis counter of redeliveries, summed over all workers (``embedq:stats:redelivered``).
REDELIVERED_KEY = stats_key("redelivered")
REDELIVERED_TTL_S = 7 * 24 * 3600


def lease_interval_s(restore_s: float) -> float:
    """How often a worker renews its leases: at least 6 renewals fit in one timeout."""
    return max(0.5, min(5.0, restore_s / 6))


def held_tags(consumer: Any) -> list[str]:
    """Delivery tags of every message the worker's task channel holds unacknowledged.

    kombu's QoS keeps them in ``_delivered`` (reserved, running, and retries waiting for their
    countdown, which Celery's own request lists miss) until their ack is flushed.
    """
    qos = getattr(_channel(consumer), "qos", None)
    delivered = getattr(qos, "_delivered", None) or {}
    dirty = getattr(qos, "_dirty", None) or set()
    # list() of a dict is one C call: the event loop cannot change it halfway.
    return [str(tag) for tag in list(delivered) if tag not in dirty]


def _channel(consumer: Any) -> Any:
    # Looked up each time: a reconnect gives the consumer a new channel.
    return getattr(getattr(consumer, "task_consumer", None), "channel", None)


def index_key(consumer: Any) -> str | None:
    """The ``unacked_index`` key of the worker's task channel, as stored in Redis."""
    channel = _channel(consumer)
    if channel is None or not hasattr(channel, "unacked_index_key"):
        return None  # not the Redis transport: nothing to renew
    return f"{getattr(channel, 'global_keyprefix', '') or ''}{channel.unacked_index_key}"


def landing_keys(consumer: Any) -> list[str]:
    """The landing lists of the worker's task channel (:mod:`embedq.broker.landing`)."""
    keys = getattr(_channel(consumer), "landing_keys", None)
    return keys() if callable(keys) else []


def renew(
    client: redis.Redis, key: str, tags: list[str], now: float, pipe: Any | None = None
) -> None:
    """Set the delivery time of ``tags`` that are still unacked to ``now`` (one command)."""
    if tags:
        (pipe or client).zadd(key, dict.fromkeys(tags, now), xx=True)


def count_redelivery(client: redis.Redis) -> None:
    """Count one redelivered task attempt (metric and Redis counter); never raises."""
    REDELIVERED.inc()
    try:
        incr_with_ttl(client, REDELIVERED_KEY, REDELIVERED_TTL_S)
    except redis.RedisError as exc:
        log.warning("could not count a redelivery: %s", exc)


class TaskLeases:
    """A daemon thread renewing the leases of the tasks one worker holds, and returning
    the messages of dead workers' landing lists to their queues."""

    def __init__(
        self, client: redis.Redis, consumer: Any, interval_s: float, restore_s: float
    ) -> None:
        self.client, self.consumer = client, consumer
        self.interval_s, self.restore_s = interval_s, restore_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embedq-leases", daemon=True)

    def start(self) -> None:
        """Renew now, then every ``interval_s`` until :meth:`stop`."""
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing (a warm shutdown restores what the worker still holds)."""
        self._stop.set()
        self._thread.join(timeout=10)

    def beat(self) -> int:
        """Renew once, then sweep; how many tags were renewed (0 after a logged failure)."""
        try:
            now, tags = time.time(), held_tags(self.consumer)
            pipe = self.client.pipeline(transaction=False)
            key = index_key(self.consumer)
            if key is not None:
                renew(self.client, key, tags, now, pipe=pipe)
            register(self.client, landing_keys(self.consumer), now, pipe=pipe)
            pipe.execute()
            if moved := restore_expired(self.client, now - self.restore_s):
                log.warning(
                    "returned %d message(s) a dead worker had fetched to their queue", moved
                )
            return len(tags) if key is not None else 0
        except Exception as exc:  # the worker must outlive any Redis error
            self._log_failure(exc)
            return 0

    def _run(self) -> None:
        self.beat()
        while not self._stop.wait(self.interval_s):
            self.beat()

    def _log_failure(self, exc: Exception) -> None:
        # Throttled (a Redis outage would flood the log otherwise), per lease keeper.
        throttled_warning(
            log,
            f"leases:{id(self)}",
            "could not renew task leases (retrying): %s: %s",
            type(exc).__name__,
            exc,
        )
