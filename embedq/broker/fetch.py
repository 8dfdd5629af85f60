"""How a worker takes tasks from Redis: interactive first, at the moment a slot frees,
into a landing list, and waking on a bell instead of blocking on one list.

Every queue a worker consumes (``cpu``, ``gpu``, a device worker's own queue) is two Redis
lists, one per traffic class (kombu's priority lists: ``cpu`` and ``cpu\\x06\\x169``, see
:mod:`embedq.broker.traffic`). Each fetch is one script call that moves the oldest message
of the first non-empty list, in this order, into that list's landing list
(:mod:`embedq.broker.landing`: a worker killed mid-fetch loses nothing):

1. interactive lists (a worker's own queue before the shared one), then bulk lists;
2. but bulk lists first while the worker holds fewer than ``EMBEDQ_BULK_MIN_TASKS`` bulk
   tasks (bulk never starves), and no bulk list at all while it holds
   ``EMBEDQ_BULK_MAX_TASKS`` (its other threads stay free for interactive tasks).

Only when that finds nothing does the worker block, on its queues' *bells*: producers push
a token onto ``embedq:bell:<queue>`` (bounded) with every message, so a blocked worker wakes
at once whatever list the message went to (Redis cannot block on several lists and move
atomically). A worker also rings its own bell when it finishes a bulk task, so a freed bulk
slot is filled at once. A message sent without a bell (an older producer, a restore) is
found within ``brpop_timeout`` (1 s).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

import redis
from kombu.transport.redis import Empty, bytes_to_str

from embedq.broker.landing import PLAIN_FOR_S, deliver_landed, landing_for
from embedq.broker.traffic import CLASS_HEADER, Traffic, class_of_priority, redis_list
from embedq.keys import BELL_TOKENS, OWN_BELL_TTL_MS, bell_key, own_bell_key

# Moves the oldest message of the first non-empty list into that list's landing list
# (ARGV[1] == "1"), or pops it plainly (a full Redis refuses RPOPLPUSH's push).
_FETCH = """
for i = 1, #KEYS, 2 do
  local item
  if ARGV[1] == '1' then
    item = redis.call('RPOPLPUSH', KEYS[i], KEYS[i + 1])
  else
    item = redis.call('RPOP', KEYS[i])
  end
  if item then return {KEYS[i], item} end
