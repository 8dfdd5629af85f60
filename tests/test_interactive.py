"""Interactive traffic: per-task Redis work summed in process, the batcher's waiting policy,
the API's shared result listener, and the bench's interactive load driver."""

from __future__ import annotations

import io
import uuid

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

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
