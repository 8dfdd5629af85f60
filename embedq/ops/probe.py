"""Reaching the servers embedq needs, within a bounded time.

A process's first contact with a server (the broker's Redis, the cache's Redis, the store's
database) is one probe of at most ``EMBEDQ_PROBE_TIMEOUT_S``, without retries: a server that
does not answer then is down or misconfigured, and the retries meant to ride out a restart
(Celery's publish retries, ~30 s; the store's ``EMBEDQ_DB_RETRY_BUDGET_S``, 90 s) would only
hide that. Once a server has answered, this process waits out its restarts as before.

Commands check what they need before they start (:func:`requires`); ``embedq status`` and
``/health`` read each server's state (:func:`server_states`) without ever hanging on one.
Messages name the server, its URL (password hidden), the cause and what to do.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from embedq.errors import (
    BrokerUnavailableError,
    ConfigurationError,
    PortInUseError,
    StoreUnavailableError,
    UnavailableError,
)
from embedq.settings import Settings, get_settings

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

# What a command may need: checked before it starts (see :func:`requires`).
BROKER, STORE, MODEL = "broker", "store", "model"
# Words in a database server's refusal (after "FATAL:") that mean the URL is wrong (user,
# password, database), not that the server is down or starting.
CONFIG_REFUSALS = ("password", "authentication", "does not exist", "pg_hba.conf", "permission")

_reached: set[str] = set()
_reached_lock = threading.Lock()


@dataclass(frozen=True)
class Server:
    """A server embedq needs: its role in messages, its URL and the setting that names it."""

    name: str
    what: str
    url: str
    setting: str

    @property
    def shown(self) -> str:
        """The URL with its password hidden."""
        return redact(self.url)


@dataclass
class ServerState:
    """Whether a server answered a probe, how fast, or why not (for status and /health)."""

    name: str
    url: str
    reachable: bool
    latency_ms: float | None = None
    error: str | None = None
    #: The error behind ``error`` (its kind gives the exit code); not in :meth:`as_dict`.
    failure: BaseException | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {k: v for k, v in asdict(self).items() if k != "failure"}


def redact(url: str) -> str:
    """``url`` with its password (and any ``password=`` query value) shown as ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<an unparsable URL>"
    if password is not None:
        userinfo, _, host = parts.netloc.rpartition("@")
        # Rebuilt by hand: urlunsplit would drop the empty host of sqlite:////path.
        url = url.replace(parts.netloc, f"{userinfo.split(':', 1)[0]}:***@{host}", 1)
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", url)


def broker_server() -> Server:
    """The broker's Redis (and result backend): the resolved ``EMBEDQ_REDIS_URL``."""
    from embedq.broker.url import redis_url

    return Server("redis", "the Redis broker", redis_url(), "EMBEDQ_REDIS_URL")


def cache_server(settings: Settings) -> Server | None:
    """The vector cache's Redis when ``EMBEDQ_CACHE_URL`` names one apart from the broker."""
    if not settings.cache_url or settings.cache_url == broker_server().url:
        return None
    return Server("cache", "the cache Redis", settings.cache_url, "EMBEDQ_CACHE_URL")


def store_server(settings: Settings, url: str | None = None) -> Server:
    """The store's database (``url``, default ``EMBEDQ_DATABASE_URL``)."""
    return Server("store", "the store", url or settings.database_url, "EMBEDQ_DATABASE_URL")


def probe(server: Server, settings: Settings) -> float:
    """Seconds ``server`` took to answer one request, tried once within
    ``EMBEDQ_PROBE_TIMEOUT_S``; :class:`ConfigurationError` when its URL or credentials are
    wrong, :class:`UnavailableError` when it does not answer."""
    started = time.monotonic()
    if server.name == "store":
        _probe_store(server, settings)
    else:
        _probe_redis(server, settings.probe_timeout_s)
    with _reached_lock:
        _reached.add(server.url)
    return time.monotonic() - started


