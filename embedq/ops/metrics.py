"""Prometheus metrics of a worker, served on ``EMBEDQ_METRICS_PORT`` (one port per worker).

Counters and histograms live in the worker process. Cluster-wide figures that Redis holds
(queue depth, router decisions, SLOs) are read at scrape time by :class:`RedisCollector`.
With ``PROMETHEUS_MULTIPROC_DIR`` set (prefork pools), every child writes its own files and
the port serves their sum (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import REGISTRY, Collector

from embedq.broker.traffic import CLASSES
from embedq.keys import stats_key
from embedq.ops.backlog import figures, read_counts
from embedq.ops.cost import cost_family, cost_report
from embedq.ops.registry import read_depths, read_heartbeats
from embedq.ops.slo import evaluate, read_usage
from embedq.settings import Settings

log = logging.getLogger(__name__)

PORT_TRIES = 16

TEXTS = Counter("embedq_texts_embedded", "Texts encoded by the model (cache misses)", ["device"])
TOKENS = Counter("embedq_tokens", "Real (unpadded) tokens encoded", ["device"])
BATCH_SIZE = Histogram(
    "embedq_batch_size", "Texts per encoded batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
BATCH_TOKENS = Histogram(
    "embedq_batch_tokens",
    "Padded tokens (longest x count) per encoded batch",
    buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536),
)
ENCODE_SECONDS = Histogram(
    "embedq_encode_seconds",
    "Model time of one batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
TASK_SECONDS = Histogram(
    "embedq_task_seconds",
    "Time of one task in the worker",
    ["task"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
CACHE = Counter("embedq_cache_lookups", "Cache lookups by outcome", ["outcome"])
TRUNCATED = Counter("embedq_truncated_inputs", "Texts cut to the model's max tokens")
ERRORS = Counter("embedq_errors", "Failed tasks by error kind", ["kind"])
CACHE_ERRORS = Counter(
    "embedq_cache_errors",
    "Cache reads or writes that failed (OOM, connection loss) and counted as misses",
    ["op"],
)
CACHE_WRITES_SKIPPED = Counter(
    "embedq_cache_writes_skipped",
    "Vectors not written to a cache that shares the broker's Redis: over EMBEDQ_CACHE_MAX_SHARE",
)
REDIS_FULL_WAITS = Counter(
    "embedq_redis_full_waits",
    "Writes refused by a full Redis (maxmemory, noeviction) and retried after a wait",
    ["where"],
)
SPLITS = Counter("embedq_batch_splits", "Batches split after a failure (e.g. OOM)")
BATCH_BUDGET = Gauge(
    "embedq_batch_budget_tokens",
    "Padded-token budget of the next batch (learned when EMBEDQ_ADAPTIVE_BATCH is on)",
    ["model"],
    multiprocess_mode="max",
)
TASK_WAIT = Histogram(
    "embedq_task_wait_seconds",
    "Time from publish to start of a task, by queue and traffic class",
    ["queue", "class"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
TASKS_EXPIRED = Counter(
    "embedq_tasks_expired",
    "Tasks dropped unencoded because their caller's deadline passed, by queue and class",
    ["queue", "class"],
)
WORKER_INFO = Gauge(
    "embedq_worker_info",
    "1 per worker process, naming it; join on instance for per-queue and per-worker figures",
    ["worker", "queue", "device"],
    multiprocess_mode="max",
)


class RedisCollector(Collector):
    """Gauges read from Redis at scrape time: queue depth, router decisions, SLOs, GPU memory."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings

    #: Whether a scrape also reports cost and this host's GPUs (workers: yes; the API: no).
    full = True

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One scrape's worth of cluster-wide gauges (skipped if Redis does not answer)."""
        try:
            beats = read_heartbeats(self.client)
            yield from self._queues(beats)
            yield from self._router()
            yield from self._slos()
            if self.full:
                yield cost_family(cost_report(beats))
        except redis.RedisError as exc:
            log.warning("metrics: Redis did not answer: %s", exc)
        if self.full:
            yield from _gpu_memory()
            yield from _gpu_capacity()

    def _queues(self, beats: dict[str, list[dict[str, Any]]]) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "embedq_queue_depth",
            "Tasks waiting per queue and traffic class (its workers' own queues included)",
            labels=["queue", "class"],
        )
        backlog = GaugeMetricFamily(
            "embedq_backlog_seconds",
            "Seconds the live workers need for what waits ahead of a queue's next task of "
            "each class (an autoscaling signal)",
            labels=["queue", "class"],
        )
        depths = read_depths(self.client, beats)
        for row in figures(depths, beats, read_counts(self.client)):
            depth.add_metric([row.queue, row.traffic], row.depth)
            backlog.add_metric([row.queue, row.traffic], row.backlog_s)
        yield from (depth, backlog)
        # INFO directly: broker.client imports this module (read_memory would be a circle).
        info = self.client.info("memory")
        yield GaugeMetricFamily(
            "embedq_redis_used_bytes", "Memory the broker's Redis uses", int(info["used_memory"])
        )
        yield GaugeMetricFamily(
            "embedq_redis_maxmemory_bytes",
            "The broker's Redis memory cap (0: none)",
            int(info.get("maxmemory", 0)),
        )

    def _router(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "embedq_router_decisions",
            "Routing decisions by queue and reason (all producers, since Redis started)",
            labels=["queue", "reason"],
        )
        for field, value in self.client.hgetall(stats_key("router")).items():
            queue, _, reason = field.decode().partition(":")
            family.add_metric([queue, reason], int(value))
        yield family

    def _slos(self) -> Iterator[GaugeMetricFamily]:
        usage = read_usage(self.client, self.settings.slo_window_s)
        sli = GaugeMetricFamily("embedq_slo_sli", "Current SLI over the window", labels=["slo"])
        target = GaugeMetricFamily("embedq_slo_objective", "SLO target", labels=["slo"])
        budget = GaugeMetricFamily(
            "embedq_slo_error_budget_remaining", "Share of error budget left", labels=["slo"]
        )
        for slo in evaluate(usage, self.settings):
            target.add_metric([slo.name], slo.objective)
            if slo.sli is not None:
                sli.add_metric([slo.name], slo.sli)
                budget.add_metric([slo.name], slo.budget_remaining or 0.0)
        yield from (sli, target, budget)


