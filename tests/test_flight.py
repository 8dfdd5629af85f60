"""Single flight across workers (embedq.worker.flight), against the real test Redis.

Two ``Flight`` objects with their own caches stand for two workers; ``encode`` callbacks
record what each was asked to encode (the lease logic is what is tested here); the last test
runs two batchers with the real model (128 texts encoded instead of 64 without single
flight). The soak test in test_flight_cluster.py runs it with four real worker processes.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from embedq.keys import vector_lease_key
from embedq.worker.cache import RedisCache
from embedq.worker.flight import Flight

LEASE_MS = 1500


def _worker(client: redis.Redis, lease_ms: int = LEASE_MS) -> Flight:
    return Flight(RedisCache(client, ttl_s=60, lru_items=100), lease_ms)


def _keys(n: int) -> list[str]:
    tag = uuid.uuid4().hex
    return [f"embedq:vec:{tag}{i}" for i in range(n)]


class _Recorder:
    """An ``encode`` callback: records positions, optionally takes time, fills the cache."""

    def __init__(self, flight: Flight, keys: list[str], delay_s: float = 0.0) -> None:
        self.flight, self.keys, self.delay_s = flight, keys, delay_s
        self.calls: list[list[int]] = []

    def __call__(self, positions: list[int]) -> None:
        self.calls.append(positions)
        time.sleep(self.delay_s)
        self.flight.cache.set_many({self.keys[i]: b"v%d" % i for i in positions})


def test_a_second_worker_waits_for_the_first_ones_entries_instead_of_encoding(redis_client):
    keys = _keys(5)
    first, second = _worker(redis_client), _worker(redis_client)
    slow = _Recorder(first, keys, delay_s=0.3)
    thread = threading.Thread(target=first.serve, args=(keys, slow))
    thread.start()
    time.sleep(0.1)  # the first worker holds the leases and is encoding
    idle = _Recorder(second, keys)
    started = time.monotonic()
    found = second.serve(keys, idle)
    thread.join()
    assert slow.calls == [[0, 1, 2, 3, 4]]
    assert idle.calls == []
    assert found == {i: b"v%d" % i for i in range(5)}
    assert time.monotonic() - started < 1.0
    assert second.stats.waited_hits == 5
    assert redis_client.exists(*[vector_lease_key(k) for k in keys]) == 0  # released


def test_a_dead_leaseholder_delays_others_by_at_most_the_lease_ttl(redis_client):
    keys = _keys(4)
    # A worker killed mid-batch: its leases stay until their TTL, no entry ever comes.
    for key in keys[:3]:
        redis_client.set(vector_lease_key(key), "dead-worker", px=LEASE_MS)
    survivor = _worker(redis_client)
    record = _Recorder(survivor, keys)
    started = time.monotonic()
    found = survivor.serve(keys, record)
    elapsed = time.monotonic() - started
    assert found == {}
    assert record.calls == [[3], [0, 1, 2]]  # its own lease first, then the dead one's
    assert elapsed <= LEASE_MS / 1000 + 0.3
    assert survivor.stats.waited_misses == 3


def test_a_holder_that_failed_releases_and_the_waiter_encodes_at_once(redis_client):
    keys = _keys(2)
    holder, waiter = _worker(redis_client, lease_ms=10_000), _worker(redis_client, 10_000)

    def fail(positions: list[int]) -> None:
        time.sleep(0.2)
        raise RuntimeError("encoder broke")

    thread = threading.Thread(target=lambda: _swallow(holder.serve, keys, fail))
    thread.start()
    time.sleep(0.05)
    record = _Recorder(waiter, keys)
    started = time.monotonic()
    assert waiter.serve(keys, record) == {}
    thread.join()
    assert record.calls == [[0, 1]]
    assert time.monotonic() - started < 2.0  # not the 10 s lease


def test_an_expired_lease_now_held_by_another_worker_is_not_released(redis_client):
    keys = _keys(1)
    late = _worker(redis_client, lease_ms=100)

    def overrun(positions: list[int]) -> None:
        time.sleep(0.25)  # past its lease: another worker leased the key meanwhile
        redis_client.set(vector_lease_key(keys[0]), "other-worker", px=5000)

    late.serve(keys, overrun)
    assert redis_client.get(vector_lease_key(keys[0])) == b"other-worker"


def test_a_cache_over_its_share_takes_no_lease_and_encodes_at_once(redis_client):
    from types import SimpleNamespace

    keys = _keys(3)
    flight = _worker(redis_client)
    # The broker's Redis at 90% with the cache allowed 50%: its writes stay in process.
    flight.cache.max_share = 0.5
    flight.cache.memory = SimpleNamespace(state=lambda: SimpleNamespace(share=0.9))
    recorder = _Recorder(flight, keys)
    assert flight.serve(keys, recorder) == {}
    assert recorder.calls == [[0, 1, 2]]
    assert redis_client.exists(*[vector_lease_key(k) for k in keys]) == 0, "nobody waits"


def test_redis_down_means_every_worker_encodes_its_own_misses():
    dead = redis.Redis(port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    flight = _worker(dead)
    calls: list[list[int]] = []
    assert flight.serve(_keys(3), calls.append) == {}
    assert calls == [[0, 1, 2]]
    assert flight.stats.errors == 1
    assert not flight.cache.available  # the next batches leave that Redis alone a while


def _swallow(fn, *args) -> None:
    with contextlib.suppress(RuntimeError):
        fn(*args)


def test_two_batchers_with_the_real_model_encode_each_shared_miss_once(runtime, redis_client):
    from embedq.worker.batcher import Batcher

    tag = uuid.uuid4().hex[:8]
    texts = [f"{tag}: the {i}th sentence both workers were asked for at once" for i in range(64)]
    pair = []
    for _ in range(2):
        cache = RedisCache(redis_client, ttl_s=60, lru_items=1000)
        pair.append(
            Batcher(
                runtime.encoder,
                cache,
                wait_s=0.0,
                max_batch_size=256,
                flight=Flight(cache, LEASE_MS),
            )
        )
    try:
        futures = [b.submit(texts, True) for b in pair]
        results = [f.result(timeout=60) for f in futures]
    finally:
        for b in pair:
            b.close()
    assert sum(b.stats.texts_encoded for b in pair) == len(texts)
    for a, b in zip(results[0].vectors, results[1].vectors, strict=True):
        assert float(a @ b) > 0.9999
