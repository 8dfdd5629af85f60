"""Which queue a task goes to: by expected completion time, from live worker heartbeats.

An explicit ``queue=`` always wins. Otherwise: no live gpu worker -> cpu; no live cpu
worker -> gpu; a large batch -> gpu unless its expected time is more than twice cpu's;
a small one -> whichever queue is expected to finish it first (cpu on a tie, keeping the
gpu for bulk work). Every decision is counted with its reason in Redis.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import redis

from embedq.broker.client import shared_client
from embedq.encode.models import serves
from embedq.errors import UnknownModelError
from embedq.inputs import task_items
from embedq.keys import stats_key
from embedq.ops.heartbeat import read_heartbeats
from embedq.settings import get_settings

log = logging.getLogger(__name__)

ROUTED_TASKS = frozenset({"embedq.embed_texts", "embedq.ingest_documents"})
LARGE_BATCH_TEXTS = 64
# Until a worker has measured itself: rough texts/s by device (all-MiniLM-L6-v2 class models).
PRIOR_TEXTS_PER_S = {"cuda": 3000.0, "mps": 500.0, "cpu": 100.0}
TEXTS_PER_QUEUED_TASK = 64
CACHE_S = 1.0

decisions: Counter[str] = Counter()


@dataclass(frozen=True)
class QueueState:
    """What the router knows of one queue."""

    workers: int
    texts_per_s: float
    depth: int

    def eta_s(self, n_texts: int) -> float:
        """Expected seconds until ``n_texts`` more texts would be done."""
        return (self.depth * TEXTS_PER_QUEUED_TASK + n_texts) / max(self.texts_per_s, 1e-6)


def decide(n_texts: int, states: dict[str, QueueState]) -> tuple[str, str]:
    """(queue, reason) for ``n_texts`` texts, given the live queues."""
    gpu, cpu = states.get("gpu"), states.get("cpu")
    if gpu is None or gpu.workers == 0:
        return "cpu", "no_gpu_worker"
    if cpu is None or cpu.workers == 0:
        return "gpu", "no_cpu_worker"
    gpu_eta, cpu_eta = gpu.eta_s(n_texts), cpu.eta_s(n_texts)
    if n_texts >= LARGE_BATCH_TEXTS:
        return ("gpu", "large_batch") if gpu_eta <= 2 * cpu_eta else ("cpu", "gpu_backlog")
    return ("gpu", "gpu_sooner") if gpu_eta < cpu_eta else ("cpu", "cpu_sooner")


def read_states(client: redis.Redis) -> dict[str, QueueState]:
    """Live workers per queue (from heartbeats), their summed speed, and queue depth."""
    states = {}
    for queue, beats in read_heartbeats(client).items():
        speed = sum(b["texts_per_s"] or PRIOR_TEXTS_PER_S.get(b["device"], 100.0) for b in beats)
        states[queue] = QueueState(len(beats), speed, int(client.llen(queue)))
    return states


class Router:
    """Reads the queues at most once a second per process; counts each decision."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, QueueState] = {}
        self._read_at = -CACHE_S

    def choose(self, n_texts: int) -> str:
        """The queue for a request of ``n_texts`` texts."""
        try:
            queue, reason = decide(n_texts, self._current())
        except redis.RedisError as exc:
            log.warning("router could not read heartbeats: %s", exc)
            queue, reason = get_settings().default_queue, "router_error"
        count(queue, reason)
        return queue

    def _current(self) -> dict[str, QueueState]:
        with self._lock:
            if time.monotonic() - self._read_at >= CACHE_S:
                self._states = read_states(shared_client())
                self._read_at = time.monotonic()
            return self._states


def count(queue: str, reason: str) -> None:
    """Count one routing decision (in-process and in Redis, for metrics and status)."""
    decisions[f"{queue}:{reason}"] += 1
    with contextlib.suppress(redis.RedisError):
        shared_client().hincrby(stats_key("router"), f"{queue}:{reason}", 1)


router = Router()


def task_model(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The model a routed task names (``None``: each worker's default)."""
    position = {"embedq.embed_texts": 1, "embedq.ingest_documents": 3}[name]
    model = (kwargs or {}).get("model")
    if model is None and len(args or ()) > position:
        model = args[position]
    return model if isinstance(model, str) else None


def listed_models(beat: dict[str, Any]) -> list[dict[str, Any]]:
    """The models a heartbeat lists (a worker too old to list them serves its ``model``)."""
    if models := beat.get("models"):
        return list(models)
    return [{"name": beat.get("model"), "model_id": beat.get("model_id")}]


def serving_queues(beats: dict[str, list[dict[str, Any]]], model: str) -> set[str]:
    """The queues with a live worker that serves ``model``."""
    return {
        queue
        for queue, workers in beats.items()
        if any(serves(listed_models(beat), model) for beat in workers)
    }


class ModelFilter:
    """Which queues serve a model, from heartbeats read at most once a second."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._beats: dict[str, list[dict[str, Any]]] = {}
        self._read_at = -CACHE_S

    def queues(self, model: str) -> set[str] | None:
        """Queues whose live workers serve ``model``; ``None`` when no worker is alive (the
        task then waits in its queue as any other) or heartbeats cannot be read."""
        try:
            with self._lock:
                if time.monotonic() - self._read_at >= CACHE_S:
                    self._beats = read_heartbeats(shared_client())
                    self._read_at = time.monotonic()
                beats = self._beats
        except redis.RedisError:
            return None
        if not any(beats.values()):
            return None
        if not (found := serving_queues(beats, model)):
            workers = [beat for queue in beats.values() for beat in queue]
            live = sorted({str(m.get("name")) for b in workers for m in listed_models(b)})
            raise UnknownModelError(
                f"model {model!r} is not served by any live worker; they serve: {', '.join(live)}"
            )
        return found


model_filter = ModelFilter()


def route_task(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any], **_: Any
) -> dict[str, str] | None:
    """Celery router. An explicit ``queue=`` wins (counted as such)."""
    if name not in ROUTED_TASKS:
        return None
    if explicit := options.get("queue"):
        count(getattr(explicit, "name", str(explicit)), "explicit")
        return None
    model = task_model(name, args, kwargs)
    # A model's tasks go only to queues with a worker that serves it.
    allowed = model_filter.queues(model) if model is not None else None
    if allowed is not None and len(allowed) == 1:
        queue = next(iter(allowed))
        count(queue, "model")
        return {"queue": queue}
    return {"queue": router.choose(len(task_items(args, kwargs) or ()))}
