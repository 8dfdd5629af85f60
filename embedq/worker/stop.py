"""Stopping a worker whose device failed, so that its supervisor starts a fresh one.

After an illegal memory access or a device-side assert the CUDA context is unusable: every
later batch would fail too. The worker then stops warmly (running tasks end with
``DeviceFailedError`` and are retried by other workers) and ``embedq worker`` exits with
``EX_SOFTWARE`` (70; a plain ``celery worker`` exits 0), so a supervisor that restarts
failed processes (systemd ``Restart=on-failure``, Docker ``restart: on-failure``,
Kubernetes) starts a new one, with a new context.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from embedq.errors import DeviceFailedError

log = logging.getLogger(__name__)

# sysexits.h: an internal software error (Celery's own codes are 0 and 1).
EX_SOFTWARE = 70
_failure: DeviceFailedError | None = None


def device_failed() -> bool:
    """Whether this process stopped its worker for a failed device (``embedq worker`` then
    exits ``EX_SOFTWARE``: Celery's ``app.start`` does not return the worker's own code)."""
    return _failure is not None


def stop_worker(error: DeviceFailedError, state: Any = None, process: Any = None) -> None:
    """Ask this worker to stop, warmly, with exit code ``EX_SOFTWARE``.

    ``state`` and ``process`` default to Celery's worker state and billiard's current
    process (tests pass stand-ins). A prefork child (not the main process) is ended by
    SIGTERM instead: its pool forks a fresh one, which loads the model on a new context.
    """
    if state is None:
        from celery.worker import state
    if process is None:
        from billiard.process import current_process

        process = current_process()
    global _failure
    _failure = _failure or error
    log.critical("stopping this worker so it is restarted: %s", error)
    if process.name != "MainProcess":
        os.kill(os.getpid(), signal.SIGTERM)
        return
    # What a SIGTERM handler does (a warm shutdown), with a failure exit code: the
    # consumer's loop checks this flag and raises WorkerShutdown(code).
    state.should_stop = EX_SOFTWARE
