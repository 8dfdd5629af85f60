"""Task results: waiting for them through Redis outages and missed pub/sub messages,
forgetting them once read, and storing them through a full Redis."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from celery.app.backends import BACKEND_ALIASES
from celery.backends.redis import RedisBackend as CeleryRedisBackend
from celery.exceptions import TimeoutError as CeleryTimeout

from embedq.broker.client import BROKER_ERRORS, wait_while_full

log = logging.getLogger(__name__)

# Celery's Redis result consumer can miss a result's pub/sub message across a Redis
# restart (celery#4857) and then waits forever: read the stored state this often instead.
RESULT_POLL_S = 5.0
RECONNECT_PAUSE_S = 1.0


def get_result(
    result: Any,
    timeout_s: float,
    deadline: float | None = None,
    on_poll: Callable[[], None] | None = None,
) -> Any:
    """``result.get`` that rides out Redis outages and missed pub/sub messages.

    Raises Celery's ``TimeoutError`` after ``timeout_s`` (or at ``deadline``, a
    ``time.monotonic()`` value), and the task's own error if it failed. ``on_poll`` is
    called every ``RESULT_POLL_S`` without an answer (e.g. to say why it takes long)."""
    limit = time.monotonic() + timeout_s
    if deadline is not None:
        limit = min(limit, deadline)
    while True:
        try:
            return result.get(timeout=min(RESULT_POLL_S, max(0.001, limit - time.monotonic())))
        except (CeleryTimeout, *BROKER_ERRORS) as exc:
            if time.monotonic() >= limit:
                raise
            if not isinstance(exc, CeleryTimeout):
                time.sleep(RECONNECT_PAUSE_S)
        # A plain read of the stored state; a result whose message was missed is cached
        # by it, and the next ``get`` returns it at once.
        with contextlib.suppress(*BROKER_ERRORS):
            result.ready()
        if on_poll is not None:
            on_poll()


def forget(results: Any | Iterable[Any]) -> None:
    """Delete read results from Redis (best effort: one DEL each, failures ignored).

    Results otherwise stay ``EMBEDQ_RESULT_EXPIRES_S`` after they were read; a large
    request's vectors can be MiBs."""
    for result in results if isinstance(results, list | tuple) else [results]:
        try:
            result.forget()
        except Exception as exc:  # forgetting is housekeeping; it never fails a caller
            log.debug("could not forget result %s: %s", getattr(result, "id", "?"), exc)


@contextlib.contextmanager
def forgetting(results: Any | Iterable[Any]) -> Iterator[None]:
    """:func:`forget` ``results`` when the block ends, however it ends, unless Redis was
    unreachable (forgetting would only wait for it again)."""
    try:
        yield
    except BROKER_ERRORS:
        raise
    except BaseException:
        forget(results)
        raise
    forget(results)


def get_and_forget(
    result: Any,
    timeout_s: float,
    deadline: float | None = None,
    on_poll: Callable[[], None] | None = None,
) -> Any:
    """:func:`get_result`, then :func:`forget` the result (see :func:`forgetting`)."""
    with forgetting(result):
        return get_result(result, timeout_s, deadline, on_poll)


class RedisBackend(CeleryRedisBackend):
    """Celery's Redis result backend, except that storing a result waits out a full Redis
    (maxmemory reached, noeviction) instead of failing the task it belongs to."""

    def set(self, key: Any, value: Any, expires: Any = None, **retry_policy: Any) -> Any:
        """Store ``value``; retried with backoff while Redis refuses writes for memory."""
        parent = super().set
        return wait_while_full(lambda: parent(key, value, expires, **retry_policy), "a result")


def register_backend() -> None:
    """Serve redis:// and rediss:// result backend URLs with :class:`RedisBackend`."""
    for scheme in ("redis", "rediss"):
        BACKEND_ALIASES[scheme] = f"{__name__}:RedisBackend"
