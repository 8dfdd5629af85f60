"""``embedq status``: one health report for a person (and ``--json`` for a program)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis

from embedq.broker.client import FULL_SHARE, check_eviction_policy, read_memory
from embedq.errors import StoreError
from embedq.ops.backlog import figures, read_counts
from embedq.ops.cost import cost_report
from embedq.ops.heartbeat import read_expired_heartbeats, read_heartbeats
from embedq.ops.registry import listed_models, read_depths
from embedq.ops.slo import evaluate, read_usage
from embedq.search.build import blob_name
from embedq.settings import QUEUES, Settings
from embedq.store.base import Store

# An index more than two rebuild intervals (and at least this many seconds) behind its
# collection's last write is reported as stale.
STALE_INDEX_MIN_S = 2
# The broker's Redis this full (share of maxmemory) is worth a warning before it refuses.
NEARLY_FULL_SHARE = 0.9


@dataclass
class Report:
    """Everything ``embedq status`` shows."""

    workers: dict[str, list[dict[str, Any]]]
    queue_depths: dict[str, int]
    texts_last_minute: int
    requests_last_minute: int
    cache_hit_rate: float | None
    slos: list[dict[str, Any]]
    indexes: list[dict[str, Any]]
    alerts: list[str] = field(default_factory=list)
    #: The broker's Redis memory (see :class:`embedq.broker.client.MemoryState`).
    redis: dict[str, Any] = field(default_factory=dict)
    #: Cost per 1 M tokens per queue and per worker (see :mod:`embedq.ops.cost`).
    costs: dict[str, Any] = field(default_factory=dict)
    #: Tasks waiting on the direct queue of a worker that stopped beating, per queue.
    stranded: dict[str, int] = field(default_factory=dict)
    #: Per queue and traffic class: depth, backlog seconds, waits (see ops.backlog).
    traffic: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dict(self.__dict__)


def read_workers(client: redis.Redis) -> dict[str, list[dict[str, Any]]]:
    """Live workers per queue, from their heartbeats."""
    return {q: [] for q in QUEUES} | read_heartbeats(client)


def read_stranded(client: redis.Redis, workers: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    """Direct queues of workers that stopped beating (within the last hour) and still hold
    tasks: nobody else takes from them until a worker of that name returns."""
    live = {b.get("direct_queue") for beats in workers.values() for b in beats}
    dead = {
        b["direct_queue"]
        for beats in read_expired_heartbeats(client).values()
        for b in beats
        if b.get("direct_queue") and b["direct_queue"] not in live
    }
    names = sorted(dead)
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.llen(name)
    return {name: int(n) for name, n in zip(names, pipe.execute(), strict=True) if n}


def read_indexes(store: Store, settings: Settings) -> list[dict[str, Any]]:
    """Per collection: items, last write, the published index and how far behind it is."""
    out = []
    for state in store.states():
        published = store.blob_version(blob_name(state.collection))
        meta = published[1] if published else {}
        built = datetime.fromisoformat(meta["built_at"]) if meta.get("built_at") else None
        lag = (state.updated_at - built).total_seconds() if built and state.updated_at else None
        out.append(
            {
                "collection": state.collection,
                "items": state.count,
                "last_write": state.updated_at.isoformat() if state.updated_at else None,
                "index_version": published[0] if published else None,
                "index_items": meta.get("count"),
                "index_built_at": meta.get("built_at"),
                "fresh": meta.get("state") == state.token,
                "behind_s": round(max(lag, 0.0), 1) if lag is not None else None,
            }
        )
    return out


def read_redis(client: redis.Redis) -> dict[str, Any]:
    """The broker's Redis memory: used, maxmemory, policy, full ({} if INFO is refused)."""
    try:
        return read_memory(client).as_dict()
    except redis.ResponseError:
        return {}


