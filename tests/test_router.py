"""Routing by live heartbeats: fallback to cpu, big batches to gpu, explicit queue wins."""

from __future__ import annotations

import time

import pytest

from embedq.broker.client import client_url
from embedq.keys import HEARTBEAT_EXPIRY_KEY, heartbeat_member
from embedq.ops.heartbeat import TTL_S, Heartbeat, read_heartbeats
from embedq.producer import router
from embedq.producer.router import QueueState, decide, read_states
from embedq.tasks import embed_texts
from tests.helpers import unique_texts, wait_until

FAST, SLOW = QueueState(1, 3000.0, 0), QueueState(1, 100.0, 0)


@pytest.mark.parametrize(
    ("n", "states", "expected"),
    [
        (500, {"cpu": SLOW}, ("cpu", "no_gpu_worker")),
        (1, {"gpu": FAST}, ("gpu", "no_cpu_worker")),
        (500, {"cpu": SLOW, "gpu": FAST}, ("gpu", "large_batch")),
        (1, {"cpu": SLOW, "gpu": FAST}, ("gpu", "gpu_sooner")),
        (1, {"cpu": SLOW, "gpu": SLOW}, ("cpu", "cpu_sooner")),
        (1, {"cpu": SLOW, "gpu": QueueState(1, 3000.0, 500)}, ("cpu", "cpu_sooner")),
        (500, {"cpu": SLOW, "gpu": QueueState(1, 3000.0, 50_000)}, ("cpu", "gpu_backlog")),
    ],
)
def test_decide(n, states, expected):
    assert decide(n, states) == expected


@pytest.fixture
def other_db(side_redis):
    """An empty Redis database of its own, for heartbeats written by hand."""
    from embedq.broker.client import connect

    client = connect(side_redis(12))
    yield client
    client.flushdb()


def test_heartbeats_drive_the_choice(other_db, runtime):
    cpu = Heartbeat(other_db, ["cpu"], "cpu@host", runtime.encoder, lambda: 0)
    cpu.beat()
    expires = other_db.zscore(HEARTBEAT_EXPIRY_KEY, heartbeat_member("cpu", "cpu@host"))
    assert 0 < expires - float(other_db.time()[0]) <= TTL_S + 1
    assert decide(1000, read_states(other_db)) == ("cpu", "no_gpu_worker")

    encoded = iter([0, 6000])
    gpu = Heartbeat(other_db, ["gpu"], "gpu@host", runtime.encoder, lambda: next(encoded))
    time.sleep(0.05)
    gpu.beat()
    states = read_states(other_db)
    assert states["gpu"].texts_per_s > states["cpu"].texts_per_s
    assert decide(1000, states) == ("gpu", "large_batch")
    gpu.stop()
    assert decide(1000, read_states(other_db)) == ("cpu", "no_gpu_worker")


def test_tasks_are_routed_and_counted(celery_worker, redis_client):
    wait_until(lambda: read_heartbeats(redis_client).get("gpu"), 10, 0.1, "a gpu heartbeat")
    time.sleep(router.CACHE_S)  # let the router read the fresh heartbeats
    before = dict(router.decisions)
    big = embed_texts.delay(unique_texts(80, "routed")).get(timeout=120)
    small = embed_texts.delay(["one short text"]).get(timeout=120)
    explicit = embed_texts.apply_async((["pinned"],), queue="cpu").get(timeout=120)
    assert big.shape == (80, 384) and small.shape == explicit.shape == (1, 384)
    delta = {k: v - before.get(k, 0) for k, v in router.decisions.items() if v != before.get(k, 0)}
    assert delta == {"gpu:large_batch": 1, "cpu:cpu_sooner": 1, "cpu:explicit": 1}
    assert int(redis_client.hget("embedq:stats:router", "gpu:large_batch")) >= 1


def test_client_url_maps_sockets():
    assert client_url("redis+socket:///tmp/r.sock") == "unix:///tmp/r.sock"
