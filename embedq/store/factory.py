"""The store for a database URL, by scheme."""

from __future__ import annotations

from embedq.errors import ConfigurationError
from embedq.settings import Settings, get_settings
from embedq.store.base import Store


def create_store(url: str, settings: Settings | None = None) -> Store:
    """The store for a database URL (``sqlite:///...`` or ``postgresql://...``).

    A database this process has not reached yet must answer within
    ``EMBEDQ_PROBE_TIMEOUT_S`` (``StoreUnavailableError`` otherwise, at once); the retry
    budget ``EMBEDQ_DB_RETRY_BUDGET_S`` rides out restarts of one that answered."""
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if scheme in ("sqlite", "postgresql", "postgres"):
        from embedq.ops.probe import ensure_store
        from embedq.store.sql import SQLStore

        settings = settings or get_settings()
        ensure_store(url, settings)
        return SQLStore(url, settings)
    raise ConfigurationError(f"EMBEDQ_DATABASE_URL scheme {scheme!r}: use sqlite or postgresql")