def build_report(client: redis.Redis, store: Store | None, settings: Settings) -> Report:
    """Read heartbeats, queues, counters and the store into one report with alerts."""
    workers = read_workers(client)
    by_class = read_depths(client, workers)
    depths = {queue: sum(counts.values()) for queue, counts in by_class.items()}
    now = datetime.now(UTC).timestamp()
    last = read_usage(client, 60, now - 60)
    usage = read_usage(client, settings.slo_window_s, now)
    lookups = usage.cache_hits + usage.cache_misses
    slos = [s.as_dict() for s in evaluate(usage, settings)]
    try:
        indexes = read_indexes(store, settings) if store is not None else []
        store_error = None
    except StoreError as exc:
        indexes, store_error = [], str(exc)
    report = Report(
        workers=workers,
        queue_depths=depths,
        texts_last_minute=last.texts,
        requests_last_minute=last.requests,
        cache_hit_rate=round(usage.cache_hits / lookups, 4) if lookups else None,
        slos=slos,
        indexes=indexes,
        redis=read_redis(client),
        costs=cost_report(workers),
        stranded=read_stranded(client, workers),
        traffic=[row.as_dict() for row in figures(by_class, workers, read_counts(client))],
    )
    report.alerts = alerts(report, settings, store_error)
    if warning := check_eviction_policy(client):
        report.alerts.append(warning)
    return report


def alerts(report: Report, settings: Settings, store_error: str | None = None) -> list[str]:
    """Plain-language problems, each with what to do about it."""
    out = []
    if not any(report.workers.values()):
        out.append("no worker alive on any queue: tasks wait in Redis; start `embedq worker`")
    elif not report.workers.get("gpu"):
        out.append("no gpu worker alive: gpu traffic is falling back to cpu")
    if report.workers.get("gpu") and not report.workers.get("cpu"):
        out.append("no cpu worker alive: small requests go to the gpu queue")
    for queue, depth in report.queue_depths.items():
        if depth and not report.workers.get(queue):
            out.append(f"{depth} tasks wait on '{queue}' and no worker consumes it")
    for name, depth in report.stranded.items():
        out.append(
            f"{depth} tasks wait on '{name}', the own queue of a worker that stopped beating: "
            "restart that worker (its supervisor does), or they wait until it returns"
        )
    for slo in report.slos:
        if slo["violated"]:
            out.append(
                f"SLO {slo['name']} violated: {slo['sli']:.4f} < {slo['objective']} "
                f"({slo['description']}); error budget left {slo['budget_remaining']:.0%}"
            )
    for index in report.indexes:
        if index["index_version"] is None:
            out.append(
                f"collection '{index['collection']}' has no index yet: searches scan exactly; "
                "run `embedq index rebuild` or start `celery -A embedq.app beat`"
            )
        elif (index["behind_s"] or 0) > max(STALE_INDEX_MIN_S, 2 * settings.index_rebuild_s):
            out.append(
                f"index of '{index['collection']}' is {index['behind_s']:.0f} s behind its "
                "writes: is celery beat running?"
            )
    if store_error:
        out.append(f"the store did not answer: {store_error}")
    return out + memory_alerts(report.redis)


def memory_alerts(memory: dict[str, Any]) -> list[str]:
    """A full (or nearly full) broker Redis, in words, with what to do."""
    share = memory.get("share")
    if share is None or memory.get("policy") != "noeviction":
        return []
    used = f"{memory['used_mb']} of {memory['maxmemory_mb']} MB"
    remedy = (
        "raise its maxmemory, or give the vector cache its own Redis (EMBEDQ_CACHE_URL) "
        "or a smaller share of this one (EMBEDQ_CACHE_MAX_SHARE)"
    )
    if share >= FULL_SHARE:
        return [
            f"Redis is full ({used}, noeviction): it refuses writes, so workers and producers "
            f"wait and retry (nothing is lost, nothing moves); {remedy}"
        ]
    if share >= NEARLY_FULL_SHARE:
        return [f"Redis is {share:.0%} full ({used}): at 100% it refuses writes; {remedy}"]
    return []