def _probe_redis(server: Server, timeout_s: float) -> None:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from embedq.broker.client import client_url

    try:
        client = redis.Redis.from_url(
            client_url(server.url),
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
    except ValueError as exc:
        raise ConfigurationError(
            f"{server.setting}={server.shown!r} is not a Redis URL ({exc}): use "
            "redis://[:password@]host:6379/0, rediss://... (TLS) or unix:///path"
        ) from exc
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        # Redis 7 answers a missing password with a paragraph about HELLO.
        said = "a password is required" if "HELLO" in str(exc) else str(exc)
        raise _refused(server, said, "the password") from exc
    except redis.ResponseError as exc:
        raise _refused(server, str(exc), "its password and database number") from exc
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise _unavailable(server, _cause(exc, timeout_s)) from exc
    finally:
        client.close()


def _probe_store(server: Server, settings: Settings) -> None:
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    from embedq.store.engine import brief, make_engine

    timeout_s = settings.probe_timeout_s
    if server.url.split(":", 1)[0].split("+", 1)[0] not in ("sqlite", "postgresql", "postgres"):
        raise _bad_store_url(server, "not a database embedq knows")
    # libpq counts its connect timeout in whole seconds, at least 2.
    bounded = settings.model_copy(
        update={
            "db_connect_timeout_s": max(2, math.ceil(timeout_s)),
            "db_statement_timeout_s": timeout_s,
        }
    )
    try:
        engine = make_engine(server.url, bounded)
    except (ArgumentError, NoSuchModuleError, ImportError, ValueError, OSError) as exc:
        raise _bad_store_url(server, str(exc)) from exc
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except SQLAlchemyError as exc:
        reason = brief(exc)
        if engine.dialect.name == "sqlite" or _refused_url(reason):
            raise _refused(server, reason, "its user, password, database or path") from exc
        raise _unavailable(server, _cause(exc, timeout_s, reason)) from exc
    finally:
        engine.dispose()


def _refused_url(reason: str) -> bool:
    """Whether the database refused the URL's user, password or database (not its host)."""
    lowered = reason.lower()
    said = lowered.split("fatal:", 1)[1] if "fatal:" in lowered else ""
    said = lowered if "no password supplied" in lowered else said
    return any(word in said for word in CONFIG_REFUSALS)


def _bad_store_url(server: Server, why: str) -> ConfigurationError:
    return ConfigurationError(
        f"{server.setting}={server.shown!r} cannot be used ({redact(why)}): use "
        "sqlite:///path/embedq.db or postgresql://user[:password]@host:5432/database"
    )


def _cause(exc: BaseException, timeout_s: float | None, text: str | None = None) -> str:
    """Why a server did not answer, in a few words."""
    text = text or str(exc)
    lowered = text.lower()
    if (
        isinstance(exc, socket.timeout | TimeoutError)
        or "timeout" in lowered
        or "timed out" in lowered
    ):
        return "timed out" if timeout_s is None else f"no answer within {timeout_s:g} s"
    if "refused" in lowered:
        return "connection refused"
    if "name or service not known" in lowered or "translate host name" in lowered:
        return "unknown host name"
    return text.strip().splitlines()[0].rstrip(".") if text.strip() else type(exc).__name__


def _unavailable(server: Server, cause: str) -> UnavailableError:
    kind = {"redis": BrokerUnavailableError, "store": StoreUnavailableError}
    return kind.get(server.name, UnavailableError)(
        f"{server.what} at {server.shown} does not answer ({cause}): start it, or point "
        f"{server.setting} at one that runs"
    )


def _refused(server: Server, reason: str, what_to_fix: str) -> ConfigurationError:
    return ConfigurationError(
        f"{server.what} at {server.shown} refused the connection ({reason.rstrip('.')}): "
        f"check {what_to_fix} in {server.setting}"
    )


def reached(url: str) -> bool:
    """Whether a server at ``url`` has answered this process before."""
    with _reached_lock:
        return url in _reached


def ensure(server: Server, settings: Settings | None = None) -> None:
    """Probe ``server`` unless it answered this process before (a first contact fails fast;
    later outages are waited out by the callers' own retries)."""
    if not reached(server.url):
        probe(server, settings or get_settings())


def ensure_store(url: str, settings: Settings) -> None:
    """:func:`ensure` for the store at ``url`` (``create_store`` calls it)."""
    ensure(store_server(settings, url), settings)


@contextlib.contextmanager
def publishing() -> Iterator[None]:
    """Around sending a task: the broker is probed on this process's first contact, and an
    outage that outlasts the publish retries (~30 s, meant for a restart) is raised as a
    :class:`BrokerUnavailableError` naming it. A full Redis keeps its own error (waited out
    by the callers)."""
    from embedq.broker.client import BROKER_ERRORS, describe, is_redis_full

    server, settings = broker_server(), get_settings()
    ensure(server, settings)
    try:
        yield
    except UnavailableError:
        raise
    except (*BROKER_ERRORS, RuntimeError) as exc:
        # Celery's result consumer gives up on a lost Redis with a bare RuntimeError.
        lost = isinstance(exc, BROKER_ERRORS) or isinstance(exc.__cause__, BROKER_ERRORS)
        if not lost or is_redis_full(exc):
            raise
        # Celery's RuntimeError says "must be restarted": the Redis error under it says why.
        cause = _cause(exc.__cause__ or exc, None, describe(exc.__cause__ or exc))
        raise BrokerUnavailableError(
            f"{server.what} at {server.shown} stopped answering ({cause}); the task was not "
            f"sent: check that it runs (`embedq status`) and {server.setting}"
        ) from exc


def publishes(send: F) -> F:
    """Decorate a method that sends a task: it runs inside :func:`publishing`."""

    @functools.wraps(send)
    def run(*args: Any, **kwargs: Any) -> Any:
        with publishing():
            return send(*args, **kwargs)

    return run  # type: ignore[return-value]


def check_models(settings: Settings) -> None:
    """Every configured model's files are there (``ModelLoadError`` naming it if not) and
    the CPU backend is one embedq has; cheap: nothing is loaded."""
    from embedq.encode.factory import BACKENDS
    from embedq.encode.models import model_specs, resolve_model_path

    if settings.cpu_backend not in BACKENDS:
        raise ConfigurationError(
            f"EMBEDQ_CPU_BACKEND={settings.cpu_backend!r}: choose one of {', '.join(BACKENDS)}"
        )
    for spec in model_specs(settings):
        resolve_model_path(spec.source)


def run_bounded(calls: list[Callable[[], T]], timeout_s: float) -> list[T | BaseException]:
    """Each call in a thread of its own, at once; a call's result, or its exception, or a
    ``TimeoutError`` for one still running after ``timeout_s`` (its daemon thread is left
    behind: a hung socket never holds the caller)."""
    results: list[T | BaseException] = [TimeoutError(f"no answer within {timeout_s:g} s")] * len(
        calls
    )

    def run(i: int, call: Callable[[], T]) -> None:
        try:
            results[i] = call()
        except BaseException as exc:  # reported to the caller, whatever it is
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(calls)]
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return list(results)


