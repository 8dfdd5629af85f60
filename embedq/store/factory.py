"""The store for a database URL, by scheme."""

from __future__ import annotations

from embedq.errors import ConfigurationError
from embedq.store.base import Store


def create_store(url: str) -> Store:
    """The store for a database URL (``sqlite:///...`` or ``postgresql://...``)."""
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if scheme in ("sqlite", "postgresql", "postgres"):
        from embedq.store.sql import SQLStore

        return SQLStore(url)
    raise ConfigurationError(f"EMBEDQ_DATABASE_URL scheme {scheme!r}: use sqlite or postgresql")
