"""Task results: waiting for them through Redis outages and missed pub/sub messages,
forgetting them once read, and storing them through a full Redis."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import redis
import redis.asyncio as aioredis
from celery import states
from celery.app.backends import BACKEND_ALIASES
from celery.backends.base import MESSAGE_BUFFER_MAX
from celery.backends.redis import RedisBackend as CeleryRedisBackend
from celery.backends.redis import ResultConsumer as CeleryResultConsumer
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import task_join_will_block

from embedq.broker.client import BROKER_ERRORS, client_url, describe, wait_while_full
from embedq.flusher import Flusher

log = logging.getLogger(__name__)

# Celery's Redis result consumer can miss a result's pub/sub message across a Redis
# restart (celery#4857) and then waits forever: read the stored state this often instead.
RESULT_POLL_S = 5.0
RECONNECT_PAUSE_S = 1.0
# What a Redis outage looks like to the asyncio listener.
AIO_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)


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


# Results forgotten by this process go out in one DEL at most this often.
FORGET_INTERVAL_S = 0.05
# Forgotten results waiting for that DEL, at most: beyond, the caller deletes them itself.
FORGET_MAX_PENDING = 10_000
# Task ids this process subscribed to before sending them, kept at most this many: half of
# Celery's buffer of results that arrived before anyone waited (older ones may be evicted
# from it, so they lose the shortcut and are read as Celery does).
FRESH_MAX = MESSAGE_BUFFER_MAX // 2
#: Set on a task's request by the worker when nothing else can have stored its result yet.
FIRST_RUN = "embedq_first_run"

_storing = threading.local()
_listened = threading.local()


@contextlib.contextmanager
def waited_by_listener() -> Iterator[None]:
    """Tasks sent in this block (by this thread) are waited for by a
    :class:`ResultListener`: Celery's per-thread result consumer does not subscribe to them
    (it would never read or leave their channels: a SUBSCRIBE per task, and a subscription
    set and a pub/sub backlog that only grow)."""
    _listened.on = True
    try:
        yield
    finally:
        _listened.on = False


class ResultConsumer(CeleryResultConsumer):
    """Celery's Redis result consumer, without the read of the stored result before a wait
    when this process subscribed to the task's channel before sending it: its result cannot
    have been published unseen (a lost connection re-reads every subscribed result)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fresh: OrderedDict[str, None] = OrderedDict()
        self._fresh_lock = threading.Lock()

    def subscribed_before_send(self, task_id: str) -> None:
        """``task_id`` is subscribed to and not sent yet (bounded: the oldest are dropped,
        and only lose the shortcut)."""
        with self._fresh_lock:
            self._fresh[task_id] = None
            if len(self._fresh) > FRESH_MAX:
                self._fresh.popitem(last=False)

    def on_wait_for_pending(self, result: Any, **kwargs: Any) -> None:
        """Read the stored result first, unless it was subscribed to before it was sent
        (the first wait only: a later one reads, as Celery does)."""
        with self._fresh_lock:
            fresh = self._fresh.pop(result.id, False) is None
        if not fresh:
            super().on_wait_for_pending(result, **kwargs)


class RedisBackend(CeleryRedisBackend):
    """Celery's Redis result backend, except that storing a result waits out a full Redis
    (maxmemory reached, noeviction) instead of failing the task it belongs to, and that
    three round trips per task are saved: a caller does not read a result it subscribed to
    before sending the task, a worker does not read before storing a task's first run, and
    forgotten results are deleted in batches."""

    ResultConsumer = ResultConsumer

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Subscribe to the task's result channel before it is sent (as Celery does),
        unless a :class:`ResultListener` waits for it (see :func:`waited_by_listener`)."""
        if getattr(_listened, "on", False):
            return
        super().on_task_call(producer, task_id)
        if not task_join_will_block():
            self.result_consumer.subscribed_before_send(task_id)

    def set(self, key: Any, value: Any, expires: Any = None, **retry_policy: Any) -> Any:
        """Store ``value``; retried with backoff while Redis refuses writes for memory."""
        parent = super().set
        return wait_while_full(lambda: parent(key, value, expires, **retry_policy), "a result")

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        # Celery reads the stored state first so that a redelivered duplicate never
        # overwrites a SUCCESS; on the first run of a task attempt there is none to protect.
        _storing.first_run = task_id if getattr(request, FIRST_RUN, False) else None
        try:
            return super()._store_result(task_id, result, state, traceback, request, **kwargs)
        finally:
            _storing.first_run = None

    def _get_task_meta_for(self, task_id: str) -> Any:
        if getattr(_storing, "first_run", None) == task_id:
            return {"status": states.PENDING, "result": None}
        return super()._get_task_meta_for(task_id)

    def _forget(self, task_id: str) -> None:
        """Delete the stored result within ``FORGET_INTERVAL_S`` (see :class:`Forgotten`)."""
        FORGOTTEN.add(self.url, self.client, self.get_key_for_task(task_id))


class Forgotten:
    """Results forgotten by this process, deleted in one DEL per Redis at most every
    ``FORGET_INTERVAL_S`` by one thread. Celery keeps a backend per thread: this is shared
    by all of them, so 32 caller threads cost one DEL, not 32."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, list[str | bytes]] = {}
        self._clients: dict[str, redis.Redis] = {}
        self._flusher = Flusher(self.flush, FORGET_INTERVAL_S, "embedq-forget")

    def add(self, url: str, client: redis.Redis, key: str | bytes) -> None:
        """Delete ``key`` soon; a caller that forgets more than ``FORGET_MAX_PENDING`` at
        once deletes them itself (the bound on what waits)."""
        with self._lock:
            self._clients.setdefault(url, client)
            keys = self._keys.setdefault(url, [])
            keys.append(key)
            full = len(keys) >= FORGET_MAX_PENDING
        if full:
            self.flush()
        else:
            self._flusher.wake()

    def pending(self) -> int:
        """How many forgotten results wait for their DEL."""
        with self._lock:
            return sum(map(len, self._keys.values()))

    def flush(self) -> None:
        """Delete what waits now, one DEL per Redis."""
        with self._lock:
            taken, self._keys = self._keys, {}
        for url, keys in taken.items():
            # Forgetting is housekeeping: a failure only leaves the results to their expiry.
            with contextlib.suppress(*BROKER_ERRORS):
                self._clients[url].delete(*keys)


