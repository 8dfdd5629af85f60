"""``embedq status``: one health report for a person (and ``--json`` for a program).

It answers within a few seconds whatever is down: each server (the broker's Redis, the
cache's if apart, the store) is probed and read in a thread of its own, and one that does
not answer becomes a line under ``servers``, an alert, and exit status 69.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis

from embedq.broker.client import FULL_SHARE, check_eviction_policy, connect, read_memory
from embedq.errors import ConfigurationError, StoreError, UnavailableError
from embedq.ops.backlog import figures, read_counts
from embedq.ops.cost import cost_report
from embedq.ops.heartbeat import read_expired_heartbeats, read_heartbeats
from embedq.ops.probe import (
    Server,
    ServerState,
    broker_server,
    cache_server,
    probe,
    run_bounded,
    store_server,
)
from embedq.ops.registry import listed_models, read_depths
from embedq.ops.slo import evaluate, read_usage
from embedq.search.build import blob_name
from embedq.settings import QUEUES, Settings
from embedq.store.base import CollectionState, Store

# An index more than two rebuild intervals (and at least this many seconds) behind its
# collection's last write is reported as stale.
STALE_INDEX_MIN_S = 2
# The broker's Redis this full (share of maxmemory) is worth a warning before it refuses.
NEARLY_FULL_SHARE = 0.9
# Status answers within the probe timeout plus this, whatever hangs.
READ_MARGIN_S = 1.5


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
    #: Each server's state (:class:`embedq.ops.probe.ServerState`); none for a bare report.
    servers: list[ServerState] = field(default_factory=list)
    #: Per queue and traffic class: depth, backlog seconds, waits (see ops.backlog).
    traffic: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dict(self.__dict__) | {"servers": [state.as_dict() for state in self.servers]}

    def server(self, name: str) -> ServerState | None:
        """The state of server ``name`` (redis, cache, store), if it was probed."""
        return next((state for state in self.servers if state.name == name), None)

    def knows(self, name: str) -> bool:
        """Whether what server ``name`` holds is in the report (it answered, or was not
        probed: a report built from clients handed in)."""
        state = self.server(name)
        return state is None or state.reachable

    def unreachable(self) -> UnavailableError | ConfigurationError | None:
        """The servers that did not answer as one error (exit 69; 78 when the first refused
        its URL or credentials), or None."""
        down = [state for state in self.servers if not state.reachable]
        if not down:
            return None
        message = " | ".join(state.error or state.name for state in down)
        config = isinstance(down[0].failure, ConfigurationError)
        return ConfigurationError(message) if config else UnavailableError(message)


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
    return [index_state(store, state) for state in store.states()]


def index_state(store: Store, state: CollectionState) -> dict[str, Any]:
    """One collection's items, last write, its published index (version, items, when
    built, the ``ef`` its build chose, the recall@10 it measured and on what) and how far
    behind the collection it is."""
    published = store.blob_version(blob_name(state.collection))
    meta = published[1] if published else {}
    built = datetime.fromisoformat(meta["built_at"]) if meta.get("built_at") else None
    lag = (state.updated_at - built).total_seconds() if built and state.updated_at else None
    return {
        "collection": state.collection,
        "items": state.count,
        "last_write": state.updated_at.isoformat() if state.updated_at else None,
        "index_version": published[0] if published else None,
        "index_items": meta.get("count"),
        "index_built_at": meta.get("built_at"),
        "fresh": meta.get("state") == state.token,
        "behind_s": round(max(lag, 0.0), 1) if lag is not None else None,
        "ef": meta.get("ef"),
        "recall_at_10": meta.get("recall_at_10"),
        "tuned_on": meta.get("tuned_on"),
        "tuned_queries": meta.get("tuned_queries"),
    }


def read_redis(client: redis.Redis) -> dict[str, Any]:
    """The broker's Redis memory: used, maxmemory, policy, full ({} if INFO is refused)."""
    try:
        return read_memory(client).as_dict()
    except redis.ResponseError:
        return {}


