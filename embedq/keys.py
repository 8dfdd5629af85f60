"""Every Redis key embedq writes is built here, so the key space is documented in one place."""

from __future__ import annotations

import hashlib

PREFIX = "embedq"
VECTOR_PREFIX = f"{PREFIX}:vec"
STATS_PREFIX = f"{PREFIX}:stats"
HEARTBEAT_PREFIX = f"{PREFIX}:hb"
# The heartbeat registry: one hash of "queue:hostname" -> payload, and one sorted set of the
# same members scored by when each heartbeat expires (Redis server time, seconds).
HEARTBEATS_KEY = f"{HEARTBEAT_PREFIX}:payloads"
HEARTBEAT_EXPIRY_KEY = f"{HEARTBEAT_PREFIX}:expiry"
SLO_PREFIX = f"{STATS_PREFIX}:slo"
ALIVE_PREFIX = f"{STATS_PREFIX}:alive"
RATE_PREFIX = f"{PREFIX}:rate"
DELIVERY_PREFIX = f"{PREFIX}:delivery"


def content_hash(text: str) -> str:
    """The store's content hash of one text (sha256, hex)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def vector_key(model_id: str, normalize: bool, text: str) -> str:
    """Cache key of one vector: a hash of (model id, normalize flag, text)."""
    digest = hashlib.sha256()
    digest.update(f"{model_id}\x00{int(normalize)}\x00".encode())
    digest.update(text.encode("utf-8", "surrogatepass"))
    return f"{VECTOR_PREFIX}:{digest.hexdigest()}"


# Single flight: a worker encoding a missed text holds VECTOR_LEASE_PREFIX:<digest> (a
# short TTL) so other workers wait for its cache entry instead of encoding it too.
VECTOR_LEASE_PREFIX = f"{PREFIX}:veclease"


def vector_lease_key(cache_key: str) -> str:
    """The single-flight lease of the cache entry ``cache_key`` (see :func:`vector_key`)."""
    return f"{VECTOR_LEASE_PREFIX}:{cache_key.rsplit(':', 1)[-1]}"


def stats_key(name: str) -> str:
    """Counter or gauge kept in Redis for operators."""
    return f"{STATS_PREFIX}:{name}"


def heartbeat_member(queue: str, hostname: str) -> str:
    """A worker's field in the heartbeat registry (:data:`HEARTBEATS_KEY`)."""
    return f"{queue}:{hostname}"


def heartbeat_owner(member: str) -> tuple[str, str]:
    """(queue, hostname) of a registry member; queue names hold no colon."""
    queue, _, hostname = member.partition(":")
    return queue, hostname


def direct_queue(queue: str, hostname: str) -> str:
    """The queue (a Redis list) only worker ``hostname`` of ``queue`` consumes, besides the
    shared one: the router sends it a weighted share of that queue's tasks."""
    return f"{queue}.{hostname}"


def slo_key(minute: int) -> str:
    """Per-minute SLO counters (a hash), summed by every worker."""
    return f"{SLO_PREFIX}:{minute}"


def alive_key(minute: int) -> str:
    """Set while any worker beats in that minute."""
    return f"{ALIVE_PREFIX}:{minute}"


def rate_key(api_key_id: str, minute: int) -> str:
    """The HTTP API's request counter of one key in one minute."""
    return f"{RATE_PREFIX}:{api_key_id}:{minute}"


def delivery_key(task_id: str, retries: int) -> str:
    """Counts how often one attempt of one task was handed to a worker."""
    return f"{DELIVERY_PREFIX}:{task_id}:{retries}"


def index_build_lock_key(collection: str) -> str:
    """The lock one collection's index build holds (expires unless its builder renews it)."""
    return f"{PREFIX}:lock:index:{collection}"


# The sorted set of landing lists (score: last lease renewal); each list is LANDING_PREFIX:...
LANDING_PREFIX = f"{PREFIX}:landing"


def landing_key(queue: str, channel_id: str) -> str:
    """List where a message one worker channel fetched from ``queue`` waits until kombu has
    recorded it in ``unacked`` (see :mod:`embedq.broker.landing`)."""
    return f"{LANDING_PREFIX}:{queue}:{channel_id}"


# Bells: producers push a token with every task message, so a worker blocked on the bells
# of its queues wakes whichever of a queue's lists (classes) the message went to.
BELL_PREFIX = f"{PREFIX}:bell"
# Tokens a bell keeps, at most: that many blocked workers wake for a burst.
BELL_TOKENS = 64
# A worker's own bell outlives its worker by this much at most.
OWN_BELL_TTL_MS = 60_000


def bell_key(queue: str) -> str:
    """The bell of ``queue`` (a list of at most ``BELL_TOKENS`` tokens)."""
    return f"{BELL_PREFIX}:{queue}"


def own_bell_key(channel_id: str) -> str:
    """A worker channel's own bell, rung when it finishes a bulk task (expires)."""
    return f"{BELL_PREFIX}:own:{channel_id}"


# Each collection's recent query vectors (a capped list), which its index build tunes on.
QUERIES_PREFIX = f"{PREFIX}:queries"


def query_sample_key(collection: str) -> str:
    """The list of ``collection``'s most recent query vectors (newest first, capped, TTL)."""
    return f"{QUERIES_PREFIX}:{collection}"
