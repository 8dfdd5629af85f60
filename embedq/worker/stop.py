"""Stopping a worker whose device failed, so that its supervisor starts a fresh one; and
one that cannot start, with a code that says why.

After an illegal memory access or a device-side assert the CUDA context is unusable: every
later batch would fail too. The worker then stops warmly (running tasks end with
``DeviceFailedError`` and are retried by other workers) and ``embedq worker`` exits with
``EX_SOFTWARE`` (70; a plain ``celery worker`` exits 0), so a supervisor that restarts
failed processes (systemd ``Restart=on-failure``, Docker ``restart: on-failure``,
Kubernetes) starts a new one, with a new context.

A worker whose model (or device, store, broker) fails while it starts stops before Celery
logs "ready", and exits with the code :mod:`embedq.ops.failures` gives that error (78 for a
model that cannot load, 69 for a server that does not answer, ...), never 0.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from embedq.errors import DeviceFailedError
from embedq.ops.failures import EX_SOFTWARE, classify, debug_enabled

log = logging.getLogger(__name__)

_failure: DeviceFailedError | None = None
_exit_code = 0


def device_failed() -> bool:
    """Whether this process stopped its worker for a failed device."""
    return _failure is not None


def exit_code() -> int:
    """The code ``embedq worker`` exits with: ``EX_SOFTWARE`` after a failed device, the
    failure's code after a failed start, else 0 (Celery's ``app.start`` does not return the
    worker's own code)."""
    return _exit_code


def stop_unstarted(error: BaseException, process: Any = None) -> None:
    """Stop a worker that cannot start (its model did not load): one line in the log (the
    traceback with ``EMBEDQ_DEBUG``), and a warm shutdown that exits non-zero before Celery
    logs "ready". A prefork child (not the main process) is ended by SIGTERM instead."""
    global _exit_code
    if process is None:
        from billiard.process import current_process

        process = current_process()
    failure = classify(error)
    _exit_code = _exit_code or failure.code
    log.critical("cannot start: %s", failure.message, exc_info=debug_enabled())
    if process.name != "MainProcess":
        os.kill(os.getpid(), signal.SIGTERM)
        return
    from celery.exceptions import WorkerShutdown

    # Raised from the worker_ready signal: it passes Celery's handler (a SystemExit), which
    # stops the worker with this code before its "ready" line.
    raise WorkerShutdown(failure.code)


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
    global _failure, _exit_code
    _failure = _failure or error
    _exit_code = _exit_code or EX_SOFTWARE
    log.critical("stopping this worker so it is restarted: %s", error)
    if process.name != "MainProcess":
        os.kill(os.getpid(), signal.SIGTERM)
        return
    # What a SIGTERM handler does (a warm shutdown), with a failure exit code: the
    # consumer's loop checks this flag and raises WorkerShutdown(code).
    state.should_stop = EX_SOFTWARE
