"""Every Redis key embedq writes is built here, so the key space is documented in one place."""

from __future__ import annotations

import hashlib

PREFIX = "embedq"
VECTOR_PREFIX = f"{PREFIX}:vec"
STATS_PREFIX = f"{PREFIX}:stats"
HEARTBEAT_PREFIX = f"{PREFIX}:hb"


def content_hash(text: str) -> str:
    """The store's content hash of one text (sha256, hex)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def vector_key(model_id: str, normalize: bool, text: str) -> str:
    """Cache key of one vector: a hash of (model id, normalize flag, text)."""
    digest = hashlib.sha256()
    digest.update(f"{model_id}\x00{int(normalize)}\x00".encode())
    digest.update(text.encode("utf-8", "surrogatepass"))
    return f"{VECTOR_PREFIX}:{digest.hexdigest()}"


def stats_key(name: str) -> str:
    """Counter or gauge kept in Redis for operators."""
    return f"{STATS_PREFIX}:{name}"


def heartbeat_key(queue: str, hostname: str) -> str:
    """Short-lived key a live worker of ``queue`` refreshes."""
    return f"{HEARTBEAT_PREFIX}:{queue}:{hostname}"
