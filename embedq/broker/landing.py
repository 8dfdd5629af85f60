"""Reliable fetch: no task message dies with a worker killed while taking it.

kombu's Redis transport takes a message off its queue with ``BRPOP`` and records it in
``unacked`` one round trip later. A worker killed in between (Redis has sent the reply; it
sits in the dead worker's socket buffer, or its busy event loop has not parsed it yet) takes
the message with it: no queue, no ``unacked`` entry, nothing left to restore. Under load that
window is wide: a ``kill -9`` mid-ingest hit it in about one run in three, and the ingest then
waited 18 minutes for its own re-send.

embedq's workers instead move each message atomically into a landing list of their
channel (``RPOPLPUSH``, in the fetch script of :mod:`embedq.broker.fetch`), and remove it
from there once kombu has recorded it in ``unacked``. Landing lists are registered in the
sorted set ``embedq:landing`` with the time of their worker's last lease renewal
(:mod:`embedq.worker.leases` renews them with the tasks' leases); live workers move the
messages of lists whose lease expired back onto the list they came from
(:func:`restore_expired`). A channel with a ``global_keyprefix`` keeps kombu's ``BRPOP``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis
from kombu.transport.redis import bytes_to_str, loads

from embedq.keys import LANDING_PREFIX, landing_key

# Landing lists restored per sweep, at most (the rest wait for the next sweep).
RESTORE_BATCH = 32
# After Redis refused a landing list (full), messages are popped plainly this long.
PLAIN_FOR_S = 5.0


def landing_for(channel: Any, listed: str) -> str | None:
    """The landing list of ``channel`` for messages taken from the Redis list ``listed``,
    registered before its first use (a worker killed at once is still found); None when
    Redis refused to register it (full): the caller then pops plainly for a while."""
    landings: dict[str, str] = channel.__dict__.setdefault("_landings", {})
    if listed not in landings:
        landing = landing_key(listed, uuid.uuid4().hex)
        try:
            with channel.conn_or_acquire() as client:
                register(client, [landing], time.time())
        except redis.RedisError:
            channel._plain_until = time.monotonic() + PLAIN_FOR_S
            return None
        landings[listed] = landing
    return landings[listed]


def deliver_landed(channel: Any, queue: str, landing: str | None, item: bytes) -> None:
    """Hand a fetched message to kombu, then take it out of its landing list. kombu's
    callback records it in ``unacked`` before Celery sees it; if that raises, the landing
    list keeps the message, and it returns to its queue once this channel stops renewing
    that list (a reconnect opens a new channel)."""
    channel.connection._deliver(loads(bytes_to_str(item)), queue)
    if landing is not None:
        with channel.conn_or_acquire() as client:
            client.lrem(landing, 1, item)


def register(client: redis.Redis, landings: list[str], now: float, pipe: Any | None = None) -> None:
    """Record that the worker owning ``landings`` was alive at ``now`` (renews its lease)."""
    if landings:
        (pipe or client).zadd(LANDING_PREFIX, dict.fromkeys(landings, now))


def queue_of(landing: str) -> str:
    """The queue a landing list's messages came from."""
    return landing.removeprefix(f"{LANDING_PREFIX}:").rsplit(":", 1)[0]


def restore_expired(client: redis.Redis, older_than: float) -> int:
    """Move the messages of landing lists not renewed since ``older_than`` back onto their
    queues and forget those lists; how many messages moved. Safe to run on many workers at
    once: each ``LMOVE`` moves one message, exactly once."""
    expired = client.zrange(
        LANDING_PREFIX, "-inf", older_than, byscore=True, offset=0, num=RESTORE_BATCH
    )
    moved = 0
    for raw in expired:
        landing = bytes_to_str(raw)
        while client.lmove(landing, queue_of(landing), "RIGHT", "RIGHT") is not None:
            moved += 1
        client.zrem(LANDING_PREFIX, landing)
    return moved
