"""A bounded sample of each collection's recent real queries, which its index build tunes
``ef`` on (:mod:`embedq.search.build`): real queries sit where users ask, which neither
stored vectors nor synthetic probes tell.

Each search pushes its query vector (int8, its own scale: ~390 bytes at 384 dimensions)
onto a Redis list per collection, trimmed to ``SAMPLE_SIZE`` and expiring ``SAMPLE_TTL_S``
after the last search: one pipelined LPUSH, LTRIM and EXPIRE, so ~80 KiB per searched
collection at most. Recording never fails a search.
"""

from __future__ import annotations

import logging

import numpy as np
import redis

from embedq.broker.client import throttled_warning
from embedq.codec import decode_vector, encode_vector
from embedq.keys import query_sample_key

log = logging.getLogger(__name__)

#: Query vectors kept per collection (the newest).
SAMPLE_SIZE = 200
#: A collection nobody searched this long forgets its sample.
SAMPLE_TTL_S = 7 * 24 * 3600
#: Fewer recent queries than this: the build tunes on stored vectors held out instead.
MIN_QUERIES = 100


def remember(client: redis.Redis, collection: str, vector: np.ndarray) -> None:
    """Add one query vector to ``collection``'s sample (best effort: a Redis that fails or
    is full only costs the sample this query)."""
    key = query_sample_key(collection)
    try:
        pipe = client.pipeline(transaction=False)
        pipe.lpush(key, encode_vector(np.asarray(vector, np.float32).ravel(), "int8"))
        pipe.ltrim(key, 0, SAMPLE_SIZE - 1)
        pipe.expire(key, SAMPLE_TTL_S)
        pipe.execute()
    except redis.RedisError as exc:
        throttled_warning(log, "query-sample", "query sample not recorded: %s", exc)


def recent(client: redis.Redis, collection: str, dim: int) -> np.ndarray:
    """``collection``'s recent query vectors of width ``dim`` (float32, one per row); none
    when Redis does not answer."""
    try:
        blobs = client.lrange(query_sample_key(collection), 0, SAMPLE_SIZE - 1)
    except redis.RedisError as exc:
        log.warning("query sample of %s unreadable (%s): tuning on stored vectors", collection, exc)
        return np.zeros((0, dim), np.float32)
    rows = [v for v in (decode_vector(b) for b in blobs) if v.shape == (dim,)]
    return np.vstack(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32)


def sampled(client: redis.Redis, collection: str) -> int:
    """How many recent queries ``collection``'s sample holds (0 when Redis does not say)."""
    try:
        return int(client.llen(query_sample_key(collection)))
    except redis.RedisError:
        return 0
