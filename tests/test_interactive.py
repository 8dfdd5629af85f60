"""Interactive traffic: per-task Redis work summed in process, the batcher's waiting policy,
the API's shared result listener, and the bench's interactive load driver."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import threading
import uuid

import numpy as np
import pytest
import redis
from celery.exceptions import TimeoutError as CeleryTimeout
from redis.backoff import NoBackoff
from redis.retry import Retry

from embedq.broker.results import FIRST_RUN, RESULT_POLL_S, ResultListener, get_and_forget
from embedq.broker.url import redis_url
from embedq.errors import InvalidInputError
from embedq.ops import slo
from embedq.tools.interactive import Progress, run_callers
from tests.helpers import wait_until


def test_tally_sums_tasks_per_minute_and_writes_them_in_one_flush(redis_client):
    tally, now = slo.Tally(), 1_000_000 * 60.0
    for seconds in (0.01, 0.02, 9.0):
        tally.add(slo.request_counts(1, False, seconds, 0.5), now)
    tally.add(slo.request_counts(50, True, 1.0, 0.5), now + 60)
    tally.add({"cache_hits": 3, "cache_misses": 1}, now)
    assert tally.pending()[1_000_000] == {
        "requests": 3, "texts": 3, "errors": 0, "interactive": 3, "slow": 1,
        "cache_hits": 3, "cache_misses": 1,
    }  # fmt: skip
    assert tally.flush(redis_client, 120) == 2 and tally.pending() == {}
    usage = slo.read_usage(redis_client, 120, now + 60)
    assert (usage.requests, usage.errors, usage.interactive, usage.slow) == (4, 1, 3, 1)
    assert (usage.texts, usage.cache_hits, usage.cache_misses) == (53, 3, 1)
    assert 0 < redis_client.ttl(slo.slo_key(1_000_000)) <= 120
    assert tally.flush(redis_client, 120) == 0, "nothing new: no write"


def test_tally_keeps_counts_while_redis_is_down_and_stays_bounded():
    tally = slo.Tally()
    down = redis.Redis(port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    tally.add_request(2, False, 0.1, 0.5)
    with pytest.raises(redis.ConnectionError):
        tally.flush(down, 60)
    assert sum(c["requests"] for c in tally.pending().values()) == 1, "kept for the next flush"
    for m in range(slo.MAX_PENDING_MINUTES + 10):
        tally.add({"requests": 1}, m * 60.0)
    assert len(tally.pending()) == slo.MAX_PENDING_MINUTES


def test_worker_counts_reach_redis_without_a_write_per_task(runtime, redis_client):
    from embedq.tasks import embed_texts

    def hincrbys() -> int:
        return redis_client.info("commandstats").get("cmdstat_hincrby", {}).get("calls", 0)

    before, calls = slo.read_usage(redis_client, 120).requests, hincrbys()
    results = [embed_texts.delay([f"tally text {i} {uuid.uuid4()}"]) for i in range(10)]
    for result in results:
        result.get(timeout=60)
    wait_until(
        lambda: slo.read_usage(redis_client, 120).requests - before >= 10, 5, 0.05, "counted"
    )
    # One HINCRBY per field and flush: a write per task would be >= 10 x 5.
    assert hincrbys() - calls < 30


def test_run_callers_measures_every_request_and_reports_progress():
    stream = io.StringIO()
    seen: list[str] = []
    figures = run_callers(seen.append, ["a", "b", "c"], callers=4, tasks=30, label="t")
    assert figures["tasks"] == 30 and len(seen) == 30 and set(seen) == {"a", "b", "c"}
    assert figures["tasks_per_s"] > 0 and 0 <= figures["p50_ms"] <= figures["p99_ms"]
    with Progress("load", 10, stream) as progress:
        progress.done = 10
    assert "load: 10/10" in stream.getvalue()


def test_run_callers_raises_what_a_caller_hit():
    def fail(text: str) -> None:
        raise ValueError(f"no {text}")

    with pytest.raises(ValueError, match="no x"):
        run_callers(fail, ["x"], callers=3, tasks=10, label="t")


def test_result_listener_waits_for_many_results_on_one_connection(runtime, redis_client):
    from embedq.app import app
    from embedq.tasks import embed_texts

    stored = embed_texts.delay(["stored before anyone waits"])
    stored.get(timeout=60)  # its pub/sub message is gone: only the read after subscribing sees it
    bad = app.send_task("embedq.embed_texts", args=[[123]], queue="cpu")  # fails in the worker

    async def wait_all() -> tuple[list[object], int]:
        listener = ResultListener(app.backend, redis_url())
        results = [embed_texts.delay([f"listener {i} {uuid.uuid4()}"]) for i in range(20)]
        waits = [listener.wait(r.id, 60) for r in [stored, *results]]
        threads = {t.ident for t in threading.enumerate()}
        got = await asyncio.gather(*waits)
        with pytest.raises(InvalidInputError):
            await listener.wait(bad.id, 60)
        with pytest.raises(CeleryTimeout):
            await listener.wait(uuid.uuid4().hex, 0.2)
        # The in-process worker's pool may grow meanwhile, and the process's one thread that
        # deletes forgotten results may start; the listener adds none per request.
        new = [t.name for t in threading.enumerate() if t.ident not in threads]
        return got, [n for n in new if not n.startswith(("ThreadPoolExecutor", "embedq-forget"))]

    got, new_threads = asyncio.run(wait_all())
    assert len(got) == 21 and all(np.asarray(v).shape == (1, 384) for v in got)
    assert new_threads == [], "no thread per waiting request"
    key = app.backend.get_key_for_task(stored.id)
    wait_until(lambda: not redis_client.exists(key), 2, 0.02, "the result forgotten once read")


def test_api_serves_concurrent_requests_through_the_shared_listener(celery_worker):
    import httpx

    from embedq.api import create_app
    from embedq.settings import get_settings

    api = create_app(get_settings().model_copy(update={"api_keys": None}), allow_anonymous=True)
    texts = [f"api listener {i} {uuid.uuid4()}" for i in range(24)]

    async def post_all() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            posts = [client.post("/v1/embeddings", json={"input": t}) for t in texts]
            return await asyncio.gather(*posts)

    responses = asyncio.run(post_all())
    assert [r.status_code for r in responses] == [200] * len(texts)
    vectors = [r.json()["data"][0]["embedding"] for r in responses]
    assert all(len(v) == 384 for v in vectors) and len({tuple(v) for v in vectors}) == len(texts)


def test_first_tokenizer_loads_from_many_threads_at_once_in_a_fresh_process():
    # transformers' lazy imports race when several API threads import it first at once.
    code = (
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from embedq.encode.models import load_tokenizer\n"
        "from embedq.settings import DEFAULT_MODEL\n"
        "with ThreadPoolExecutor(16) as pool:\n"
        "    toks = list(pool.map(lambda _: load_tokenizer(DEFAULT_MODEL), range(16)))\n"
        "assert len({id(t) for t in toks}) == 1\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_result_stored_before_its_wait_is_returned_at_once(runtime, redis_client):
    from embedq.app import app
    from embedq.tasks import embed_texts

    result = embed_texts.delay([f"stored before the wait {uuid.uuid4()}"])
    key = app.backend.get_key_for_task(result.id)
    wait_until(lambda: redis_client.exists(key), 60, 0.01, "the stored result")
    # Its pub/sub message came before anyone waited: the consumer buffered it, so skipping
    # the read of the stored result costs no wait (the fallback poll is RESULT_POLL_S).
    assert result.get(timeout=RESULT_POLL_S / 2).shape == (1, 384)
    # A handle made elsewhere (never subscribed before sending) still reads it.
    again = app.AsyncResult(result.id)
    assert again.get(timeout=RESULT_POLL_S / 2).shape == (1, 384)


def test_a_first_run_stores_without_reading_but_a_rerun_never_overwrites_success(redis_client):
    from celery import states
    from celery.app.task import Context

    from embedq.app import app

    backend, task_id = app.backend, str(uuid.uuid4())
    first, rerun = Context(), Context()
    setattr(first, FIRST_RUN, True)
    try:
        backend.store_result(task_id, "first run", states.SUCCESS, request=first)
        backend.store_result(task_id, "redelivered run", states.SUCCESS, request=rerun)
        assert backend.get_task_meta(task_id)["result"] == "first run"
    finally:
        redis_client.delete(backend.get_key_for_task(task_id))


def test_forgotten_results_go_in_one_delete_and_the_wait_is_bounded(redis_client, monkeypatch):
    from embedq.app import app
    from embedq.broker import results

    keys = [app.backend.get_key_for_task(str(uuid.uuid4())) for _ in range(6)]
    redis_client.mset({key: b"x" for key in keys})
    forgotten = results.Forgotten()
    for key in keys[:3]:
        forgotten.add(app.backend.url, app.backend.client, key)
    wait_until(lambda: not redis_client.exists(*keys[:3]), 5, 0.01, "the forgotten results gone")
    assert forgotten.pending() == 0 and redis_client.exists(*keys[3:]) == 3
    # Past FORGET_MAX_PENDING the caller deletes them itself, at once.
    monkeypatch.setattr(results, "FORGET_MAX_PENDING", 2)
    forgotten._flusher.wake = lambda: None  # the thread must not be the one deleting
    forgotten.add(app.backend.url, app.backend.client, keys[3])
    assert forgotten.pending() == 1 and redis_client.exists(keys[3])
    forgotten.add(app.backend.url, app.backend.client, keys[4])
    assert forgotten.pending() == 0 and redis_client.exists(*keys[3:]) == 1


def test_get_and_forget_deletes_the_result_soon_after(runtime, redis_client):
    from embedq.app import app
    from embedq.tasks import embed_texts

    result = embed_texts.delay([f"forgotten soon {uuid.uuid4()}"])
    assert get_and_forget(result, 60).shape == (1, 384)
    key = app.backend.get_key_for_task(result.id)
    wait_until(lambda: not redis_client.exists(key), 5, 0.01, "the result forgotten")


def test_tasks_the_listener_waits_for_are_not_subscribed_by_celery_s_consumer(runtime):
    from embedq.app import app
    from embedq.broker.results import waited_by_listener
    from embedq.tasks import embed_texts

    consumer = app.backend.result_consumer
    with waited_by_listener():
        listened = embed_texts.delay([f"listened {uuid.uuid4()}"])
    plain = embed_texts.delay([f"plain {uuid.uuid4()}"])
    subscribed = consumer.subscribed_to
    # The API's threads never read Celery's consumer: its subscriptions would only pile up.
    assert app.backend.get_key_for_task(listened.id) not in subscribed
    assert app.backend.get_key_for_task(plain.id) in subscribed
    assert get_and_forget(plain, 60).shape == (1, 384)
    listened.forget()