end
return false
"""

_FETCH_SHA: str | None = None


def fetch_sha() -> str:
    """The SHA1 Redis knows the fetch script by (after one ``EVAL``)."""
    global _FETCH_SHA
    if _FETCH_SHA is None:
        import hashlib

        _FETCH_SHA = hashlib.sha1(_FETCH.encode()).hexdigest()
    return _FETCH_SHA


def message_class(message: Any) -> Traffic:
    """The class of a kombu message held by a worker (header, else its priority)."""
    raw = (getattr(message, "headers", None) or {}).get(CLASS_HEADER)
    if raw in (Traffic.INTERACTIVE, Traffic.BULK):
        return Traffic(raw)
    return class_of_priority((getattr(message, "properties", None) or {}).get("priority"))


def held_bulk(qos: Any) -> int:
    """Bulk messages a channel holds unacknowledged (running, or waiting to run)."""
    dirty = getattr(qos, "_dirty", None) or set()
    delivered = list((getattr(qos, "_delivered", None) or {}).items())
    return sum(1 for tag, m in delivered if tag not in dirty and message_class(m) is Traffic.BULK)


def fetch_order(queues: Iterable[str], held: int, bulk_min: int, bulk_max: int) -> list[str]:
    """The lists to take a message from, first non-empty wins: each queue's own ones before
    shared ones (a direct queue's name holds a dot), interactive before bulk, bulk first
    while fewer than ``bulk_min`` are held and none once ``bulk_max`` are."""
    ordered = sorted(queues, key=lambda q: "." not in q)
    interactive = [redis_list(q, Traffic.INTERACTIVE) for q in ordered]
    bulk = [redis_list(q, Traffic.BULK) for q in ordered]
    if held >= bulk_max:
        return interactive
    return bulk + interactive if held < bulk_min else interactive + bulk


def ring(pipe: Any, queue: str) -> None:
    """Add a wake-up token to ``queue``'s bell (in ``pipe``), keeping at most BELL_TOKENS."""
    key = bell_key(queue)
    pipe.lpush(key, b"1")
    pipe.ltrim(key, 0, BELL_TOKENS - 1)


def ring_own(pipe: Any, key: str) -> None:
    """Wake the worker waiting on its own bell ``key`` (a bulk slot freed)."""
    pipe.lpush(key, b"1")
    pipe.ltrim(key, 0, 0)
    pipe.pexpire(key, OWN_BELL_TTL_MS)


class ClassedFetch:
    """kombu Redis ``Channel`` mixin: fetches by class (see the module docstring)."""

    #: What the request in flight is: "fetch" (the script) or "bell" (waiting for a token).
    _pending: str | None = None
    #: The next request waits on the bells: the last fetch found nothing.
    _bell_next: bool = False
    #: Until then (monotonic), pop plainly: Redis refused a landing list (full).
    _plain_until: float = 0.0
    #: The script is not in Redis's cache (restarted, flushed): send it whole once.
    _send_script: bool = False
    #: Whether the fetch in flight moves into landing lists (else it pops plainly).
    _landed: bool = False

    @property
    def own_bell(self) -> str:
        """This channel's own bell (rung when it finishes a bulk task)."""
        if "_own_bell" not in self.__dict__:
            self.__dict__["_own_bell"] = own_bell_key(uuid.uuid4().hex)
        return self.__dict__["_own_bell"]

    def landing_keys(self) -> list[str]:
        """The landing lists of this channel (one per list it has fetched from)."""
        return list(getattr(self, "_landings", {}).values())

    def _brpop_start(self, timeout: float | None = None) -> None:
        if self.global_keyprefix:  # type: ignore[attr-defined]
            super()._brpop_start(timeout)  # type: ignore[misc]
            return
        queues = self._queue_cycle.consume(len(self.active_queues))  # type: ignore[attr-defined]
        if not queues:
            return
        wait = self.brpop_timeout if timeout is None else timeout  # type: ignore[attr-defined]
        command = self._bell_command(queues, wait) if self._bell_next else self._fetch(queues)
        self._in_poll = self.client.connection  # type: ignore[attr-defined]
        self._brpop_sent_at = time.monotonic()
        self.client.connection.send_command(*command)  # type: ignore[attr-defined]

    def _bell_command(self, queues: list[str], wait: float) -> tuple[Any, ...]:
        self._pending = "bell"
        bells = [bell_key(q) for q in queues]
        return ("BRPOP", *bells, self.own_bell, wait or 0)

    def _fetch(self, queues: list[str]) -> tuple[Any, ...]:
        from embedq.settings import get_settings

        settings = get_settings()
        held = held_bulk(self.qos)  # type: ignore[attr-defined]
        order = fetch_order(queues, held, settings.bulk_min_tasks, settings.bulk_task_cap)
        land = time.monotonic() >= self._plain_until
        keys: list[str] = []
        for name in order:
            landing = landing_for(self, name) if land else None
            land = land and landing is not None
            keys += [name, landing or name]
        if not land:  # one landing list refused: pop every list plainly this time
            keys = [k for name in order for k in (name, name)]
        self._pending, self._landed = "fetch", land
        if self._send_script:
            self._send_script = False
            return ("EVAL", _FETCH, len(keys), *keys, "1" if land else "0")
        return ("EVALSHA", fetch_sha(), len(keys), *keys, "1" if land else "0")

    def _brpop_read(self, **options: Any) -> bool:
        if self._pending is None:
            return super()._brpop_read(**options)  # type: ignore[misc]
        pending, self._pending = self._pending, None
        try:
            reply = self._read_reply(pending, options)
            if pending == "bell" or not reply:
                # A token (or the wait's timeout): fetch next. Nothing fetched: wait next.
                self._bell_next = pending != "bell"
                raise Empty()
            listed, item = bytes_to_str(reply[0]), reply[1]
            queue = listed.rsplit(self.sep, 1)[0]  # type: ignore[attr-defined]
            self._queue_cycle.rotate(queue)  # type: ignore[attr-defined]
            deliver_landed(self, queue, self.landing_for_list(listed), item)
            return True
        finally:
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def landing_for_list(self, listed: str) -> str | None:
        """The landing list a message of ``listed`` was moved into (None: popped plainly)."""
        return getattr(self, "_landings", {}).get(listed) if self._landed else None

    def _read_reply(self, pending: str, options: dict[str, Any]) -> Any:
        client = self.client  # type: ignore[attr-defined]
        try:
            return client.parse_response(client.connection, "BRPOP", **options)
        except self.connection_errors:  # type: ignore[attr-defined]
            # As kombu does: the next poll reconnects. A moved message waits in its landing.
            client.connection.disconnect()
            raise
        except redis.exceptions.NoScriptError:
            self._send_script = True
            raise Empty() from None
        except redis.ResponseError:
            # A full Redis (noeviction) refuses the landing push but allows a plain pop,
            # and taking tasks is what frees it: pop plainly for a while.
            self._plain_until = time.monotonic() + PLAIN_FOR_S
            raise Empty() from None