def _gpu_memory() -> Iterator[GaugeMetricFamily]:
    family = GaugeMetricFamily("embedq_gpu_memory_bytes", "CUDA memory in use", labels=["device"])
    try:
        import torch

        for i in range(torch.cuda.device_count() if torch.cuda.is_initialized() else 0):
            family.add_metric([f"cuda:{i}"], torch.cuda.memory_allocated(i))
    except ImportError:  # pragma: no cover
        pass
    yield family


def _gpu_capacity() -> Iterator[GaugeMetricFamily]:
    reserved = GaugeMetricFamily(
        "embedq_gpu_memory_reserved_bytes",
        "CUDA memory the caching allocator holds",
        labels=["device"],
    )
    total = GaugeMetricFamily(
        "embedq_gpu_memory_total_bytes", "CUDA memory of the device", labels=["device"]
    )
    try:
        import torch

        for i in range(torch.cuda.device_count() if torch.cuda.is_initialized() else 0):
            reserved.add_metric([f"cuda:{i}"], torch.cuda.memory_reserved(i))
            total.add_metric([f"cuda:{i}"], torch.cuda.get_device_properties(i).total_memory)
    except ImportError:  # pragma: no cover
        pass
    yield from (reserved, total)


def describe_worker(hostname: str, queues: list[str], device: str) -> None:
    """Publish ``embedq_worker_info`` for this worker, so dashboards can group by queue."""
    # One series per process: dashboards join on it one-to-one by instance.
    WORKER_INFO.clear()
    WORKER_INFO.labels(hostname, ",".join(sorted(queues)), device).set(1)


def describe_classes(queues: list[str]) -> None:
    """Export the per-class series of this worker's queues at zero from the start, so
    dashboards and alerts see them before the first expired task."""
    for queue in queues:
        for traffic in CLASSES:
            TASKS_EXPIRED.labels(queue, traffic)
            TASK_WAIT.labels(queue, traffic)


def serve(client: redis.Redis, settings: Settings) -> int | None:
    """Serve this worker's metrics on the first free port from the setting; returns it."""
    if not settings.metrics_port:
        return None
    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    registry.register(RedisCollector(client, settings))
    for port in range(settings.metrics_port, settings.metrics_port + PORT_TRIES):
        try:
            start_http_server(port, registry=registry)
        except OSError:
            continue
        log.info("metrics on http://0.0.0.0:%d/metrics", port)
        return port
    log.warning("no free metrics port in %d..+%d", settings.metrics_port, PORT_TRIES)
    return None


# The API's routes, as the ``route`` label; anything else (404s, /docs) counts as "other".
API_ROUTES = ("/embed", "/v1/embeddings", "/search", "/health", "/metadata", "/metrics")


class ClusterCollector(RedisCollector):
    """The Redis-held gauges only (queue depth, router, SLOs): for processes without a GPU."""

    full = False


class ApiMetrics:
    """The HTTP API's metrics, in a registry of its own: its requests and the cluster gauges."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "embedq_api_requests",
            "HTTP requests to the API by route and status code",
            ["route", "status"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "embedq_api_request_seconds",
            "Time the API took to answer, by route",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.registry.register(ClusterCollector(client, settings))

    def observe(self, path: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        route = path if path in API_ROUTES else "other"
        self.requests.labels(route, str(status)).inc()
        self.seconds.labels(route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestMetrics:
    """ASGI middleware counting every HTTP request into :class:`ApiMetrics`."""

    def __init__(self, app: Any, metrics: ApiMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def record(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            self.metrics.observe(scope["path"], status[0], time.perf_counter() - started)
