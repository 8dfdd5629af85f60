"""kombu's Redis transport with one fix: a closed channel fails as a connection error."""

from __future__ import annotations

from typing import Any

import redis
from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis

from embedq.broker.landing import ReliableFetch


class _RedisChannel(ReliableFetch, kombu_redis.Channel):
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
