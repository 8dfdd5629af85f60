"""What a failure means to whoever started embedq: one line on stderr and an exit code.

Every ``embedq`` command runs through :func:`run_cli`: a failure prints one line (which
server or setting, its URL with the password hidden, the cause, what to do) and exits with
a code from ``sysexits.h``, so a supervisor can tell a server that is down (69, retry
later) from a setting that is wrong (78, retrying will not help). ``--debug`` or
``EMBEDQ_DEBUG=1`` prints the traceback too. Workers use :func:`classify` for the code
they exit with when they cannot start.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from embedq.errors import (
    INPUT_ERRORS,
    ConfigurationError,
    DeviceFailedError,
    EmbedqError,
    ModelLoadError,
    PortInUseError,
    UnavailableError,
)

EX_FAILED = 1  # the command ran, and some of its work failed (ingest: documents not stored)
EX_USAGE = 2  # bad input or a bad flag on the command line (click's code)
EX_UNAVAILABLE = 69  # a server embedq needs does not answer: Redis, the cache, the store
EX_SOFTWARE = 70  # the worker's device failed, or an error embedq did not expect
EX_OSERR = 71  # the system refused a resource: a port taken or not allowed
EX_TEMPFAIL = 75  # no answer in time (no worker took the task): try again later
EX_CONFIG = 78  # a setting, URL, credential or model that cannot work
EX_INTERRUPTED = 130  # Ctrl-C

DEBUG_HINT = "run with --debug (or EMBEDQ_DEBUG=1) for the traceback"
# Settings whose values never appear in a message.
SECRET_SETTINGS = ("api_keys", "flower_basic_auth")
TRUE_WORDS = frozenset({"1", "true", "yes", "on", "y", "t"})


@dataclass(frozen=True)
class Failure:
    """An exit code and the one line that says why."""

    code: int
    message: str


def debug_enabled() -> bool:
    """Whether failures print their traceback (``--debug`` sets ``EMBEDQ_DEBUG`` for this
    process and its children). Read from the environment: the settings may be what failed."""
    return os.environ.get("EMBEDQ_DEBUG", "").strip().lower() in TRUE_WORDS


def classify(exc: BaseException) -> Failure:
    """The exit code and one-line message for ``exc`` (its causes are looked through)."""
    for check in (_settings_failure, _named_failure, _redis_failure):
        if (failure := check(exc)) is not None:
            return failure
    from celery.exceptions import TimeoutError as CeleryTimeout

    if isinstance(exc, CeleryTimeout):
        return Failure(
            EX_TEMPFAIL, f"no answer in time ({exc}); is a worker running? see `embedq status`"
        )
    return Failure(
        EX_SOFTWARE, f"unexpected {type(exc).__name__}: {_first_line(exc)}; {DEBUG_HINT}"
    )


def _named_failure(exc: BaseException) -> Failure | None:
    """embedq's own errors, by kind."""
    codes: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], int], ...] = (
        ((ConfigurationError, ModelLoadError), EX_CONFIG),
        (UnavailableError, EX_UNAVAILABLE),
        (PortInUseError, EX_OSERR),
        (INPUT_ERRORS, EX_USAGE),
        (DeviceFailedError, EX_SOFTWARE),
        (EmbedqError, EX_FAILED),
    )
    for kind, code in codes:
        if isinstance(exc, kind):
            return Failure(code, _first_line(exc))
    # A path from a setting or flag that cannot be used (a data folder that cannot be made).
    if isinstance(exc, OSError) and not isinstance(exc, ConnectionError) and exc.filename:
        why = f"cannot use {exc.filename} ({exc.strerror or exc})"
        return Failure(EX_CONFIG, f"{why}: check the setting or flag that names it")
    return None


