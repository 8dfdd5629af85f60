"""kombu's Redis transport with two fixes (a closed channel fails as a connection error, and
a full Redis (maxmemory, noeviction) is waited out instead of killing the worker) and
embedq's fetch: by traffic class, into landing lists, woken by bells (:mod:`.fetch`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from embedq.broker.client import describe, is_redis_full, throttled_warning, wait_while_full
from embedq.broker.fetch import ClassedFetch, message_class, ring, ring_own
from embedq.broker.traffic import Traffic

log = logging.getLogger(__name__)


class _QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: Any) -> None:
        # The message is already popped from its queue: if a full Redis refuses its unacked
        # entry, kombu raises and Celery stops the worker ("Unrecoverable error:
        # OutOfMemoryError"), losing it. Hold on to it and retry until there is room.
        append = super().append
        wait_while_full(lambda: append(message, delivery_tag), "a worker taking a task")

    def ack(self, delivery_tag: Any) -> None:
        # kombu acks in MULTI/EXEC, and a full Redis refuses every command queued in MULTI,
        # even deletions: acks would fail exactly when freeing memory matters. The same two
        # deletions as a plain pipeline go through (and free the message's unacked entry).
        message = self._delivered.get(delivery_tag)
        with self.channel.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            pipe.zrem(self.unacked_index_key, delivery_tag)
            pipe.hdel(self.unacked_key, delivery_tag)
            # A bulk slot frees: wake this channel if it waits on its bells (see .fetch).
            if message is not None and message_class(message) is Traffic.BULK:
                ring_own(pipe, self.channel.own_bell)
            # The bell's tokens only wake: a full Redis refusing them loses nothing.
            results = pipe.execute(raise_on_error=False)
        _raise_first(results[:2])
        virtual.QoS.ack(self, delivery_tag)

    def restore_visible(self, *args: Any, **kwargs: Any) -> Any:
        # A periodic chore: a full Redis only skips this round.
        try:
            return super().restore_visible(*args, **kwargs)
        except redis.ResponseError as exc:
            if not is_redis_full(exc):
                raise
            throttled_warning(log, "restore-visible", "restoring unacked tasks: %s", describe(exc))
            return None


def _raise_first(results: list[Any]) -> None:
    for result in results:
        if isinstance(result, Exception):
            raise result


class _RedisChannel(ClassedFetch, kombu_redis.Channel):
    QoS = _QoS

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        """Push the message onto its class's list and ring the queue's bell, in one round
        trip (kombu's own path for batches and expiring queues, which ring no bell: their
        messages are found within a second)."""
        if kwargs.get("_publish_batch") is not None or (self._expires and queue in self._expires):
            super()._put(queue, message, **kwargs)
            return
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            pipe.lpush(key, kombu_redis.dumps(message))
            ring(pipe, queue)
            # Only the message's push counts: a full Redis refusing the bell loses nothing,
            # and raising then would make the caller send the message twice.
            _raise_first(pipe.execute(raise_on_error=False)[:1])

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """``client``, else one redis-py client kept per pool (kombu builds a new one
        for every unacked entry, ack and landing removal: ~0.1 ms of CPU each, on the
        worker's one consumer thread). A closed channel's new pool still refuses."""
        if client:
            yield client
            return
        pool = self.pool
        cached = self.__dict__.get("_plain_client")
        if cached is None or cached.connection_pool is not pool:
            cached = self.__dict__["_plain_client"] = self._create_client()
        yield cached

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        # A task that outlived a Redis restart acks on its old channel, whose connection
        # Celery has already closed (kombu then fails with AttributeError, which stops the
        # worker: celery#10302). A connection error instead is logged and survived; the
        # message returns after the visibility timeout and its rerun changes nothing.
        if getattr(self.connection, "client", None) is None:
            raise redis.ConnectionError("the broker connection of this channel was closed")
        return super()._connparams(asynchronous)


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport, with a closed channel failing as a connection error."""

    Channel = _RedisChannel


def register_transport() -> None:
    """Serve redis:// and rediss:// broker URLs with :class:`RedisTransport`."""
    for scheme in ("redis", "rediss"):
        kombu_transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:RedisTransport"
