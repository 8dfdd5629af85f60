"""Cost per 1 M tokens, per worker and per queue, from heartbeats.

A worker that sets ``EMBEDQ_COST_PER_HOUR`` (any currency unit) publishes it in its
heartbeat with two measurements: ``tokens_per_s``, its speed while encoding (tokens over
model seconds), and ``utilisation``, the share of wall time it spends encoding. Two prices
follow:

- ``cost_per_million_tokens``: what a million tokens really cost at the measured
  utilisation (an idle worker still costs its hourly price): cost / (speed x utilisation);
- ``cost_per_million_tokens_at_full``: what they would cost with the worker always busy:
  cost / speed (the price of capacity, for choosing between GPU and CPU).

A queue's figures sum its priced workers' costs and token rates; workers without a price
or a measurement yet are left out (and counted in ``unpriced``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import GaugeMetricFamily

HOUR_S = 3600.0
MILLION = 1_000_000.0
# Below this utilisation the effective price is not reported (idle: no tokens to divide by).
MIN_UTILISATION = 1e-3
# The `worker` label of a queue's total in the metric.
ALL_WORKERS = "all"


def per_million(cost_per_hour: float, tokens_per_s: float) -> float | None:
    """Cost of 1 M tokens at ``tokens_per_s`` for ``cost_per_hour``; None without a rate."""
    if tokens_per_s <= 0:
        return None
    return cost_per_hour / (tokens_per_s * HOUR_S) * MILLION


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def prices(
    cost_per_hour: float, busy_tokens_per_s: float, used_tokens_per_s: float
) -> dict[str, Any]:
    """The two prices of one worker or queue (see the module's docstring)."""
    effective = per_million(cost_per_hour, used_tokens_per_s) if used_tokens_per_s else None
    return {
        "cost_per_hour": cost_per_hour,
        "tokens_per_s": round(busy_tokens_per_s, 1),
        "cost_per_million_tokens": _rounded(effective),
        "cost_per_million_tokens_at_full": _rounded(per_million(cost_per_hour, busy_tokens_per_s)),
    }


def _rates(beat: dict[str, Any]) -> tuple[float, float] | None:
    """(busy tokens/s, used tokens/s) of a priced, measured beat; None otherwise."""
    speed = beat.get("tokens_per_s") or 0.0
    if beat.get("cost_per_hour") is None or speed <= 0:
        return None
    utilisation = beat.get("utilisation") or 0.0
    return speed, speed * utilisation if utilisation >= MIN_UTILISATION else 0.0


def worker_cost(beat: dict[str, Any]) -> dict[str, Any] | None:
    """One worker's prices from its heartbeat; None when it has no price or no measurement."""
    rates = _rates(beat)
    if rates is None:
        return None
    return prices(float(beat["cost_per_hour"]), *rates) | {"utilisation": beat.get("utilisation")}


def queue_cost(beats: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """A queue's prices over its priced, measured workers; None when there are none."""
    cost = busy = used = 0.0
    priced = unpriced = 0
    for beat in beats:
        if (rates := _rates(beat)) is None:
            unpriced += 1
            continue
        priced += 1
        cost += float(beat["cost_per_hour"])
        busy, used = busy + rates[0], used + rates[1]
    if not priced:
        return None
    return prices(cost, busy, used) | {"workers": priced, "unpriced": unpriced}


def cost_report(workers: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """``{"queues": {queue: prices}, "workers": {queue: {hostname: prices}}}`` (priced only)."""
    queues, per_worker = {}, {}
    for queue, beats in workers.items():
        if (total := queue_cost(beats)) is not None:
            queues[queue] = total
        found = {b["hostname"]: c for b in beats if (c := worker_cost(b)) is not None}
        if found:
            per_worker[queue] = found
    return {"queues": queues, "workers": per_worker}


def cost_family(report: dict[str, Any]) -> GaugeMetricFamily:
    """``embedq_cost_per_million_tokens{queue, worker}`` from :func:`cost_report` (the
    effective price; ``worker="all"`` is the queue's total)."""
    family = GaugeMetricFamily(
        "embedq_cost_per_million_tokens",
        "Cost of 1 M tokens at the measured throughput and utilisation (EMBEDQ_COST_PER_HOUR)",
        labels=["queue", "worker"],
    )
    for queue, total in report["queues"].items():
        if total["cost_per_million_tokens"] is not None:
            family.add_metric([queue, ALL_WORKERS], total["cost_per_million_tokens"])
    for queue, found in report["workers"].items():
        for hostname, cost in found.items():
            if cost["cost_per_million_tokens"] is not None:
                family.add_metric([queue, hostname], cost["cost_per_million_tokens"])
    return family
