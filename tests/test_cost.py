"""Cost per 1 M tokens from heartbeats (pure), the heartbeat's meter, and how status shows it."""

from __future__ import annotations

import pytest

from embedq.ops import cost
from embedq.ops.heartbeat import Meter
from embedq.ops.status import render_costs


def beat(host: str, price: float | None, tokens_per_s: float | None, use: float) -> dict:
    return {
        "hostname": host,
        "cost_per_hour": price,
        "tokens_per_s": tokens_per_s,
        "utilisation": use,
    }


@pytest.mark.parametrize(
    ("heartbeat", "now", "full"),
    [
        # 3.6/h for 1000 tokens/s: 3.6 M tokens an hour at full use, so 1.0 per 1 M.
        (beat("a", 3.6, 1000.0, 1.0), 1.0, 1.0),
        # Busy a quarter of the time: each token costs four times as much.
        (beat("a", 3.6, 1000.0, 0.25), 4.0, 1.0),
        # Idle: no effective price, the capacity price stays.
        (beat("a", 3.6, 1000.0, 0.0), None, 1.0),
    ],
)
def test_worker_cost(heartbeat, now, full):
    found = cost.worker_cost(heartbeat)
    assert found["cost_per_million_tokens"] == (None if now is None else pytest.approx(now))
    assert found["cost_per_million_tokens_at_full"] == pytest.approx(full)


@pytest.mark.parametrize(
    "heartbeat", [beat("a", None, 1000.0, 1.0), beat("a", 3.6, None, 1.0), beat("a", 3.6, 0, 1.0)]
)
def test_no_price_without_a_cost_and_a_measurement(heartbeat):
    assert cost.worker_cost(heartbeat) is None


def test_queue_cost_sums_priced_workers():
    beats = [beat("a", 3.6, 1000.0, 1.0), beat("b", 3.6, 3000.0, 0.5), beat("c", None, 9.0, 1.0)]
    total = cost.queue_cost(beats)
    # 7.2/h; 4000 tokens/s at full use, 2500 used.
    assert total["cost_per_million_tokens_at_full"] == pytest.approx(7.2 / 4000 / 3600 * 1e6)
    assert total["cost_per_million_tokens"] == pytest.approx(7.2 / 2500 / 3600 * 1e6)
    assert (total["workers"], total["unpriced"]) == (2, 1)
    assert cost.queue_cost([beat("c", None, 9.0, 1.0)]) is None


def test_report_and_metric():
    report = cost.cost_report(
        {"gpu": [beat("gpu-0@h", 3.6, 1000.0, 1.0), beat("gpu-1@h", 3.6, 1000.0, 0.0)], "cpu": []}
    )
    assert set(report["queues"]) == {"gpu"} and set(report["workers"]["gpu"]) == {
        "gpu-0@h",
        "gpu-1@h",
    }
    family = cost.cost_family(report)
    assert family.name == "embedq_cost_per_million_tokens"
    samples = {(s.labels["queue"], s.labels["worker"]): s.value for s in family.samples}
    # The idle worker has no effective price, so no sample; the queue's total counts it.
    assert samples == {("gpu", "all"): pytest.approx(2.0), ("gpu", "gpu-0@h"): pytest.approx(1.0)}
    lines = render_costs(report)
    assert lines[0] == "cost:" and lines[1] == "  gpu: 2/1M tokens (1 at full use, 7.2/h)"
    assert "EMBEDQ_COST_PER_HOUR" in render_costs(cost.cost_report({"cpu": []}))[0]


def test_meter_measures_speed_while_busy_and_utilisation():
    work = iter([(0, 0.0), (1000, 0.5), (1000, 0.5)])
    meter = Meter(lambda: next(work))
    first = meter.update()
    assert first["tokens_per_s"] == pytest.approx(2000.0)  # 1000 tokens in 0.5 model seconds
    assert 0 < first["utilisation"] <= 1.0
    idle = meter.update()
    assert idle["tokens_per_s"] == pytest.approx(2000.0)  # an idle beat is not a slow one
    assert idle["utilisation"] < first["utilisation"]


def test_the_metric_is_read_from_live_heartbeats(side_redis, runtime):
    """Real heartbeats in Redis, read by the workers' scrape-time collector."""
    from embedq.broker.client import connect
    from embedq.ops.heartbeat import Heartbeat
    from embedq.ops.metrics import RedisCollector
    from embedq.settings import Settings

    client = connect(side_redis(9))
    work = iter([(0, 0.0), (36_000, 1.0)])
    beat = Heartbeat(
        client, ["gpu"], "gpu-0@h", runtime.encoder, lambda: 0, work=lambda: next(work)
    )
    beat.about["cost_per_hour"] = 3.6
    beat.beat()
    families = {f.name: f for f in RedisCollector(client, Settings()).collect()}
    samples = {
        s.labels["worker"]: s.value for s in families["embedq_cost_per_million_tokens"].samples
    }
    # 36,000 tokens/s while busy: 3.6/h buys 129.6 M tokens an hour at full use.
    assert set(samples) == {"all", "gpu-0@h"} and samples["all"] == samples["gpu-0@h"]
    at_full = 3.6 / (36_000 * 3600) * 1e6
    utilisation = read_utilisation(client)
    assert samples["all"] == pytest.approx(at_full / utilisation, rel=1e-3)
    beat.stop()
    client.flushdb()


def read_utilisation(client) -> float:
    from embedq.ops.heartbeat import read_heartbeats

    return read_heartbeats(client)["gpu"][0]["utilisation"]