def read_redis_part(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    """What the broker's Redis holds for the report: workers, queues, usage, SLOs, memory."""
    workers = read_workers(client)
    now = datetime.now(UTC).timestamp()
    last = read_usage(client, 60, now - 60)
    usage = read_usage(client, settings.slo_window_s, now)
    lookups = usage.cache_hits + usage.cache_misses
    by_class = read_depths(client, workers)
    return {
        "workers": workers,
        "queue_depths": {queue: sum(counts.values()) for queue, counts in by_class.items()},
        "traffic": [row.as_dict() for row in figures(by_class, workers, read_counts(client))],
        "texts_last_minute": last.texts,
        "requests_last_minute": last.requests,
        "cache_hit_rate": round(usage.cache_hits / lookups, 4) if lookups else None,
        "slos": [s.as_dict() for s in evaluate(usage, settings)],
        "redis": read_redis(client),
        "costs": cost_report(workers),
        "stranded": read_stranded(client, workers),
        "eviction_warning": check_eviction_policy(client),
    }


def read_store_part(store: Store | None, settings: Settings) -> dict[str, Any]:
    """What the store holds for the report: its indexes (or why it could not say)."""
    try:
        return {"indexes": read_indexes(store, settings) if store is not None else []}
    except StoreError as exc:
        return {"indexes": [], "store_error": str(exc)}


def build_report(client: redis.Redis, store: Store | None, settings: Settings) -> Report:
    """Read heartbeats, queues, counters and the store into one report with alerts."""
    return assemble(read_redis_part(client, settings), read_store_part(store, settings), settings)


def assemble(
    from_redis: dict[str, Any] | None,
    from_store: dict[str, Any] | None,
    settings: Settings,
    servers: list[ServerState] | None = None,
) -> Report:
    """The report from what each server gave (None: it did not answer), with its alerts."""
    got = from_redis or {}
    report = Report(
        workers=got.get("workers", {}),
        queue_depths=got.get("queue_depths", {}),
        texts_last_minute=got.get("texts_last_minute", 0),
        requests_last_minute=got.get("requests_last_minute", 0),
        cache_hit_rate=got.get("cache_hit_rate"),
        slos=got.get("slos", []),
        indexes=(from_store or {}).get("indexes", []),
        redis=got.get("redis", {}),
        costs=got.get("costs", {}),
        stranded=got.get("stranded", {}),
        servers=servers or [],
        traffic=got.get("traffic", []),
    )
    report.alerts = alerts(report, settings, (from_store or {}).get("store_error"))
    if warning := got.get("eviction_warning"):
        report.alerts.append(warning)
    return report


def collect(settings: Settings) -> Report:
    """``embedq status``: every server probed and read at once, each in a thread of its own,
    within ``EMBEDQ_PROBE_TIMEOUT_S`` + ``READ_MARGIN_S`` in all, whatever hangs; a server
    that does not answer is a state, an alert and :meth:`Report.unreachable`."""
    timeout_s = settings.probe_timeout_s
    # Status never waits out a restart: no retries, reads as bounded as the probe.
    bounded = settings.model_copy(
        update={"db_retry_budget_s": 0.0, "db_statement_timeout_s": timeout_s + READ_MARGIN_S}
    )
    broker, cache, store = broker_server(), cache_server(settings), store_server(settings)
    reads: list[tuple[Server, Callable[[], dict[str, Any]] | None]] = [
        (broker, functools.partial(_read_broker, broker, timeout_s, settings)),
        *([(cache, None)] if cache else []),
        (store, functools.partial(_read_store, store, bounded)),
    ]
    calls = [functools.partial(_probe_and_read, srv, read, bounded) for srv, read in reads]
    limit_s = timeout_s + READ_MARGIN_S
    outcomes = run_bounded(calls, limit_s)
    states, parts = [], {}
    for (srv, _), outcome in zip(reads, outcomes, strict=True):
        state, part = _outcome(srv, outcome, limit_s)
        states.append(state)
        parts[srv.name] = part
    return assemble(parts.get("redis"), parts.get("store"), settings, states)


def _probe_and_read(
    server: Server, read: Callable[[], dict[str, Any]] | None, settings: Settings
) -> tuple[ServerState, dict[str, Any] | None]:
    try:
        seconds = probe(server, settings)
    except (UnavailableError, ConfigurationError) as exc:
        return ServerState(server.name, server.shown, False, error=str(exc), failure=exc), None
    state = ServerState(server.name, server.shown, True, latency_ms=round(seconds * 1000, 1))
    return state, read() if read is not None else None


def _outcome(
    server: Server, outcome: Any, limit_s: float
) -> tuple[ServerState, dict[str, Any] | None]:
    """A thread's (state, part), or a state saying why it gave none."""
    if not isinstance(outcome, BaseException):
        return outcome
    cause = f"no answer within {limit_s:g} s" if isinstance(outcome, TimeoutError) else outcome
    error = UnavailableError(
        f"{server.what} at {server.shown} did not answer the status reads ({cause}): check "
        f"that it runs, and {server.setting}"
    )
    return ServerState(server.name, server.shown, False, error=str(error), failure=error), None


def _read_broker(server: Server, timeout_s: float, settings: Settings) -> dict[str, Any]:
    # No retries and bounded reads: a Redis that stalls after the probe cannot hold status.
    client = connect(server.url, retries=0, socket_timeout_s=timeout_s)
    try:
        return read_redis_part(client, settings)
    finally:
        client.close()


def _read_store(server: Server, settings: Settings) -> dict[str, Any]:
    from embedq.store.factory import create_store

    store = create_store(server.url, settings)
    try:
        return read_store_part(store, settings)
    finally:
        store.close()


def alerts(report: Report, settings: Settings, store_error: str | None = None) -> list[str]:
    """Plain-language problems, each with what to do about it."""
    out = [state.error or state.name for state in report.servers if not state.reachable]
    if report.knows("redis"):
        out += _worker_alerts(report)
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


def _worker_alerts(report: Report) -> list[str]:
    """Workers, queues and SLOs in words (what the broker's Redis says)."""
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
    return out


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


def _tuning(index: dict[str, Any]) -> str:
    """The ef the index's build chose and the recall@10 it measured, and on what."""
    if not index.get("ef"):
        return ""
    on = {"queries": "recent queries", "held_out": "stored items held out"}
    what = on.get(index.get("tuned_on") or "", "probe queries")
    count = f"{index['tuned_queries']} " if index.get("tuned_queries") else ""
    return f", ef {index['ef']} (recall@10 {index['recall_at_10']} on {count}{what})"


def render(report: Report) -> str:
    """The report as text for a terminal."""
    lines = render_servers(report.servers)
    if report.knows("redis"):
        lines += render_redis_part(report)
    else:
        lines.append("workers, queues, cache, SLOs: unknown (the Redis broker does not answer)")
    if report.knows("store"):
        lines.append("indexes:")
        for index in report.indexes:
            if index["index_version"] is None:
                state = "no index"
            else:
                behind = "fresh" if index["fresh"] else f"behind {index['behind_s']} s"
                state = f"index v{index['index_version']}, {behind}{_tuning(index)}"
            lines.append(f"  {index['collection']}: {index['items']} items, {state}")
    else:
        lines.append("indexes: unknown (the store does not answer)")
    lines.append("alerts:" if report.alerts else "alerts: none")
    lines.extend(f"  ! {alert}" for alert in report.alerts)
    return "\n".join(lines)


def render_servers(servers: list[ServerState]) -> list[str]:
    """One line per server: its URL (password hidden) and whether it answered."""
    if not servers:
        return []
    lines = ["servers:"]
    for state in servers:
        refused = isinstance(state.failure, ConfigurationError)
        how = "REFUSES ITS SETTINGS (see alerts)" if refused else "DOES NOT ANSWER"
        how = f"ok ({state.latency_ms:g} ms)" if state.reachable else how
        lines.append(f"  {state.name}: {state.url} {how}")
    return lines


def render_redis_part(report: Report) -> list[str]:
    """Workers, queues, costs, memory, usage and SLOs (what the broker's Redis holds)."""
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
    return lines


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
    lines = ["traffic (last 5 min):"] if rows else []
    for r in rows:
        waits = "-" if r["wait_p50_s"] is None else f"{r['wait_p50_s']:g}/{r['wait_p99_s']:g} s"
        expired = f", {r['expired']} expired" if r["expired"] else ""
        lines.append(
            f"  {r['queue']} {r['traffic']}: {r['depth']} waiting, backlog {r['backlog_s']:g} s, "
            f"waited p50/p99 {waits}, {r['done']} done{expired}"
        )
    return lines
