"""One index build per collection at a time, across all hosts: a Redis lock whose TTL a
background thread renews while the build runs, so a build that outlives the task's visibility
timeout still holds it, and a builder that dies frees it within one TTL."""

from __future__ import annotations

import logging
import threading
from types import TracebackType

import redis
from redis.exceptions import LockError

from embedq.errors import IndexBuildBusyError
from embedq.keys import index_build_lock_key

log = logging.getLogger(__name__)

# A dead builder's lock expires after this; a live one renews it every third of it.
LOCK_TTL_S = 60.0


class BuildLock:
    """``with BuildLock(client, collection):`` holds the collection's build lock or raises
    :class:`IndexBuildBusyError` at once (another build is running)."""

    def __init__(self, client: redis.Redis, collection: str, ttl_s: float = LOCK_TTL_S) -> None:
        self.collection = collection
        self.ttl_s = ttl_s
        #: The Redis the lock lives in (the build reads the collection's query sample there).
        self.client = client
        # thread_local=False: the renewal thread must see the token the builder acquired.
        self._lock = client.lock(
            index_build_lock_key(collection), timeout=ttl_s, thread_local=False
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def __enter__(self) -> BuildLock:
        if not self._lock.acquire(blocking=False):
            raise IndexBuildBusyError(f"another build of {self.collection!r} is running")
        self._thread = threading.Thread(
            target=self._renew, name=f"index-lock-{self.collection}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._lock.release()
        except (LockError, redis.RedisError) as error:
            # Expired or unreachable: the TTL frees it anyway.
            log.warning("index lock of %s not released: %s", self.collection, error)

    def check(self) -> None:
        """Raise :class:`IndexBuildBusyError` if the lock expired and may be another's now."""
        if self.lost:
            raise IndexBuildBusyError(f"the build lock of {self.collection!r} was lost")

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self._lock.reacquire()
            except LockError:
                self.lost = True
                log.error("index lock of %s expired during the build", self.collection)
                return
            except redis.RedisError as error:
                # A blip: the next try (a third of the TTL later) may still be in time.
                log.warning("index lock of %s not renewed: %s", self.collection, error)