def _settings_failure(exc: BaseException) -> Failure | None:
    """Settings that do not validate: each named by its ``EMBEDQ_*`` variable."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError) or exc.title != "Settings":
        return None
    parts = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error.get("loc") else ""
        value = "***" if field in SECRET_SETTINGS else repr(error.get("input"))[:80]
        name = f"EMBEDQ_{field.upper()}" if field else "the settings"
        parts.append(f"{name}={value}: {error['msg']}")
    return Failure(EX_CONFIG, f"invalid setting {'; '.join(parts)}; fix or unset it")


def _redis_failure(exc: BaseException) -> Failure | None:
    """A Redis error that escaped the commands' own handling (a lost connection mid-run)."""
    import redis
    from kombu.exceptions import OperationalError

    found = _find(exc, (redis.AuthenticationError, redis.ConnectionError, redis.TimeoutError))
    found = found or _find(exc, (OperationalError,))
    if found is None:
        return None
    if isinstance(found, redis.AuthenticationError):
        return Failure(EX_CONFIG, f"Redis refused the password ({found}): check EMBEDQ_REDIS_URL")
    return Failure(
        EX_UNAVAILABLE,
        f"Redis stopped answering ({_first_line(found)}): check that it runs (`embedq status`), "
        "EMBEDQ_REDIS_URL and EMBEDQ_CACHE_URL",
    )


def _find(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """``exc`` or the first of its causes (a few levels deep) that is one of ``kinds``."""
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return None
        if isinstance(seen, kinds):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _first_line(exc: BaseException) -> str:
    """``exc``'s message on one line (Celery's and kombu's can span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def secrets() -> list[str]:
    """Passwords and keys this process was given, to be kept out of any message."""
    found = []
    for name in ("EMBEDQ_REDIS_URL", "EMBEDQ_CACHE_URL", "EMBEDQ_DATABASE_URL"):
        try:
            password = urlsplit(os.environ.get(name, "")).password
        except ValueError:
            continue
        found += [password, unquote(password)] if password else []
    found += [k for k in os.environ.get("EMBEDQ_API_KEYS", "").split(",") if k.strip()]
    pairs = os.environ.get("EMBEDQ_FLOWER_BASIC_AUTH", "").split(",")
    found += [pair.split(":", 1)[1] for pair in pairs if ":" in pair]
    # A secret of one or two characters would blot out ordinary words.
    return [s.strip() for s in found if len(s.strip()) >= 3]


def scrub(text: str) -> str:
    """``text`` with every secret of :func:`secrets` shown as ``***``."""
    for secret in secrets():
        text = text.replace(secret, "***")
    return text


def report(exc: BaseException) -> int:
    """Print ``exc`` as one line on stderr (after its traceback with ``--debug``); its code."""
    failure = classify(exc)
    if debug_enabled():
        traceback.print_exception(exc, file=sys.stderr)
    print(f"error: {scrub(failure.message)}", file=sys.stderr)
    return failure.code


def _usage_failure(exc: Any) -> int:
    """A flag or argument click refused: one line naming the variable when it came from the
    environment (a setting, 78), else click's usage message (2)."""
    param, ctx = getattr(exc, "param", None), getattr(exc, "ctx", None)
    source = ctx.get_parameter_source(param.name) if param is not None and ctx else None
    if getattr(source, "name", "") == "ENVIRONMENT":
        name = param.envvar if isinstance(param.envvar, str) else param.envvar[0]
        flag = f" ({param.opts[0]})" if getattr(param, "opts", None) else ""
        value = "***" if "AUTH" in name or "KEY" in name else repr(os.environ.get(name))[:80]
        reason = getattr(exc, "message", None) or exc.format_message()
        line = f"invalid setting {name}={value}{flag}: {reason}; fix or unset it"
        print(f"error: {scrub(line)}", file=sys.stderr)
        return EX_CONFIG
    try:
        from typer import rich_utils

        rich_utils.rich_format_error(exc)
    except ImportError:  # pragma: no cover - rich is a dependency of typer
        exc.show()
    return int(exc.exit_code)


def run_cli(command: Callable[..., Any]) -> int:
    """Run a typer app (its own exit codes kept); any failure is :func:`report`-ed. The
    process's exit status."""
    import typer

    try:
        outcome = command(standalone_mode=False)
    except typer.TyperException as exc:  # click's usage errors
        return _usage_failure(exc)
    except typer.Abort:
        print("Aborted!", file=sys.stderr)
        return EX_FAILED
    except Exception as exc:
        return report(exc)
    return outcome if isinstance(outcome, int) else 0
