"""embedq's Redis transport: a message acked on a channel whose connection is gone fails as
a connection error (which Celery survives), not an AttributeError (which stops the worker)."""

from __future__ import annotations

import pytest
import redis

from embedq.app import app
from embedq.broker.transport import RedisTransport


def test_broker_urls_use_embedqs_transport(redis_client):
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, RedisTransport)
        assert conn.as_uri().startswith(("redis://", "redis+socket://"))


@pytest.mark.parametrize("closed", ["transport", "channel"])
def test_a_closed_connection_is_a_connection_error(redis_client, closed):
    conn = app.connection_for_write()
    channel = conn.channel()
    assert channel.client.ping()
    if closed == "transport":
        # What a Redis restart leaves behind: Celery closed the connection, the channel of a
        # task still running was not.
        conn._do_close_transport()
    else:
        conn.close()
    with pytest.raises(redis.ConnectionError) as caught:
        channel._connparams()
    assert isinstance(caught.value, conn.connection_errors)
