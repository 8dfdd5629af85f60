"""Traffic classes: ``interactive`` (a caller is waiting) and ``bulk`` (ingestion), on every
queue. The one place that says what a class is, how a task gets one, and what it carries.

A task's class travels in its message twice: as the message priority, which each broker
serves its own way (Redis: one list per class, the interactive one taken first, see
:mod:`embedq.broker.fetch`), and as headers the worker reads (class, job, when it was
sent). Its deadline is Celery's ``expires``: a worker drops a task whose deadline passed
before running it, and its batcher drops texts whose every caller's deadline passed before
encoding them (:mod:`embedq.worker.pool`).

How a class is chosen (:func:`choose`): the caller's explicit ``traffic=`` wins; then the
task's own default (``ingest_documents``: bulk); then size: a request of more than
``EMBEDQ_INTERACTIVE_MAX_TEXTS`` texts is bulk, any other interactive.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from embedq.errors import InvalidInputError
from embedq.settings import get_settings


class Traffic(StrEnum):
    """The two classes: interactive work is served first; bulk keeps a minimum share."""

    INTERACTIVE = "interactive"
    BULK = "bulk"


CLASSES = tuple(Traffic)
# Message headers (Celery hands them to the task as ``request.<name>``).
CLASS_HEADER = "embedq_traffic"
JOB_HEADER = "embedq_job"
SENT_HEADER = "embedq_sent_at"
# Options a caller may give ``apply_async`` besides Celery's own; taken off before sending.
OPTIONS = ("traffic", "job", "deadline_s")

# kombu's Redis transport keeps one list per priority step and takes the lowest step first.
REDIS_PRIORITY = {Traffic.INTERACTIVE: 0, Traffic.BULK: 9}
REDIS_PRIORITY_STEPS = sorted(REDIS_PRIORITY.values())
# kombu's separator between a queue's name and its priority step, in list names.
REDIS_SEP = "\x06\x16"


def redis_list(queue: str, traffic: Traffic) -> str:
    """The Redis list holding ``queue``'s tasks of ``traffic`` (as kombu names it)."""
    step = REDIS_PRIORITY[traffic]
    return f"{queue}{REDIS_SEP}{step}" if step else queue


def parse(value: str | Traffic) -> Traffic:
    """``value`` as a class; a clear error naming the classes otherwise."""
    try:
        return Traffic(str(value).strip().lower())
    except ValueError:
        choices = ", ".join(CLASSES)
        raise InvalidInputError(f"traffic must be one of {choices}, got {value!r}") from None


def choose(explicit: str | Traffic | None, default: Traffic | None, n_texts: int) -> Traffic:
    """The class of a request of ``n_texts``: explicit, else the task's default, else by size."""
    if explicit is not None:
        return parse(explicit)
    if default is not None:
        return default
    large = n_texts > get_settings().interactive_max_texts
    return Traffic.BULK if large else Traffic.INTERACTIVE


def carried(options: dict[str, Any]) -> Traffic | None:
    """The class already in send ``options``: a retry's, re-sent from its request (its
    class header, else its priority); None for a first send."""
    raw = (options.get("headers") or {}).get(CLASS_HEADER)
    if raw:
        return parse(raw)
    priority = options.get("priority")
    return class_of_priority(priority) if priority is not None else None


def new_job() -> str:
    """A job id: the unit of fair sharing within the bulk class (one per ingest run)."""
    return uuid.uuid4().hex[:16]


def stamp(
    options: dict[str, Any],
    traffic: Traffic,
    job: str | None,
    deadline_s: float | None,
    stores: bool = False,
) -> None:
    """Write a task's class into its Celery send ``options``: priority, headers, and its
    deadline as ``expires`` (seconds from now; an ``expires`` the caller gave wins; 0: none).

    Without a deadline from the caller, an interactive task gets
    ``EMBEDQ_INTERACTIVE_DEADLINE_S`` unless it ``stores`` (``collection=``): a write is
    never dropped for a deadline nobody asked for."""
    headers = options.setdefault("headers", {}) or {}
    options["headers"] = headers
    headers[CLASS_HEADER] = traffic.value
    headers[SENT_HEADER] = time.time()
    if job:
        headers[JOB_HEADER] = job
    options["priority"] = REDIS_PRIORITY[traffic]
    if deadline_s is None and traffic is Traffic.INTERACTIVE and not stores:
        deadline_s = get_settings().interactive_deadline_s
    if deadline_s and options.get("expires") is None:
        options["expires"] = float(deadline_s)


def class_of_priority(priority: int | None) -> Traffic:
    """The class a Redis message priority stands for (no priority: interactive)."""
    return Traffic.BULK if (priority or 0) >= REDIS_PRIORITY[Traffic.BULK] else Traffic.INTERACTIVE


@dataclass(frozen=True)
class Ticket:
    """What a running task's message said of its class."""

    traffic: Traffic
    job: str
    #: Epoch seconds after which nobody waits for the answer; None: no deadline.
    deadline: float | None
    #: Epoch seconds when the producer sent it; None for a message sent without a class.
    sent_at: float | None

    def remaining_s(self, now: float | None = None) -> float | None:
        """Seconds until the deadline (negative once past); None without one."""
        if self.deadline is None:
            return None
        return self.deadline - (time.time() if now is None else now)


def ticket_of(request: Any) -> Ticket:
    """The ticket of a Celery task ``request`` (headers are its attributes)."""
    raw = getattr(request, CLASS_HEADER, None)
    try:
        traffic = parse(raw) if raw else _from_delivery(request)
    except InvalidInputError:
        traffic = Traffic.INTERACTIVE
    job = getattr(request, JOB_HEADER, None) or getattr(request, "id", None) or "-"
    sent = getattr(request, SENT_HEADER, None)
    return Ticket(traffic, str(job), _epoch(getattr(request, "expires", None)), _float(sent))


def _from_delivery(request: Any) -> Traffic:
    info = getattr(request, "delivery_info", None) or {}
    return class_of_priority(info.get("priority"))


def _epoch(expires: Any) -> float | None:
    """Celery's ``expires`` header (an ISO date, or a datetime) as epoch seconds."""
    if expires is None:
        return None
    if isinstance(expires, datetime):
        return expires.timestamp()
    try:
        return datetime.fromisoformat(str(expires)).timestamp()
    except ValueError:
        return None


def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
