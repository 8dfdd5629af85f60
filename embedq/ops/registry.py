"""The heartbeat registry's readers: who is alive on which queue, and who stopped.

Heartbeats expired for more than ``PRUNE_AFTER_S`` (1 h, :mod:`embedq.ops.heartbeat`) are
removed by the next live beat.

Kept apart from :mod:`embedq.ops.heartbeat` (the writer) so that metrics can read the
registry without importing the broker client (which imports metrics).
"""

from __future__ import annotations

import json
from typing import Any

import redis

from embedq.broker.traffic import CLASSES, redis_list
from embedq.keys import HEARTBEAT_EXPIRY_KEY, HEARTBEATS_KEY, heartbeat_owner
from embedq.settings import QUEUES

# Until a worker has measured itself: rough texts/s by device (all-MiniLM-L6-v2 class models).
PRIOR_TEXTS_PER_S = {"cuda": 3000.0, "mps": 500.0, "cpu": 100.0}
# The device a queue's workers usually have, for a queue without live workers.
QUEUE_DEVICE = {"cpu": "cpu", "gpu": "cuda"}

NOW_LUA = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n"

# KEYS: payloads, expiry. ARGV[1]: "alive" or "expired". Returns member, payload pairs.
READ_LUA = (
    NOW_LUA
    + """
local members
if ARGV[1] == 'alive' then
  members = redis.call('ZRANGEBYSCORE', KEYS[2], now, '+inf')
else
  members = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. now)
end
local out = {}
for _, member in ipairs(members) do
  out[#out + 1] = member
  out[#out + 1] = redis.call('HGET', KEYS[1], member)
end
return out
"""
)


def _read(client: redis.Redis, which: str) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    script = client.register_script(READ_LUA)
    flat = script(keys=[HEARTBEATS_KEY, HEARTBEAT_EXPIRY_KEY], args=[which])
    for member, raw in zip(flat[::2], flat[1::2], strict=True):
        if raw:
            queue, _ = heartbeat_owner(member.decode() if isinstance(member, bytes) else member)
            found.setdefault(queue, []).append(json.loads(raw))
    for beats in found.values():
        beats.sort(key=lambda beat: str(beat.get("hostname")))
    return found


def read_heartbeats(client: redis.Redis) -> dict[str, list[dict[str, Any]]]:
    """Live workers' heartbeats, by queue (the router, status and the API read them)."""
    return _read(client, "alive")


def read_expired_heartbeats(client: redis.Redis) -> dict[str, list[dict[str, Any]]]:
    """Heartbeats that stopped within the last ``PRUNE_AFTER_S`` (workers presumed dead)."""
    return _read(client, "expired")


def live_hostnames(client: redis.Redis) -> set[str]:
    """Hostnames of the workers whose heartbeat is current, on any queue."""
    return {beat["hostname"] for beats in read_heartbeats(client).values() for beat in beats}


def read_lists(client: redis.Redis, queues: list[str]) -> dict[str, dict[str, int]]:
    """Tasks waiting in each of ``queues``, per traffic class (its Redis lists, one
    pipeline for all)."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for traffic in CLASSES:
            pipe.llen(redis_list(queue, traffic))
    counts = iter(int(n) for n in pipe.execute())
    return {queue: {str(t): next(counts) for t in CLASSES} for queue in queues}


def read_depths(
    client: redis.Redis, workers: dict[str, list[dict[str, Any]]]
) -> dict[str, dict[str, int]]:
    """Tasks waiting per queue and traffic class, its workers' own queues included (one
    pipeline); each worker with an own queue gets its backlog as ``own_queue_depth``."""
    own = [b for beats in workers.values() for b in beats if b.get("direct_queue")]
    found = read_lists(client, [*QUEUES, *(b["direct_queue"] for b in own)])
    depths = {queue: dict(found[queue]) for queue in QUEUES}
    for beat in own:
        beat["own_queue_depth"] = sum(found[beat["direct_queue"]].values())
    for queue, beats in workers.items():
        total = depths.setdefault(queue, dict.fromkeys(map(str, CLASSES), 0))
        for beat in beats:
            for traffic, count in found.get(beat.get("direct_queue") or "", {}).items():
                total[traffic] += count
    return depths


def listed_models(beat: dict[str, Any]) -> list[dict[str, Any]]:
    """The models a heartbeat lists (a worker too old to list them serves its ``model``)."""
    if models := beat.get("models"):
        return list(models)
    return [{"name": beat.get("model"), "model_id": beat.get("model_id")}]


def worker_speed(beat: dict[str, Any]) -> float:
    """A worker's measured texts/s, or its device's prior until it has measured itself."""
    return beat.get("texts_per_s") or PRIOR_TEXTS_PER_S.get(beat.get("device", "cpu"), 100.0)


def queue_speed(queue: str, beats: list[dict[str, Any]]) -> float:
    """Texts/s of a queue's live workers; with none, one worker's prior for that queue."""
    prior = PRIOR_TEXTS_PER_S[QUEUE_DEVICE.get(queue, "cpu")]
    return sum(worker_speed(b) for b in beats) or prior
