"""API keys and the collections each may reach: ``EMBEDQ_API_KEYS`` and the key file
``EMBEDQ_API_KEYS_FILE``, re-read when it changes.

An entry is ``key`` (every collection) or ``key:pattern|pattern`` (only collections whose
name matches one of the globs, e.g. ``alice-key:alice-*``). Keys are hashed as they are
read and only their sha256 digests are kept; a presented key is hashed and its digest
compared with every entry's in constant time (``hmac.compare_digest``), so neither the
key nor the timing of a comparison tells anything. A key's id (the rate limit's and the
bulk job's name) is the start of its digest, never the key.

Outside its scope a key gets 404 "no such collection", whether the collection exists or
not: it learns nothing, not even that a name is taken.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Protocol

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from embedq.errors import ConfigurationError
from embedq.web.errors import ApiError

log = logging.getLogger(__name__)

# The key file is looked at (one stat, never a read unless it changed) at most this often.
FILE_CHECK_S = 1.0
# A key is what a Bearer token may hold (RFC 6750's token68), a pattern a collection name
# with glob characters.
KEY_RE = re.compile(r"^[A-Za-z0-9._~+/=-]+$")
PATTERN_RE = re.compile(r"^[A-Za-z0-9_.:*?\[\]!-]{1,128}$")
ANONYMOUS = "anonymous"


def key_id(key: str | bytes) -> str:
    """The name a key goes by in Redis keys and logs: the start of its sha256."""
    raw = key.encode() if isinstance(key, str) else key
    return hashlib.sha256(raw).hexdigest()[:12]


@dataclass(frozen=True)
class ApiKey:
    """One entry: a key's digest and its collection globs (None: every collection)."""

    digest: bytes
    patterns: tuple[str, ...] | None


@dataclass(frozen=True)
class Caller:
    """Who sent a request: its key id and the collections it may reach."""

    id: str
    patterns: tuple[str, ...] | None = None

    def may(self, collection: str) -> bool:
        """Whether this caller may reach ``collection`` (case-sensitive globs)."""
        if self.patterns is None:
            return True
        return any(fnmatch.fnmatchcase(collection, p) for p in self.patterns)

    def require(self, collection: str) -> None:
        """404 unless this caller may reach ``collection`` (said as for a missing one)."""
        if not self.may(collection):
            raise not_found(collection)


def job_of(key_id: str) -> str:
    """The bulk job an API key's requests form: keys share bulk capacity in turn."""
    return f"api:{key_id}"


def not_found(collection: str) -> ApiError:
    """The answer for a collection out of scope: the same words, whatever exists."""
    return ApiError(404, f"no such collection: {collection!r}", "NotFound")


def parse_entry(entry: str) -> ApiKey:
    """``key`` or ``key:pattern|pattern``; ValueError naming the problem (never the key)."""
    key, colon, scope = entry.strip().partition(":")
    if not KEY_RE.match(key):
        raise ValueError("a key is 1 or more of A-Z a-z 0-9 . _ ~ + / = - (no ',' or ':')")
    digest = hashlib.sha256(key.encode()).digest()
    if not colon:
        return ApiKey(digest, None)
    patterns = tuple(p.strip() for p in scope.split("|"))
    if not patterns or not all(PATTERN_RE.match(p) for p in patterns):
        raise ValueError(
            "after 'key:' come collection globs separated by '|' (letters, digits, _ . : - "
            "and * ? [ ] !), e.g. alice-key:alice-*|shared"
        )
    return ApiKey(digest, patterns)


def parse_keys(text: str | None, setting: str = "EMBEDQ_API_KEYS") -> list[ApiKey]:
    """Comma-separated entries; :class:`ConfigurationError` naming the bad one's position."""
    entries = [e for e in (text or "").split(",") if e.strip()]
    keys = []
    for n, entry in enumerate(entries, 1):
        try:
            keys.append(parse_entry(entry))
        except ValueError as exc:
            raise ConfigurationError(f"{setting}: entry {n}: {exc}") from exc
    return keys


