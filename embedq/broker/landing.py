"""Reliable fetch: no task message dies with a worker killed while taking it.

kombu's Redis transport takes a message off its queue with ``BRPOP`` and records it in
``unacked`` one round trip later. A worker killed in between (Redis has sent the reply; it
sits in the dead worker's socket buffer, or its busy event loop has not parsed it yet) takes
the message with it: no queue, no ``unacked`` entry, nothing left to restore. Under load that
window is wide: a ``kill -9`` mid-ingest hit it in about one run in three, and the ingest then
waited 18 minutes for its own re-send.

Channels with this mixin take messages with ``BRPOPLPUSH queue landing`` instead, which moves
the message atomically into a landing list of that channel, and remove it from there once
kombu has recorded it in ``unacked``. Landing lists are registered in the sorted set
``embedq:landing`` with the time of their worker's last lease renewal
(:mod:`embedq.worker.leases` renews them with the tasks' leases); live workers move the
messages of lists whose lease expired back onto their queue (:func:`restore_expired`).

Only a channel consuming one Redis list (one queue; ``priority_steps`` ``[0]``, as embedq
configures; no ``global_keyprefix``) fetches this way; any other keeps kombu's ``BRPOP``.
One exception: a worker's own queue and its shared queue (``embedq worker --devices``, see
:func:`embedq.keys.direct_queue`) are fetched in turn, its own with ``BRPOPLPUSH`` (which
waits) and the shared one with ``RPOPLPUSH`` (which does not), both into landing lists.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis
from kombu.transport.redis import Empty, bytes_to_str, loads

from embedq.keys import LANDING_PREFIX, landing_key

# Landing lists restored per sweep, at most (the rest wait for the next sweep).
RESTORE_BATCH = 32
# After Redis refused a landing list (full), kombu's plain BRPOP is used this long.
PLAIN_FOR_S = 5.0


class ReliableFetch:
    """kombu Redis ``Channel`` mixin: ``BRPOPLPUSH`` into a landing list, not ``BRPOP``."""

    _fetching: tuple[str, str] | None = None
    # Until then (monotonic), fetch with kombu's BRPOP: Redis refused the landing list.
    _plain_until: float = 0.0

    def landing_keys(self) -> list[str]:
        """The landing lists of this channel (one per queue it has fetched from)."""
        return list(getattr(self, "_landings", {}).values())

    def _brpop_start(self, timeout: float | None = None) -> None:
        self._fetching = None
        landing, plan = None, self._fetch_plan()
        if plan is not None and time.monotonic() >= self._plain_until:
            landing = self._landing_for(plan[0])
        if landing is None or plan is None:
            super()._brpop_start(timeout)  # type: ignore[misc]
            return
        queue, waits = plan
        wait = self.brpop_timeout if timeout is None else timeout  # type: ignore[attr-defined]
        self._in_poll = self.client.connection  # type: ignore[attr-defined]
        self._brpop_sent_at = time.monotonic()
        self._fetching = (queue, landing)
        command = (
            ("BRPOPLPUSH", queue, landing, wait or 0) if waits else ("RPOPLPUSH", queue, landing)
        )
        self.client.connection.send_command(*command)  # type: ignore[attr-defined]

    def _fetch_plan(self) -> tuple[str, bool] | None:
        """The list to fetch from now and whether to wait on it, or None (kombu's BRPOP)."""
        queues = self._queue_cycle.consume(len(self.active_queues))  # type: ignore[attr-defined]
        plain = self.priority_steps == [0] and not self.global_keyprefix  # type: ignore[attr-defined]
        return fetch_plan(queues) if plain else None

    def _brpop_read(self, **options: Any) -> bool:
        if self._fetching is None:
            return super()._brpop_read(**options)  # type: ignore[misc]
        queue, landing = self._fetching
        try:
            try:
                item = self._read_reply(options)
            finally:
                # Next fetch: the other list, if this channel has two (a no-op with one).
                self._queue_cycle.rotate(queue)  # type: ignore[attr-defined]
            self._deliver_landed(queue, landing, item)
            return True
        finally:
            self._fetching = None
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def _read_reply(self, options: dict[str, Any]) -> bytes:
        client = self.client  # type: ignore[attr-defined]
        try:
            item = client.parse_response(client.connection, "BRPOPLPUSH", **options)
        except self.connection_errors:  # type: ignore[attr-defined]
            # As kombu does: the next poll reconnects. The message waits in its landing list.
            client.connection.disconnect()
            raise
        except redis.ResponseError:
            # A full Redis (noeviction) refuses BRPOPLPUSH but allows BRPOP, and taking tasks
            # is what frees it: fetch the plain way for a while.
            self._plain_until = time.monotonic() + PLAIN_FOR_S
            raise Empty() from None
        if not item:
            raise Empty()
        return item

    def _deliver_landed(self, queue: str, landing: str, item: bytes) -> None:
        # kombu's callback records the message in ``unacked`` before Celery sees it. If it
        # raises, the landing list keeps the message: it returns to its queue once this
        # channel stops renewing that list (a reconnect opens a new channel).
        self.connection._deliver(loads(bytes_to_str(item)), queue)  # type: ignore[attr-defined]
        with self.conn_or_acquire() as client:  # type: ignore[attr-defined]
            client.lrem(landing, 1, item)

    def _landing_for(self, queue: str) -> str | None:
        landings: dict[str, str] = self.__dict__.setdefault("_landings", {})
        if queue not in landings:
            landing = landing_key(queue, uuid.uuid4().hex)
            # Registered before its first fetch: a worker killed at once is still found.
            try:
                with self.conn_or_acquire() as client:  # type: ignore[attr-defined]
                    register(client, [landing], time.time())
            except redis.RedisError:
                self._plain_until = time.monotonic() + PLAIN_FOR_S
                return None
            landings[queue] = landing
        return landings[queue]


def fetch_plan(queues: list[str]) -> tuple[str, bool] | None:
    """For the lists a channel consumes, head of its cycle first: (list to fetch from now,
    wait on it). One list: it, waiting. A worker's own queue and its shared queue: the head,
    waiting only on the own one (shared tasks then wait at most one ``brpop_timeout``).
    Anything else: None, kombu's ``BRPOP`` over all of them."""
    if len(queues) == 1:
        return queues[0], True
    if len(queues) == 2:
        head, other = queues
        if head.startswith(f"{other}."):  # embedq.keys.direct_queue: "<queue>.<hostname>"
            return head, True
        if other.startswith(f"{head}."):
            return head, False
    return None


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
