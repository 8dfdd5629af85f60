"""Worker lifecycle: load the model once per worker process, after it starts."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from celery.signals import worker_process_init, worker_ready, worker_shutdown

from embedq.worker.runtime import close_runtime, get_runtime

log = logging.getLogger(__name__)


def _is_prefork(consumer: Any) -> bool:
    pool = getattr(consumer, "pool", None)
    return type(pool).__module__.endswith("prefork")


def _load_or_stop() -> None:
    try:
        health = get_runtime().encoder.health()
    except Exception:
        # A worker that cannot embed must not take tasks: shut it down warmly.
        log.critical("model failed to load; stopping this worker", exc_info=True)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    log.info("embedq ready: %s", health)


@worker_ready.connect
def _warm_up(sender: Any = None, **_: Any) -> None:
    # With prefork the parent forks children later: CUDA must not start in the parent.
    if not _is_prefork(sender):
        _load_or_stop()


@worker_process_init.connect
def _warm_up_child(**_: Any) -> None:
    _load_or_stop()


@worker_shutdown.connect
def _shut_down(**_: Any) -> None:
    close_runtime()
