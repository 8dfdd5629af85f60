"""Single flight across workers (embedq.worker.flight), against the real test Redis.

Two ``Flight`` objects with their own caches stand for two workers: one claims keys, the
other watches them (the lease logic is what is tested here); the last tests run batchers with
the real model: a leased text holds up no other request, and two batchers encode 64 shared
texts once (128 without single flight). The soak test in test_flight_cluster.py runs it
with four real worker processes.
"""

from __future__ import annotations

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


class _Landings:
    """A ``landed`` callback: what the watcher handed back, by key, with when."""

    def __init__(self) -> None:
        self.values: dict[str, bytes | None] = {}
        self.done = threading.Event()
        self.expected = 0

    def __call__(self, key: str, value: bytes | None) -> None:
        self.values[key] = value
        if len(self.values) >= self.expected:
            self.done.set()

    def wait(self, n: int, timeout_s: float) -> dict[str, bytes | None]:
        self.expected = n
        if len(self.values) < n:
            self.done.wait(timeout_s)
        return self.values


def test_a_second_worker_watches_the_first_ones_entries_instead_of_encoding(redis_client):
    keys = _keys(5)
    first, second = _worker(redis_client), _worker(redis_client)
    assert first.claim(keys) == [True] * 5
    assert second.claim(keys) == [False] * 5, "leased by the first"
    landings = _Landings()
    started = time.monotonic()
    second.watch(keys, landings)
    time.sleep(0.3)  # the first worker encodes meanwhile, then fills the cache
    first.cache.set_many({k: b"v%d" % i for i, k in enumerate(keys)})
    first.release(keys)
    found = landings.wait(5, 5.0)
    assert found == {k: b"v%d" % i for i, k in enumerate(keys)}
    assert time.monotonic() - started < 1.0
    assert second.stats.waited_hits == 5 and second.watching() == 0
    assert redis_client.exists(*[vector_lease_key(k) for k in keys]) == 0  # released


def test_a_dead_leaseholder_delays_a_watched_key_by_at_most_the_lease_ttl(redis_client):
    keys = _keys(3)
    # A worker killed mid-batch: its leases stay until their TTL, no entry ever comes.
    for key in keys:
        redis_client.set(vector_lease_key(key), "dead-worker", px=LEASE_MS)
    survivor = _worker(redis_client)
    assert survivor.claim(keys) == [False] * 3
    landings = _Landings()
    started = time.monotonic()
    survivor.watch(keys, landings)
    assert landings.wait(3, 5.0) == dict.fromkeys(keys)  # None: encode it yourself
    assert time.monotonic() - started <= LEASE_MS / 1000 + 0.3
    assert survivor.stats.waited_misses == 3


def test_a_holder_that_released_without_an_entry_hands_the_key_back_at_once(redis_client):
    keys = _keys(2)
    holder, waiter = _worker(redis_client, lease_ms=10_000), _worker(redis_client, 10_000)
    assert holder.claim(keys) == [True, True]
    assert waiter.claim(keys) == [False, False]
    landings = _Landings()
    waiter.watch(keys, landings)
    started = time.monotonic()
    holder.release(keys)  # its encoder broke: no entry will come
    assert landings.wait(2, 5.0) == dict.fromkeys(keys)
    assert time.monotonic() - started < 2.0  # not the 10 s lease


def test_an_expired_lease_now_held_by_another_worker_is_not_released(redis_client):
    keys = _keys(1)
    late = _worker(redis_client, lease_ms=100)
    assert late.claim(keys) == [True]
    time.sleep(0.25)  # past its lease: another worker leased the key meanwhile
    redis_client.set(vector_lease_key(keys[0]), "other-worker", px=5000)
    late.release(keys)
    assert redis_client.get(vector_lease_key(keys[0])) == b"other-worker"


def test_a_cache_over_its_share_takes_no_lease(redis_client):
    from types import SimpleNamespace

    keys = _keys(3)
    flight = _worker(redis_client)
    # The broker's Redis at 90% with the cache allowed 50%: its writes stay in process.
    flight.cache.max_share = 0.5
    flight.cache.memory = SimpleNamespace(state=lambda: SimpleNamespace(share=0.9))
    assert flight.claim(keys) is None, "encode them all here"
    assert redis_client.exists(*[vector_lease_key(k) for k in keys]) == 0, "nobody waits"


def test_redis_down_means_every_worker_encodes_its_own_misses():
    dead = redis.Redis(port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    flight = _worker(dead)
    assert flight.claim(_keys(3)) is None
    assert flight.stats.errors == 1
    assert not flight.cache.available  # the next batches leave that Redis alone a while


def test_the_batcher_serves_other_texts_while_another_worker_holds_a_lease(runtime, redis_client):
    """Single flight waits off the batcher thread: a text leased elsewhere for seconds
    holds up nobody else's request."""
    from embedq.keys import vector_key
    from embedq.worker.batcher import Batcher

    tag = uuid.uuid4().hex[:8]
    leased, free = f"{tag} a text another worker is encoding", f"{tag} a text nobody holds"
    key = vector_key(runtime.encoder.model_id, True, leased)
    redis_client.set(vector_lease_key(key), "other-worker", px=3000)
    cache = RedisCache(redis_client, ttl_s=60, lru_items=100)
    batcher = Batcher(
        runtime.encoder, cache, wait_s=0.0, max_batch_size=64, flight=Flight(cache, 3000)
    )
    try:
        started = time.monotonic()
        waiting = batcher.submit([leased], True)
        assert batcher.submit([free], True).result(timeout=30).vectors.shape == (1, 384)
        assert time.monotonic() - started < 2.0, "not held behind the 3 s lease"
        assert not waiting.done()
        # The lease runs out without an entry: encoded here after all.
        assert waiting.result(timeout=30).vectors.shape == (1, 384)
        assert time.monotonic() - started >= 2.5
    finally:
        batcher.close()


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
