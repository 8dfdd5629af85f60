"""``embed_texts``: parse, hand off to the worker's batcher, return vectors."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from celery import Task

from embedq.app import app
from embedq.broker.client import incr_with_ttl, shared_client
from embedq.broker.results import FIRST_RUN
from embedq.broker.traffic import OPTIONS as TRAFFIC_OPTIONS
from embedq.broker.traffic import Traffic, carried, choose, stamp, ticket_of
from embedq.codec import Embeddings
from embedq.errors import (
    INPUT_ERRORS,
    DeadlineExceededError,
    EncoderError,
    InvalidInputError,
    PoisonTaskError,
    StoreError,
)
from embedq.inputs import parse_embed_request, task_items
from embedq.keys import delivery_key
from embedq.ops.probe import publishes
from embedq.settings import QUEUES, get_settings
from embedq.worker.leases import count_redelivery
from embedq.worker.runtime import get_runtime

log = logging.getLogger(__name__)

# Failures of the encoder or the store may pass (OOM, a locked database): retried, bounded.
RETRIED_ERRORS = (EncoderError, StoreError)


def redact(
    args: Any, kwargs: dict[str, Any] | None, traffic: Traffic | None = None
) -> tuple[str, str]:
    """Task args as shown in logs, events and Flower: counts and the traffic class, never
    document text."""
    items = task_items(args, kwargs)
    count = "?" if items is None else len(items)
    named = [a for a in (args or ()) if isinstance(a, str)]
    shown = {k: v for k, v in (kwargs or {}).items() if k in ("model", "normalize", "collection")}
    if traffic is not None:
        shown["traffic"] = traffic.value
    return f"({', '.join(map(repr, [*named, f'<{count} items>']))})", repr(shown)


def count_delivery(task_id: str, retries: int, ttl_s: int) -> int:
    """How many times this attempt of this task has now been handed to a worker."""
    return incr_with_ttl(shared_client(), delivery_key(task_id, retries), ttl_s)


class EmbedTask(Task):
    """Validates before sending, keeps document text out of reprs, stops poison tasks."""

    # Results are vectors: logs and Flower get a short preview, not thousands of floats.
    resultrepr_maxsize = 120
    #: The traffic class of its tasks when the caller names none (None: by size).
    traffic: Traffic | None = None
    #: Parses the task's arguments on the caller's side; bad input never reaches the queue.
    validate: Callable[..., Any] | None = None
    #: The answer to a call with no items, sent without a task (None: send it anyway).
    answer_empty: Callable[[dict[str, Any], dict[str, Any]], Any] | None = None

    def signature_from_request(
        self,
        request: Any = None,
        args: Any = None,
        kwargs: Any = None,
        queue: Any = None,
        **extra: Any,
    ) -> Any:
        """A retry goes to the shared queue, never back to one worker's own queue: that
        worker may be the one whose device failed (see :func:`embedq.keys.direct_queue`)."""
        if queue is None:
            info = (request if request is not None else self.request).delivery_info or {}
            key = str(info.get("routing_key") or "")
            if (shared := key.split(".", 1)[0]) != key and shared in QUEUES:
                queue = shared
        return super().signature_from_request(request, args, kwargs, queue, **extra)

    @publishes
    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Validate, then publish with its traffic class (``traffic="interactive"|"bulk"``,
        ``job=``, ``deadline_s=``: see :mod:`embedq.broker.traffic`) and redacted argument
        reprs (see :func:`redact`); an empty call is answered here when
        :attr:`answer_empty` can; a broker that does not answer is a
        ``BrokerUnavailableError`` (see :func:`publishes`)."""
        self._check(args, kwargs)
        mine = {name: options.pop(name) for name in TRAFFIC_OPTIONS if name in options}
        items = task_items(args, kwargs) or ()
        if self.answer_empty is not None and not items:
            answer = self.answer_empty(self._bind(args, kwargs), options)
            if answer is not None:
                return answer
        traffic = choose(mine.get("traffic") or carried(options), self.traffic, len(items))
        stores = bool(self._bind(args, kwargs).get("collection"))
        stamp(options, traffic, mine.get("job"), mine.get("deadline_s"), stores)
        argsrepr, kwargsrepr = redact(args, kwargs, traffic)
        options.setdefault("argsrepr", argsrepr)
        options.setdefault("kwargsrepr", kwargsrepr)
        return super().apply_async(args, kwargs, **options)

    def _check(self, args: Any, kwargs: Any) -> None:
        if self.validate is None:
            return
        bound = self._bind(args, kwargs)
        wanted = inspect.signature(self.validate).parameters
        self.validate(**{k: v for k, v in bound.items() if k in wanted})

    def _bind(self, args: Any, kwargs: Any) -> dict[str, Any]:
        """The call's arguments by name; a wrong call is the caller's error, by name."""
        try:
            return inspect.signature(self.run).bind(*(args or ()), **(kwargs or {})).arguments
        except TypeError as exc:
            raise InvalidInputError(f"{self.name}: {exc}") from exc

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task unless workers already died running this very attempt too often."""
        self._bind(args, kwargs)
        request = self.request
        if request.id and not request.is_eager:
            settings = get_settings()
            count = count_delivery(request.id, request.retries, _delivery_ttl_s(settings))
            # No other run of this attempt can have stored a result: storing skips the read.
            setattr(request, FIRST_RUN, count == 1)
            if count > 1:
                # Its first worker died, or lost Redis past its lease (a rare double run,
                # harmless: store writes are idempotent upserts).
                count_redelivery(shared_client())
            if count > settings.task_max_deliveries:
                raise PoisonTaskError(
                    f"task {request.id} was delivered {count} times and its worker died each "
                    "time before finishing; not running it again"
                )
        return super().__call__(*args, **kwargs)


def _delivery_ttl_s(settings: Any) -> int:
    # Outlives every redelivery: each comes at most one hard limit plus one lease timeout
    # after the previous one (doubled for margin).
    per_delivery = settings.task_time_limit_s + settings.dead_worker_restore_s
    return per_delivery * 2 * (settings.task_max_deliveries + 2)


def retry_options() -> dict[str, Any]:
    """Options of the tasks that do work: bounded retries with exponential backoff and jitter;
    expected errors (``throws``) are reported to the caller without a traceback."""
    settings = get_settings()
    return {
        "base": EmbedTask,
        "throws": (*INPUT_ERRORS, PoisonTaskError, DeadlineExceededError),
        "autoretry_for": RETRIED_ERRORS,
        "max_retries": settings.task_max_retries,
        "retry_backoff": settings.task_retry_backoff_s,
        "retry_backoff_max": settings.task_retry_backoff_max_s,
        "retry_jitter": True,
    }


@app.task(name="embedq.embed_texts", **retry_options())
def embed_texts(
    texts: list[str],
    model: str | None = None,
    normalize: bool = True,
    collection: str | None = None,
    ids: list[str] | None = None,
    metadata: list[dict[str, Any]] | None = None,
) -> Embeddings:
    """Embed ``texts``; returns one float32 vector per text, in input order.

    With ``collection``, the items (``ids`` default to content hashes, optional
    ``metadata``) are also upserted into the durable store.
    """
    request = parse_embed_request(texts, model, normalize, collection, ids, metadata)
    return get_runtime().embed(request, ticket_of(embed_texts.request))


embed_texts.validate = parse_embed_request


def _empty_answer(arguments: dict[str, Any], options: dict[str, Any]) -> Any:
    """Shape (0, dim) from live workers' heartbeats: an empty call costs no task."""
    from embedq.producer.router import router
    from embedq.producer.serving import empty_result

    queue = options.get("queue")
    queue = getattr(queue, "name", queue)
    return empty_result(router, queue, arguments.get("model"))


embed_texts.answer_empty = _empty_answer
