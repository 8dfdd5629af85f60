"""Which queue a task goes to: by expected completion time, from live worker heartbeats.

An explicit ``queue=`` always wins. Otherwise: no live gpu worker -> cpu; no live cpu
worker -> gpu; a large batch -> gpu unless its expected time is more than twice cpu's;
a small one -> whichever queue is expected to finish it first (cpu on a tie, keeping the
gpu for bulk work). Every decision is counted with its reason in Redis (a few times a
second, summed).

``EMBEDQ_ROUTER_POLICY=cheapest`` first tries the queue with the lowest cost per text
(``EMBEDQ_COST_PER_HOUR`` over measured texts/s) whose expected completion time meets
``EMBEDQ_ROUTER_DEADLINE_MS``; when none does (or no queue is fully priced), the rules above.

Within the chosen queue, workers that consume a direct queue of their own (``embedq worker
--devices``: one per GPU) get a share of its tasks weighted by their expected completion
time (measured texts/s over backlog), by smooth weighted round robin; workers without one
share the queue itself, which all of them also consume.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from embedq.broker.client import shared_client
from embedq.broker.traffic import Traffic, carried
from embedq.encode.models import serves
from embedq.errors import UnknownModelError
from embedq.inputs import task_items
from embedq.keys import stats_key
from embedq.ops.heartbeat import read_heartbeats
from embedq.ops.registry import listed_models, read_lists, worker_speed
from embedq.ops.slo import Tally
from embedq.producer.serving import require_serving
from embedq.settings import get_settings

log = logging.getLogger(__name__)

ROUTED_TASKS = frozenset({"embedq.embed_texts", "embedq.ingest_documents"})
LARGE_BATCH_TEXTS = 64
TEXTS_PER_QUEUED_TASK = 64
CACHE_S = 1.0
# Tasks waiting in one worker's direct queue, at most: beyond that the shared queue takes
# them (whoever is free first), so a worker that dies strands few tasks until it restarts.
DIRECT_MAX_DEPTH = 8

decisions: Counter[str] = Counter()


@dataclass(frozen=True)
class Lane:
    """One list a queue's tasks can be sent to: a worker's direct queue, or the shared one."""

    name: str
    texts_per_s: float
    depth: int
    #: The models its worker serves (heartbeat entries); empty for the shared queue. Not
    #: part of a lane's identity (equality, hash): it only filters.
    models: tuple[dict[str, Any], ...] = field(default=(), compare=False)

    def serves(self, model: str | None) -> bool:
        """Whether a task naming ``model`` may go here (the shared queue: any)."""
        return model is None or not self.models or serves(self.models, model)


@dataclass(frozen=True)
class QueueState:
    """What the router knows of one queue."""

    workers: int
    texts_per_s: float
    depth: int
    #: Summed EMBEDQ_COST_PER_HOUR of its workers; None unless every one has a price.
    cost_per_hour: float | None = None
    #: Direct queues of its workers (and the shared queue, when some workers have none).
    lanes: tuple[Lane, ...] = ()
    #: How many of ``depth`` are bulk tasks (an interactive task is served before them).
    bulk_depth: int = 0

    def eta_s(self, n_texts: int, traffic: Traffic = Traffic.BULK) -> float:
        """Expected seconds until ``n_texts`` more texts of ``traffic`` would be done (an
        interactive task waits only for the interactive tasks ahead of it)."""
        ahead = self.depth - (self.bulk_depth if traffic is Traffic.INTERACTIVE else 0)
        return (ahead * TEXTS_PER_QUEUED_TASK + n_texts) / max(self.texts_per_s, 1e-6)

    @property
    def cost_per_text(self) -> float | None:
        """Price of one text at the queue's speed; None without a price."""
        if self.cost_per_hour is None:
            return None
        return self.cost_per_hour / (max(self.texts_per_s, 1e-6) * 3600)


def decide(
    n_texts: int, states: dict[str, QueueState], traffic: Traffic = Traffic.BULK
) -> tuple[str, str]:
    """(queue, reason) for ``n_texts`` texts of ``traffic``, given the live queues."""
    gpu, cpu = states.get("gpu"), states.get("cpu")
    if gpu is None or gpu.workers == 0:
        return "cpu", "no_gpu_worker"
    if cpu is None or cpu.workers == 0:
        return "gpu", "no_cpu_worker"
    gpu_eta, cpu_eta = gpu.eta_s(n_texts, traffic), cpu.eta_s(n_texts, traffic)
    if n_texts >= LARGE_BATCH_TEXTS:
        return ("gpu", "large_batch") if gpu_eta <= 2 * cpu_eta else ("cpu", "gpu_backlog")
    return ("gpu", "gpu_sooner") if gpu_eta < cpu_eta else ("cpu", "cpu_sooner")


