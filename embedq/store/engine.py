"""SQLAlchemy engines for the store: SQLite tuning, Postgres timeouts, and the retry policy
that waits out a Postgres restart or failover."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_before_delay,
    wait_random_exponential,
)

from embedq.errors import ConfigurationError
from embedq.settings import Settings
from embedq.store.filters import register_sqlite_functions

log = logging.getLogger(__name__)

R = TypeVar("R")

SQLITE_BUSY_TIMEOUT_MS = 30_000
# A dead peer is noticed after idle + interval x probes seconds of silence.
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_PROBES = 3
# Retry waits: uniformly random up to 0.5 s, 1 s, 2 s, ... capped here (full jitter).
RETRY_FIRST_WAIT_S = 0.5
RETRY_MAX_WAIT_S = 8.0


def normalize_url(url: str) -> str:
    """Use psycopg 3 for Postgres URLs that name no driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside one writer; the busy timeout makes writers wait, not fail.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def postgres_connect_args(url: str, settings: Settings) -> dict[str, Any]:
    """libpq options: a connect timeout, TCP keepalives, a TCP user timeout and a statement
    timeout, so no call waits on a dead or stuck server for longer than the settings say."""
    given = make_url(url).query.get("options") or ""
    given = " ".join(given) if isinstance(given, tuple) else given
    idle = settings.db_keepalive_idle_s
    silent_s = idle + KEEPALIVE_INTERVAL_S * KEEPALIVE_PROBES
    statement_ms = int(settings.db_statement_timeout_s * 1000)
    return {
        "connect_timeout": settings.db_connect_timeout_s,
        "keepalives": 1,
        "keepalives_idle": idle,
        "keepalives_interval": KEEPALIVE_INTERVAL_S,
        "keepalives_count": KEEPALIVE_PROBES,
        # Unacknowledged writes to a vanished server fail after as long as keepalives take.
        "tcp_user_timeout": silent_s * 1000,
        # Ours first: options in the URL itself (a later -c) win over the settings.
        "options": f"-c statement_timeout={statement_ms} {given}".strip(),
    }


def make_engine(url: str, settings: Settings) -> Engine:
    """An engine for ``url``; SQLite gets WAL and a busy timeout (its folder is created),
    Postgres the timeouts of :func:`postgres_connect_args`."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
        # Metadata filters compare JSON objects and arrays through a Python function.
        event.listen(engine, "connect", register_sqlite_functions)
        return engine
    try:
        args = postgres_connect_args(url, settings)
        return create_engine(url, pool_pre_ping=True, connect_args=args)
    except ModuleNotFoundError as exc:
        raise ConfigurationError("Postgres needs: pip install 'embedq[postgres]'") from exc


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` is worth waiting out: the server went away, restarts, fails over, or
    cancelled the statement. Constraint and data errors are never retried."""
    return isinstance(exc, OperationalError | InterfaceError)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries a store operation on connection errors, with exponential backoff and full
    jitter, for up to ``budget_s`` seconds (0: no retries)."""

    budget_s: float

    def call(self, fn: Callable[[], R]) -> R:
        """``fn()``, retried while it fails with a connection error and time is left."""
        if self.budget_s <= 0:
            return fn()
        retrying = Retrying(
            retry=retry_if_exception(is_connection_error),
            stop=stop_before_delay(self.budget_s),
            wait=wait_random_exponential(multiplier=RETRY_FIRST_WAIT_S, max=RETRY_MAX_WAIT_S),
            before_sleep=_log_retry,
            reraise=True,
        )
        return retrying(fn)


def retry_policy(dialect: str, settings: Settings) -> RetryPolicy:
    """Postgres waits out a restart or failover; SQLite (a local file, with its own busy
    timeout) fails at once, so a full disk is reported, not retried for minutes."""
    return RetryPolicy(settings.db_retry_budget_s if dialect == "postgresql" else 0.0)


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    reason = brief(exc) if isinstance(exc, SQLAlchemyError) else repr(exc)
    log.warning(
        "store: %s; retry %d in %.1f s (%.0f s so far)",
        reason,
        state.attempt_number,
        wait,
        state.seconds_since_start,
    )


def brief(exc: SQLAlchemyError) -> str:
    """The driver's one-line reason, without the SQL and its parameters (document text)."""
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(getattr(exc, 'orig', None) or exc).__name__}: {reason[0] if reason else ''}"
