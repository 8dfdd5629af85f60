"""Worker lifecycle: load the model once per worker process, after it starts."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery.signals import (
    task_postrun,
    task_prerun,
    task_revoked,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)

from embedq.broker.client import check_eviction_policy, connect, shared_client
from embedq.broker.traffic import Ticket, ticket_of
from embedq.errors import INPUT_ERRORS, DeadlineExceededError
from embedq.inputs import task_items
from embedq.ops import backlog, metrics, slo
from embedq.ops.heartbeat import Heartbeat, split_queues
from embedq.settings import get_settings
from embedq.worker.counting import worker_tally
from embedq.worker.leases import TaskLeases, lease_interval_s
from embedq.worker.runtime import (
    Runtime,
    close_runtime,
    current_runtime,
    get_runtime,
)
from embedq.worker.stop import stop_unstarted

log = logging.getLogger(__name__)


def _is_prefork(consumer: Any) -> bool:
    pool = getattr(consumer, "pool", None)
    return type(pool).__module__.endswith("prefork")


_heartbeats: list[Heartbeat] = []
_leases: list[TaskLeases] = []


def _load_or_stop() -> bool:
    try:
        health = [encoder.health() for encoder in get_runtime().encoders]
    except Exception as exc:
        # A worker that cannot embed must not take tasks: it stops, non-zero, never "ready".
        stop_unstarted(exc)
        return False
    log.info("embedq ready: %s", health)
    return True


def _warn_on_eviction() -> None:
    if warning := check_eviction_policy(shared_client()):
        log.warning(warning)


def _start_heartbeat(consumer: Any) -> None:
    runtime = get_runtime()
    queues = [q.name for q in consumer.task_consumer.queues]
    port = metrics.serve(shared_client(), runtime.settings)
    shared, _ = split_queues(queues, consumer.hostname)
    metrics.describe_worker(consumer.hostname, shared, runtime.encoder.device)
    metrics.describe_classes(shared)
    beat = Heartbeat(
        shared_client(),
        queues,
        consumer.hostname,
        runtime.encoder,
        lambda: _live_runtime(runtime).texts_encoded(),
        extra={"metrics_port": port, "pid": os.getpid()},
        live=lambda: _live(_live_runtime(runtime)),
        work=lambda: _live_runtime(runtime).work(),
    )
    beat.start()
    _heartbeats.append(beat)


def _live_runtime(started: Runtime) -> Runtime:
    # The process's runtime as it is now (tests swap in one with more models).
    return current_runtime() or started


def _live(runtime: Runtime) -> dict[str, Any]:
    """Figures that change while the worker runs: learned budgets, the models served."""
    return {"max_batch_tokens": runtime.batcher.max_batch_tokens, "models": runtime.models()}


def _start_leases(consumer: Any) -> None:
    # The consumer (in the parent, whatever the pool) holds the unacked messages: it renews
    # them, on a client of its own so a slow cache call never delays a renewal.
    restore_s = get_settings().dead_worker_restore_s
    leases = TaskLeases(connect(), consumer, lease_interval_s(restore_s), restore_s)
    leases.start()
    _leases.append(leases)


@worker_ready.connect
def _warm_up(sender: Any = None, **_: Any) -> None:
    # With prefork the parent forks children later: CUDA must not start in the parent.
    _warn_on_eviction()
    _start_leases(sender)
    if not _is_prefork(sender) and _load_or_stop():
        _start_heartbeat(sender)


@worker_process_init.connect
def _warm_up_child(**_: Any) -> None:
    # Prefork children load the model; they beat no heartbeat (the router then sees none).
    _load_or_stop()


@worker_shutdown.connect
def _shut_down(**_: Any) -> None:
    while _heartbeats:
        _heartbeats.pop().stop()
    while _leases:
        _leases.pop().stop()
    close_runtime()
    slo.stop_counting()


COUNTED_TASKS = frozenset({"embedq.embed_texts", "embedq.ingest_documents"})
_started: dict[str, float] = {}


@task_prerun.connect
def _task_started(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if task_id:
        _started[task_id] = time.perf_counter()
    if task is not None and task.name in COUNTED_TASKS:
        _count_wait(task.request)


def _queue_and_ticket(request: Any) -> tuple[str, Ticket]:
    info = getattr(request, "delivery_info", None) or {}
    return backlog.shared_queue(str(info.get("routing_key") or "")), ticket_of(request)


def _count_wait(request: Any) -> None:
    """The task's wait from publish to start, per queue and class (metric and Redis)."""
    queue, ticket = _queue_and_ticket(request)
    wait = None if ticket.sent_at is None else max(0.0, time.time() - ticket.sent_at)
    if wait is not None:
        metrics.TASK_WAIT.labels(queue, ticket.traffic).observe(wait)
    _tally(backlog.started_counts(queue, ticket.traffic, wait))


def _count_end(request: Any, texts: int, expired: bool) -> None:
    """A task finished (or was dropped for its deadline), per queue and class."""
    queue, ticket = _queue_and_ticket(request)
    if expired:
        metrics.TASKS_EXPIRED.labels(queue, ticket.traffic).inc()
    _tally(backlog.finished_counts(queue, ticket.traffic, texts, expired))


def _tally(counts: dict[str, int]) -> None:
    try:
        worker_tally().add(counts)
    except Exception as exc:  # counting must never fail a task
        log.warning("could not count the task: %s", exc)


@task_revoked.connect
def _task_revoked(sender: Any = None, request: Any = None, expired: bool = False, **_: Any) -> None:
    # Celery drops a task whose ``expires`` passed before it ran (our deadline).
    if expired and request is not None and getattr(sender, "name", None) in COUNTED_TASKS:
        _count_end(request, 0, expired=True)


@task_postrun.connect
def _task_finished(
    task_id: str | None = None,
    task: Any = None,
    args: Any = None,
    kwargs: Any = None,
    retval: Any = None,
    state: str | None = None,
    **_: Any,
) -> None:
    start = _started.pop(task_id or "", None)
    if start is None or task is None:
        return
    seconds = time.perf_counter() - start
    metrics.TASK_SECONDS.labels(task.name).observe(seconds)
    if isinstance(retval, BaseException):
        metrics.ERRORS.labels(type(retval).__name__).inc()
    if task.name in COUNTED_TASKS:
        expired = isinstance(retval, DeadlineExceededError)
        failed = state == "FAILURE" and not _is_input(retval) and not expired
        _count_request(args, kwargs, seconds, failed)
        _count_end(task.request, len(task_items(args, kwargs) or ()), expired)


def _is_input(error: Any) -> bool:
    return isinstance(error, INPUT_ERRORS)


def _count_request(args: Any, kwargs: Any, seconds: float, failed: bool) -> None:
    items = task_items(args, kwargs) or []
    target_s = get_settings().slo_latency_ms / 1000
    try:
        # Summed in process, written to Redis a few times a second (not once per task).
        worker_tally().add_request(len(items), failed, seconds, target_s)
    except Exception as exc:  # counting must never fail a task
        log.warning("could not count the request: %s", exc)