def check(needs: Iterable[str], settings: Settings | None = None) -> None:
    """Raise the first failure (in ``needs`` order) among the checks of ``needs``
    (:data:`BROKER`, :data:`STORE`, :data:`MODEL`), run at once."""
    settings = settings or get_settings()
    servers = {BROKER: broker_server, STORE: lambda: store_server(settings)}
    wanted = [need for need in needs if need in (*servers, MODEL)]
    found = {need: servers[need]() for need in wanted if need in servers}
    calls = [
        functools.partial(ensure, found[need], settings)
        if need in found
        else functools.partial(check_models, settings)
        for need in wanted
    ]
    # Each probe gives up by itself; the margin only covers a probe stuck past its timeout.
    limit_s = 2 * settings.probe_timeout_s + 1
    for need, outcome in zip(wanted, run_bounded(calls, limit_s), strict=True):
        if isinstance(outcome, TimeoutError) and need in found:
            raise _unavailable(found[need], f"no answer within {limit_s:g} s") from outcome
        if isinstance(outcome, BaseException):
            raise outcome


def requires(*needs: str) -> Callable[[F], F]:
    """Decorate a command: before it runs, check that what it ``needs`` is there."""

    def wrap(command: F) -> F:
        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            check(needs)
            return command(*args, **kwargs)

        return run  # type: ignore[return-value]

    return wrap


def server_states(settings: Settings, servers: list[Server] | None = None) -> list[ServerState]:
    """Each server's state (default: the broker, the cache if apart, the store), probed at
    once: a few seconds at most in all, whatever answers or hangs."""
    if servers is None:
        cache = cache_server(settings)
        servers = [broker_server(), *([cache] if cache else []), store_server(settings)]
    limit_s = settings.probe_timeout_s + 1
    calls = [functools.partial(probe, server, settings) for server in servers]
    outcomes = run_bounded(calls, limit_s)
    return [_state(s, outcome, limit_s) for s, outcome in zip(servers, outcomes, strict=True)]


def _state(server: Server, outcome: float | BaseException, limit_s: float) -> ServerState:
    if isinstance(outcome, BaseException):
        known = isinstance(outcome, UnavailableError | ConfigurationError)
        failure = outcome if known else _unavailable(server, _cause(outcome, limit_s))
        return ServerState(server.name, server.shown, False, error=str(failure), failure=failure)
    return ServerState(server.name, server.shown, True, latency_ms=round(outcome * 1000, 1))


def check_port(host: str, port: int, setting: str) -> None:
    """:class:`PortInUseError` unless this process could listen on ``host:port`` now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        # As uvicorn and tornado bind: a port in TIME_WAIT is free to take.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PortInUseError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}): stop what listens "
                f"there, or choose another port with {setting}"
            ) from exc