def decide_cheapest(
    n_texts: int,
    states: dict[str, QueueState],
    deadline_s: float,
    traffic: Traffic = Traffic.BULK,
) -> tuple[str, str] | None:
    """The cheapest priced queue expected to finish ``n_texts`` within ``deadline_s``."""
    priced = sorted(
        (s.cost_per_text, queue)
        for queue, s in states.items()
        if s.workers and s.cost_per_text is not None
    )
    for _, queue in priced:
        if states[queue].eta_s(n_texts, traffic) <= deadline_s:
            return queue, "cheapest"
    return None


def decide_policy(
    policy: str,
    n_texts: int,
    states: dict[str, QueueState],
    deadline_s: float,
    traffic: Traffic = Traffic.BULK,
) -> tuple[str, str]:
    """(queue, reason) under ``policy``: cheapest when it finds a queue, else fastest."""
    if policy == "cheapest" and (found := decide_cheapest(n_texts, states, deadline_s, traffic)):
        return found
    return decide(n_texts, states, traffic)


def lane_weights(queue: str, lanes: Iterable[Lane], n_texts: int) -> dict[str, float]:
    """Each lane's weight: the inverse of its expected completion time for ``n_texts``
    (so, with no backlog, its texts/s); direct queues already full are left out."""
    return {
        lane.name: lane.texts_per_s / (lane.depth * TEXTS_PER_QUEUED_TASK + max(n_texts, 1))
        for lane in lanes
        if lane.name == queue or lane.depth < DIRECT_MAX_DEPTH
    }


def smooth_pick(weights: dict[str, float], current: dict[str, float]) -> str:
    """Smooth weighted round robin (nginx's): each pick adds every weight to its lane's
    running score, takes the highest and lowers it by the total. Over any run of picks each
    lane's share follows its weight, interleaved; ``current`` carries the scores."""
    for name in [n for n in current if n not in weights]:
        del current[name]
    for name, weight in weights.items():
        current[name] = current.get(name, 0.0) + weight
    best = max(current, key=lambda name: current[name])
    current[best] -= sum(weights.values())
    return best


def _price(beats: list[dict[str, Any]]) -> float | None:
    costs = [b.get("cost_per_hour") for b in beats]
    return None if any(c is None for c in costs) else float(sum(costs))  # type: ignore[arg-type]


def _queue_state(client: redis.Redis, queue: str, beats: list[dict[str, Any]]) -> QueueState:
    """One queue's state: its workers' speed and price, and the depth of each of its lists."""
    direct = [b for b in beats if b.get("direct_queue")]
    found = read_lists(client, [queue, *(b["direct_queue"] for b in direct)])
    depths = {name: sum(counts.values()) for name, counts in found.items()}
    lanes = [
        Lane(b["direct_queue"], worker_speed(b), depths[b["direct_queue"]], tuple(listed_models(b)))
        for b in direct
    ]
    if lanes and (plain := sum(worker_speed(b) for b in beats if not b.get("direct_queue"))):
        lanes.append(Lane(queue, plain, depths[queue]))
    speed = sum(worker_speed(b) for b in beats)
    bulk = sum(counts[Traffic.BULK] for counts in found.values())
    return QueueState(
        len(beats), speed, sum(depths.values()), _price(beats), tuple(lanes), bulk_depth=bulk
    )


def read_states(
    client: redis.Redis, heartbeats: dict[str, list[dict[str, Any]]] | None = None
) -> dict[str, QueueState]:
    """Live workers per queue (from ``heartbeats``, read here if not given), their summed
    speed and price, queue depth (its direct queues included) and its lanes."""
    found = read_heartbeats(client) if heartbeats is None else heartbeats
    return {q: _queue_state(client, q, beats) for q, beats in found.items()}