def render(report: Report) -> str:
    """The report as text for a terminal."""
    lines = ["workers:"]
    for queue in sorted(report.workers):
        beats = report.workers[queue]
        lines.append(f"  {queue}: {len(beats)} alive")
        for b in beats:
            speed = f"{b['texts_per_s']:.0f} texts/s" if b.get("texts_per_s") else "idle"
            port = f", metrics :{b['metrics_port']}" if b.get("metrics_port") else ""
            price = _price(report.costs.get("workers", {}).get(queue, {}).get(b["hostname"]))
            if "own_queue_depth" in b:
                port += f", {b['own_queue_depth']} waiting on its own queue"
            # Every model the worker serves (older heartbeats name one).
            models = ", ".join(str(m.get("model_id")) for m in listed_models(b))
            lines.append(f"    {b['hostname']} ({b['device']}, {models}) {speed}{port}{price}")
    depths = ", ".join(f"{q} {d}" for q, d in report.queue_depths.items())
    lines.append(f"queues: {depths}")
    lines.extend(render_traffic(report.traffic))
    lines.extend(render_costs(report.costs))
    if memory := report.redis:
        cap = f"of {memory['maxmemory_mb']} MB" if memory.get("maxmemory_mb") else "(no maxmemory)"
        lines.append(f"redis: {memory['used_mb']} MB {cap}, {memory['policy']}")
    lines.append(
        f"last minute: {report.requests_last_minute} requests, {report.texts_last_minute} texts"
    )
    rate = report.cache_hit_rate
    lines.append(f"cache hit rate: {'-' if rate is None else f'{rate:.1%}'}")
    lines.append("SLOs:")
    for slo in report.slos:
        sli = "no data" if slo["sli"] is None else f"{slo['sli']:.4f}"
        mark = "VIOLATED" if slo["violated"] else "ok"
        left = slo["budget_remaining"]
        budget = "" if left is None else f", budget {left:.0%}"
        lines.append(f"  {slo['name']}: {sli} (objective {slo['objective']}){budget} {mark}")
    lines.append("indexes:")
    for index in report.indexes:
        if index["index_version"] is None:
            state = "no index"
        else:
            behind = "fresh" if index["fresh"] else f"behind {index['behind_s']} s"
            state = f"index v{index['index_version']}, {behind}"
        lines.append(f"  {index['collection']}: {index['items']} items, {state}")
    lines.append("alerts:" if report.alerts else "alerts: none")
    lines.extend(f"  ! {alert}" for alert in report.alerts)
    return "\n".join(lines)


def _price(cost: dict[str, Any] | None) -> str:
    """``, 0.12/1M tokens (0.05 at full use)`` for a worker or queue with a price."""
    if not cost:
        return ""
    now = cost["cost_per_million_tokens"]
    full = cost["cost_per_million_tokens_at_full"]
    spent = "idle" if now is None else f"{now:.4g}/1M tokens"
    return f", {spent} ({full:.4g} at full use, {cost['cost_per_hour']:g}/h)"


def render_costs(costs: dict[str, Any]) -> list[str]:
    """Cost per 1 M tokens per queue (EMBEDQ_COST_PER_HOUR over measured throughput)."""
    queues = costs.get("queues") or {}
    if not queues:
        return ["cost: - (set EMBEDQ_COST_PER_HOUR on workers)"]
    return ["cost:"] + [f"  {queue}: {_price(cost)[2:]}" for queue, cost in sorted(queues.items())]


def render_traffic(rows: list[dict[str, Any]]) -> list[str]:
    """Per queue and class: waiting tasks, backlog seconds, waits p50/p99 (last 5 min)."""
    lines = ["traffic (last 5 min):"]
    for r in rows:
        waits = "-" if r["wait_p50_s"] is None else f"{r['wait_p50_s']:g}/{r['wait_p99_s']:g} s"
        expired = f", {r['expired']} expired" if r["expired"] else ""
        lines.append(
            f"  {r['queue']} {r['traffic']}: {r['depth']} waiting, backlog {r['backlog_s']:g} s, "
            f"waited p50/p99 {waits}, {r['done']} done{expired}"
        )
    return lines
