"""Waiting for a task's result through Redis outages and missed pub/sub messages."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeout

from embedq.broker.client import BROKER_ERRORS

# Celery's Redis result consumer can miss a result's pub/sub message across a Redis
# restart (celery#4857) and then waits forever: read the stored state this often instead.
RESULT_POLL_S = 5.0
RECONNECT_PAUSE_S = 1.0


def get_result(result: Any, timeout_s: float, deadline: float | None = None) -> Any:
    """``result.get`` that rides out Redis outages and missed pub/sub messages.

    Raises Celery's ``TimeoutError`` after ``timeout_s`` (or at ``deadline``, a
    ``time.monotonic()`` value), and the task's own error if it failed."""
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