class Router:
    """Reads the queues at most once a second per process; counts each decision."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, QueueState] = {}
        self._beats: dict[str, list[dict[str, Any]]] = {}
        self._read_at = -CACHE_S
        # Smooth round-robin scores per queue (one entry per lane of that queue).
        self._scores: dict[str, dict[str, float]] = {}

    def choose(
        self, n_texts: int, model: str | None = None, traffic: Traffic = Traffic.BULK
    ) -> str:
        """The queue (or a worker's direct queue) for a request of ``n_texts`` texts."""
        settings = get_settings()
        try:
            states = self._current()
            deadline_s = settings.router_deadline_ms / 1000
            queue, reason = decide_policy(
                settings.router_policy, n_texts, states, deadline_s, traffic
            )
        except redis.RedisError as exc:
            log.warning("router could not read heartbeats: %s", exc)
            queue, reason, states = settings.default_queue, "router_error", {}
        count(queue, reason)
        return self._spread(queue, states.get(queue), n_texts, model)

    def lane(self, queue: str, n_texts: int, model: str | None = None) -> str:
        """The lane of an explicitly chosen ``queue`` (itself when unknown or unreadable)."""
        try:
            return self._spread(queue, self._current().get(queue), n_texts, model)
        except redis.RedisError:
            return queue

    def _spread(
        self, queue: str, state: QueueState | None, n_texts: int, model: str | None = None
    ) -> str:
        """The lane of ``queue`` this task goes to (the queue itself when it has none); only
        lanes whose worker serves the task's ``model``."""
        lanes = [lane for lane in state.lanes if lane.serves(model)] if state else []
        weights = lane_weights(queue, lanes, n_texts)
        if not weights:
            return queue
        with self._lock:
            return smooth_pick(weights, self._scores.setdefault(queue, {}))

    def _current(self) -> dict[str, QueueState]:
        return self._refresh()[0]

    def heartbeats(self, fresh: bool = False) -> dict[str, list[dict[str, Any]]]:
        """Live workers per queue, as last read (at most once a second, shared with the
        queue states: one registry read serves routing, the model filter and the API);
        ``fresh``: read now."""
        return self._refresh(fresh)[1]

    def _refresh(
        self, fresh: bool = False
    ) -> tuple[dict[str, QueueState], dict[str, list[dict[str, Any]]]]:
        with self._lock:
            if fresh or time.monotonic() - self._read_at >= CACHE_S:
                client = shared_client()
                self._beats = read_heartbeats(client)
                self._states = read_states(client, self._beats)
                self._read_at = time.monotonic()
            return self._states, self._beats


# Decisions reach Redis's one router hash (bounded by queues x reasons) in one pipeline a
# few times a second, not one HINCRBY per request.
_tally = Tally(key_of=lambda _: stats_key("router"), bucket_of=lambda _: 0).counting(
    shared_client, lambda: 0, "embedq-router-counts"
)


def count(queue: str, reason: str) -> None:
    """Count one routing decision (in-process and, within ``FLUSH_INTERVAL_S``, in Redis,
    for metrics and status)."""
    decisions[f"{queue}:{reason}"] += 1
    _tally.add({f"{queue}:{reason}": 1})


router = Router()


def task_model(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The model a routed task names (``None``: each worker's default)."""
    position = {"embedq.embed_texts": 1, "embedq.ingest_documents": 3}[name]
    model = (kwargs or {}).get("model")
    if model is None and len(args or ()) > position:
        model = args[position]
    return model if isinstance(model, str) else None


def serving_queues(beats: dict[str, list[dict[str, Any]]], model: str) -> set[str]:
    """The queues with a live worker that serves ``model``."""
    return {
        queue
        for queue, workers in beats.items()
        if any(serves(listed_models(beat), model) for beat in workers)
    }


class ModelFilter:
    """Which queues serve a model, from the router's heartbeats (read at most once a second)."""

    def __init__(self, source: Router) -> None:
        self.source = source

    def queues(self, model: str) -> set[str] | None:
        """Queues whose live workers serve ``model``; ``None`` when no worker is alive (the
        task then waits in its queue as any other) or heartbeats cannot be read."""
        try:
            beats = self.source.heartbeats()
        except redis.RedisError:
            return None
        if not any(beats.values()):
            return None
        if not (found := serving_queues(beats, model)):
            workers = [beat for queue in beats.values() for beat in queue]
            live = sorted({str(m.get("name")) for b in workers for m in listed_models(b)})
            raise UnknownModelError(
                f"model {model!r} is not served by any live worker; they serve: {', '.join(live)}"
            )
        return found


model_filter = ModelFilter(router)


def route_task(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any], **_: Any
) -> dict[str, str] | None:
    """Celery router. An explicit ``queue=`` wins (counted as such)."""
    if name not in ROUTED_TASKS:
        return None
    n_texts = len(task_items(args, kwargs) or ())
    if explicit := options.get("queue"):
        queue = getattr(explicit, "name", str(explicit))
        # A queue no live worker serves (while others live) is refused, never left waiting.
        require_serving(router, queue, task_model(name, args, kwargs))
        count(queue, "explicit")
        # The caller picked the queue; which of its workers' own queues is still weighed.
        lane = router.lane(queue, n_texts, task_model(name, args, kwargs))
        if lane == queue:
            return None
        # Celery merges the caller's options over the route: the lane must replace them.
        options.pop("queue", None)
        return {"queue": lane}
    model = task_model(name, args, kwargs)
    # A model's tasks go only to queues with a worker that serves it.
    allowed = model_filter.queues(model) if model is not None else None
    if allowed is not None and len(allowed) == 1:
        queue = next(iter(allowed))
        count(queue, "model")
        return {"queue": router.lane(queue, n_texts, model)}
    return {"queue": router.choose(n_texts, model, carried(options) or Traffic.BULK)}
