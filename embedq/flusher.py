"""A daemon thread that writes what a process gathered (counts, keys to delete) to Redis in
one go, at most every ``interval_s``, instead of one round trip per task or request.

Used for the SLO counts (:mod:`embedq.ops.slo`), the router's decision counts
(:mod:`embedq.producer.router`) and forgotten results (:mod:`embedq.broker.results`).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# A flush that keeps failing (Redis down) is logged at most this often, not once a try.
WARN_EVERY_S = 60.0


class Flusher:
    """Calls ``flush`` from a daemon thread when :meth:`wake` was called, at most once every
    ``interval_s``; idle while nothing is. Started lazily, once per process (a forked child
    starts its own), and flushed a last time at interpreter exit."""

    def __init__(self, flush: Callable[[], None], interval_s: float, name: str) -> None:
        self._flush, self.interval_s, self.name = flush, interval_s, name
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._thread: threading.Thread | None = None
        self._hooked = False
        self._warned_at = -math.inf

    def wake(self) -> None:
        """Something waits to be flushed: the thread flushes it (starting it if needed)."""
        self._dirty.set()
        if self._pid != os.getpid():
            self._start()

    def _start(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
            if not self._hooked:
                atexit.register(self.flush)
                self._hooked = True
            self._pid = os.getpid()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait()
            # The first item after a quiet spell goes out at once; items arriving in the
            # next interval wait and go out together.
            self.flush()
            self._stop.wait(self.interval_s)

    def flush(self) -> None:
        """Flush now, in this thread; an error is logged (the flush function keeps what it
        could not write, if it can) and never raised."""
        self._dirty.clear()
        try:
            self._flush()
        except Exception as exc:  # flushing must never stop: the next wake retries
            if time.monotonic() - self._warned_at >= WARN_EVERY_S:
                self._warned_at = time.monotonic()
                log.warning("%s: could not flush (kept for the next try): %s", self.name, exc)
            # A Redis outage is not retried in a tight loop.
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        """Stop this process's thread after a last flush."""
        self._stop.set()
        self._dirty.set()
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join(timeout=5)
        self._pid = None
        self.flush()
