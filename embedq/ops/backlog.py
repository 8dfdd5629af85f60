"""Traffic classes seen from outside: per queue and class, what waits, how long tasks waited
for a worker, what expired, and the backlog in seconds (an autoscaler's signal).

Workers count each task they start (its wait from publish to start, in buckets), each task
they finish, and each one dropped for its deadline, per queue and class, into the same
per-minute Redis hashes as the SLO counters (:class:`embedq.ops.slo.Tally`: summed in
process, one pipeline a few times a second). ``embedq status``, the metrics and the API read
them back over the last ``WINDOW_S``.

Backlog seconds = the texts waiting ahead of a class's next task (interactive ones wait only
behind interactive ones) over the live workers' measured texts/s (a prior per device while
none has measured itself, so a queue without workers still shows a finite backlog).
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass
from typing import Any

import redis

from embedq.broker.traffic import CLASSES, Traffic
from embedq.keys import slo_key
from embedq.ops.registry import queue_speed
from embedq.ops.slo import minute

# Upper bounds (seconds) of the wait-time buckets counted in Redis; the last is open.
WAIT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# Status and metrics read the counts of this many seconds back (whole minutes).
WINDOW_S = 300
# Texts per waiting task, until finished tasks of that queue and class say otherwise.
DEFAULT_TEXTS_PER_TASK = 64


def shared_queue(routing_key: str) -> str:
    """The queue a task came from, a worker's own queue counted as its shared one."""
    return routing_key.split(".", 1)[0] or "?"


def started_counts(queue: str, traffic: Traffic, wait_s: float | None) -> dict[str, int]:
    """What one started task adds to the counters (its wait, when known)."""
    if wait_s is None:
        return {}
    bucket = bisect.bisect_left(WAIT_BUCKETS_S, max(0.0, wait_s))
    return {f"wait:{queue}:{traffic}:{bucket}": 1}


def finished_counts(queue: str, traffic: Traffic, texts: int, expired: bool) -> dict[str, int]:
    """What one finished (or expired) task adds to the counters."""
    if expired:
        return {f"expired:{queue}:{traffic}": 1}
    return {f"done:{queue}:{traffic}": 1, f"texts:{queue}:{traffic}": texts}


@dataclass
class ClassFigures:
    """One queue and class over the window."""

    queue: str
    traffic: str
    depth: int
    backlog_s: float
    wait_p50_s: float | None
    wait_p99_s: float | None
    started: int
    done: int
    expired: int
    texts_per_task: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def read_counts(client: redis.Redis, window_s: int = WINDOW_S) -> dict[str, int]:
    """The class counters (wait/done/texts/expired fields) summed over the window."""
    last = minute()
    pipe = client.pipeline(transaction=False)
    for m in range(last - max(1, window_s // 60) + 1, last + 1):
        pipe.hgetall(slo_key(m))
    summed: dict[str, int] = {}
    for counts in pipe.execute():
        for field, value in counts.items():
            name = field.decode() if isinstance(field, bytes) else field
            if ":" in name:
                summed[name] = summed.get(name, 0) + int(value)
    return summed


def figures(
    depths: dict[str, dict[str, int]],
    workers: dict[str, list[dict[str, Any]]],
    counts: dict[str, int],
) -> list[ClassFigures]:
    """Per queue and class: depth, backlog seconds, wait p50/p99, counts."""
    rows = []
    for queue, by_class in sorted(depths.items()):
        speed = queue_speed(queue, workers.get(queue, []))
        ahead = 0.0
        for traffic in CLASSES:
            per_task = _texts_per_task(counts, queue, traffic)
            ahead += by_class.get(traffic, 0) * per_task
            rows.append(_row(queue, traffic, by_class.get(traffic, 0), ahead / speed, counts))
            rows[-1].texts_per_task = round(per_task, 1)
    return rows


def _row(
    queue: str, traffic: Traffic, depth: int, backlog_s: float, counts: dict[str, int]
) -> ClassFigures:
    waits = [counts.get(f"wait:{queue}:{traffic}:{i}", 0) for i in range(len(WAIT_BUCKETS_S) + 1)]
    return ClassFigures(
        queue=queue,
        traffic=str(traffic),
        depth=depth,
        backlog_s=round(backlog_s, 2),
        wait_p50_s=quantile(waits, 0.5),
        wait_p99_s=quantile(waits, 0.99),
        started=sum(waits),
        done=counts.get(f"done:{queue}:{traffic}", 0),
        expired=counts.get(f"expired:{queue}:{traffic}", 0),
        texts_per_task=0.0,
    )


def quantile(buckets: list[int], q: float) -> float | None:
    """The ``q`` quantile of bucketed counts: the upper bound of the bucket it falls in
    (the open last bucket reports the last bound); None without counts."""
    total = sum(buckets)
    if not total:
        return None
    rank, seen = q * total, 0
    for i, count in enumerate(buckets):
        seen += count
        if seen >= rank:
            return WAIT_BUCKETS_S[min(i, len(WAIT_BUCKETS_S) - 1)]
    return WAIT_BUCKETS_S[-1]


def _texts_per_task(counts: dict[str, int], queue: str, traffic: Traffic) -> float:
    done = counts.get(f"done:{queue}:{traffic}", 0)
    if not done:
        return DEFAULT_TEXTS_PER_TASK
    return counts.get(f"texts:{queue}:{traffic}", 0) / done