def parse_file(text: str, path: Path) -> tuple[list[ApiKey], list[str]]:
    """A key file's entries (one a line, ``#`` comment lines and blank lines skipped; a
    line may also hold several comma-separated entries) and a problem per bad line, which
    is left out: a typo locks its own key out, never opens anything."""
    keys: list[ApiKey] = []
    problems: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        for entry in (e for e in line.split(",") if e.strip()):
            try:
                keys.append(parse_entry(entry))
            except ValueError as exc:
                problems.append(f"{path}:{n}: {exc}")
    return keys, problems


class KeyRing:
    """The keys the API accepts: ``EMBEDQ_API_KEYS`` plus the key file, whose changes
    (its modification time, size or inode) are picked up within ``FILE_CHECK_S``."""

    def __init__(self, inline: str | None, path: Path | None) -> None:
        self.path = path
        self._inline = parse_keys(inline)
        self._file: list[ApiKey] = []
        self._seen: tuple[int, int, int] | None = None
        self._checked = -FILE_CHECK_S
        self._lock = threading.Lock()
        if path is not None:
            if not path.is_file():
                raise ConfigurationError(f"EMBEDQ_API_KEYS_FILE={str(path)!r} is not a file")
            self._reload(strict=True)

    @property
    def configured(self) -> bool:
        """Whether any key source is set (an empty key file counts: keys may come later)."""
        return bool(self._inline) or self.path is not None

    def identify(self, given: str) -> Caller | None:
        """The caller ``given`` is, or None for a key no entry holds. Every entry is
        compared, in constant time, whichever matches."""
        self._maybe_reload()
        digest = hashlib.sha256(given.encode()).digest()
        matched = [k for k in self._inline + self._file if hmac.compare_digest(digest, k.digest)]
        if not matched:
            return None
        scopes = [k.patterns for k in matched]
        # The same key listed twice reaches what either entry gives it.
        patterns = None if None in scopes else tuple(p for s in scopes for p in s or ())
        return Caller(key_id(given), patterns)

    def _maybe_reload(self) -> None:
        if self.path is None or time.monotonic() - self._checked < FILE_CHECK_S:
            return
        with self._lock:
            if time.monotonic() - self._checked < FILE_CHECK_S:
                return
            self._checked = time.monotonic()
            self._reload(strict=False)

    def _reload(self, strict: bool) -> None:
        """Read the key file if it changed; a file that went away revokes its keys."""
        assert self.path is not None
        try:
            stat = os.stat(self.path)
            seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if seen == self._seen:
                return
            text = self.path.read_text()
        except OSError as exc:
            if self._seen is not None or self._file:
                log.error("API key file %s unreadable (%s): its keys are refused", self.path, exc)
            self._file, self._seen = [], None
            return
        keys, problems = parse_file(text, self.path)
        if problems and strict:
            raise ConfigurationError(f"EMBEDQ_API_KEYS_FILE: {problems[0]}")
        for problem in problems:
            log.error("API key file: %s (that line's key is refused)", problem)
        self._file, self._seen = keys, seen
        log.info("API key file %s read: %d entries", self.path, len(keys))


class Gate(Protocol):
    """What the routes' dependencies need of the API's service."""

    def authenticate(self, credentials: HTTPAuthorizationCredentials | None) -> Caller:
        """The caller, or 401."""

    def limit_rate(self, key_id: str) -> None:
        """Count a request against the key's budget; 429 when spent."""


# Optional here, so a missing key gets our 401 message rather than FastAPI's 403.
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))]


def gate(request: Request) -> Gate:
    """The app's service (see :func:`embedq.api.create_app`)."""
    return request.app.state.service  # type: ignore[no-any-return]


async def identified(request: Request, credentials: Credentials) -> Caller:
    """The request's caller, or 401. It runs on the event loop: no network I/O, at most one
    ``stat`` of the key file a second (and a read of it when it changed)."""
    return gate(request).authenticate(credentials)


def authorized(request: Request, who: Annotated[Caller, Depends(identified)]) -> Caller:
    """The request's caller, counted against its key's rate limit (429 when spent)."""
    gate(request).limit_rate(who.id)
    return who


#: A route parameter: the authenticated, rate-limited caller.
Authorized = Annotated[Caller, Depends(authorized)]
