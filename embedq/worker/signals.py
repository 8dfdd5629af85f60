"""Worker lifecycle: load the model once per worker process, after it starts."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from celery.signals import worker_process_init, worker_ready, worker_shutdown

from embedq.broker import shared_client
from embedq.worker.heartbeat import Heartbeat
from embedq.worker.runtime import close_runtime, get_runtime

log = logging.getLogger(__name__)


def _is_prefork(consumer: Any) -> bool:
    pool = getattr(consumer, "pool", None)
    return type(pool).__module__.endswith("prefork")


_heartbeats: list[Heartbeat] = []


def _load_or_stop() -> bool:
    try:
        health = get_runtime().encoder.health()
    except Exception:
        # A worker that cannot embed must not take tasks: shut it down warmly.
        log.critical("model failed to load; stopping this worker", exc_info=True)
        os.kill(os.getpid(), signal.SIGTERM)
        return False
    log.info("embedq ready: %s", health)
    return True


def _start_heartbeat(consumer: Any) -> None:
    runtime = get_runtime()
    queues = [q.name for q in consumer.task_consumer.queues]
    beat = Heartbeat(
        shared_client(),
        queues,
        consumer.hostname,
        runtime.encoder.device,
        lambda: runtime.batcher.stats.texts_encoded,
    )
    beat.start()
    _heartbeats.append(beat)


@worker_ready.connect
def _warm_up(sender: Any = None, **_: Any) -> None:
    # With prefork the parent forks children later: CUDA must not start in the parent.
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
    close_runtime()
