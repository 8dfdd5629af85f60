"""Which live workers serve a queue and a model, from the router's heartbeats (its one
registry read a second): a task for a queue nobody serves is refused at once, and an empty
request is answered without a task.

While no worker at all is alive (a cold start, a restart of every worker), tasks are sent
and wait in their queue as Celery's do; the HTTP API answers 503 then (``/health`` says so).
"""

from __future__ import annotations

from typing import Any, Protocol
from uuid import uuid4

import numpy as np
import redis
from celery import states
from celery.result import EagerResult

from embedq.codec import Embeddings
from embedq.encode.models import serves
from embedq.errors import NoWorkerError, UnknownModelError
from embedq.ops.registry import listed_models

Beats = dict[str, list[dict[str, Any]]]


class Source(Protocol):
    """Where live heartbeats come from: the router (:class:`embedq.producer.router.Router`),
    which reads them at most once a second, or now when ``fresh``."""

    def heartbeats(self, fresh: bool = False) -> Beats:
        """Live workers per queue."""
        ...


def workers_of(beats: Beats, queue: str | None) -> list[dict[str, Any]]:
    """Live workers that take ``queue`` (as theirs, or as their own direct queue); every
    live worker for None."""
    every = [beat for workers in beats.values() for beat in workers]
    if queue is None:
        return every
    return beats.get(queue, []) + [b for b in every if b.get("direct_queue") == queue]


def model_dim(beat: dict[str, Any], model: str | None) -> int | None:
    """The dimension of ``model`` (None: the worker's default) on this worker, if it serves
    it."""
    if model is None:
        return beat.get("dim")
    found = [m for m in listed_models(beat) if serves([m], model)]
    return found[0].get("dim") if found else None


def served_dim(beats: Beats, queue: str | None, model: str | None) -> int | None:
    """The dimension a live worker of ``queue`` gives ``model``; None if none serves it."""
    dims = (model_dim(beat, model) for beat in workers_of(beats, queue))
    return next((d for d in dims if d), None)


def require_serving(source: Source, queue: str | None, model: str | None = None) -> None:
    """Raise :class:`NoWorkerError` when workers are alive but none takes ``queue`` (None:
    any) with ``model`` (:class:`UnknownModelError` when no live worker serves that model
    at all), read again before refusing (a worker may just have started). Nothing is raised
    while no worker at all is alive or heartbeats cannot be read."""
    try:
        if _serving(source.heartbeats(), queue, model):
            return
        beats = source.heartbeats(fresh=True)
    except redis.RedisError:
        return  # the send itself will say what is wrong with Redis
    if _serving(beats, queue, model) or not any(beats.values()):
        return
    raise _refusal(beats, queue, model)


def _serving(beats: Beats, queue: str | None, model: str | None) -> bool:
    return any(model_dim(beat, model) is not None for beat in workers_of(beats, queue))


def _refusal(beats: Beats, queue: str | None, model: str | None) -> Exception:
    if model is not None and not _serving(beats, None, model):
        return UnknownModelError(f"model {model!r} is not served by any live worker")
    if model is None:
        live = ", ".join(f"{q} ({len(w)})" for q, w in sorted(beats.items()) if w)
        return NoWorkerError(f"no live worker takes queue {queue!r}; live workers take: {live}")
    elsewhere = sorted(q for q in beats if _serving(beats, q, model))
    return NoWorkerError(
        f"no live worker of queue {queue!r} serves model {model!r}; "
        f"queues serving it: {', '.join(elsewhere)}"
    )


def empty_result(source: Source, queue: str | None, model: str | None) -> EagerResult | None:
    """The answer to an empty request, shape (0, dim), with no task sent; raises as a task
    would be refused (see :func:`require_serving`); None when no live worker says its
    dimension (the task is then sent and waits for one)."""
    require_serving(source, queue, model)
    try:
        dim = served_dim(source.heartbeats(), queue, model)
    except redis.RedisError:
        return None
    if dim is None:
        return None
    vectors = Embeddings(np.zeros((0, dim), np.float32), ())
    return EagerResult(str(uuid4()), vectors, states.SUCCESS)