FORGOTTEN = Forgotten()


def register_backend() -> None:
    """Serve redis:// and rediss:// result backend URLs with :class:`RedisBackend`."""
    for scheme in ("redis", "rediss"):
        BACKEND_ALIASES[scheme] = f"{__name__}:RedisBackend"


class ResultListener:
    """Waits for many task results at once on one Redis pub/sub connection, in an asyncio
    loop: no thread and no polling per waiting request (the HTTP API uses it).

    Each wait subscribes to its result's channel (Celery's Redis backend publishes every
    stored state there), then reads the stored result once, for a result stored before the
    subscription. After a lost connection every waiting result is read again, so a message
    missed meanwhile (celery#4857) costs no wait."""

    def __init__(self, backend: Any, url: str) -> None:
        self.backend, self.url = backend, url
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[bytes, asyncio.Future[dict[str, Any]]] = {}

    def _bind(self) -> None:
        # A new loop (tests start one per client) gets its own connection and reader.
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        self._loop, self._waiting = loop, {}
        self._client = aioredis.Redis.from_url(client_url(self.url))
        self._pubsub = self._client.pubsub()
        # redis-py's PubSub opens its connection on first use: concurrent first calls
        # would each open one (and messages would come on a connection nobody reads).
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._leaving: list[bytes] = []
        self._leaver: asyncio.Task[None] | None = None

    async def wait(
        self,
        task_id: str,
        timeout_s: float,
        send: Callable[[], Awaitable[object]] | None = None,
    ) -> Any:
        """The task's result (its error raised), forgotten once read; Celery's
        ``TimeoutError`` after ``timeout_s``. With ``send``, the task is sent (by awaiting
        it) only once its channel is subscribed: its result cannot be published unseen,
        so the stored result is not read first."""
        self._bind()
        key = self.backend.get_key_for_task(task_id)
        future = self._waiting[key] = asyncio.get_running_loop().create_future()
        sent = send is None
        try:
            async with asyncio.timeout(timeout_s):
                await self._subscribe(key, check=sent)
                if send is not None:
                    await send()
                    sent = True
                meta = await future
        except TimeoutError as exc:
            raise CeleryTimeout(f"no result for task {task_id} within {timeout_s:g} s") from exc
        finally:
            self._waiting.pop(key, None)
            # A task that was never sent has no result to delete.
            await self._leave(key, forget=sent)
        return self._outcome(meta)

    async def _subscribe(self, key: bytes, check: bool = True) -> None:
        async with self._lock:
            await self._pubsub.subscribe(key)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())
        if check:
            await self._check([key])

    async def _check(self, keys: list[bytes]) -> None:
        """Read the stored results of ``keys`` (those already there resolve now)."""
        for key, value in zip(keys, await self._client.mget(keys), strict=True):
            if value is not None:
                self._resolve(key, value)

    async def _leave(self, key: bytes, forget: bool = True) -> None:
        # The result is deleted as every forgotten one is (one thread, whatever becomes
        # of this loop); requests finishing together UNSUBSCRIBE in one go.
        if forget:
            FORGOTTEN.add(self.backend.url, self.backend.client, key)
        self._leaving.append(key)
        if len(self._leaving) == 1:
            self._leaver = asyncio.get_running_loop().create_task(self._leave_all())

    async def _leave_all(self) -> None:
        await asyncio.sleep(0)  # the other requests resolved by the same message batch
        keys, self._leaving = self._leaving, []
        with contextlib.suppress(*AIO_ERRORS):
            async with self._lock:
                await self._pubsub.unsubscribe(*keys)

    async def _read(self) -> None:
        while self._waiting or self._pubsub.subscribed:
            try:
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            except AIO_ERRORS as exc:
                log.warning("result listener lost Redis (%s); reconnecting", describe(exc))
                await asyncio.sleep(RECONNECT_PAUSE_S)
                await self._recover()
                continue
            if message is not None and message.get("type") == "message":
                self._resolve(message["channel"], message["data"])

    async def _recover(self) -> None:
        with contextlib.suppress(*AIO_ERRORS):
            if keys := list(self._waiting):
                async with self._lock:
                    await self._pubsub.subscribe(*keys)
                await self._check(keys)

    def _resolve(self, key: bytes, value: bytes) -> None:
        future = self._waiting.get(key)
        if future is None or future.done():
            return
        try:
            meta = self.backend.decode_result(value)
        except Exception as exc:  # the waiting request fails, never the shared reader
            future.set_exception(exc)
            return
        # Retries are stored (and published) too: only a final state ends the wait.
        if meta.get("status") in states.READY_STATES:
            future.set_result(meta)

    def _outcome(self, meta: dict[str, Any]) -> Any:
        if meta["status"] == states.SUCCESS:
            return meta["result"]
        raise self.backend.exception_to_python(meta["result"])
