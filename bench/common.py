"""Shared pieces of the scripts in bench/: the engine of ``embedq bench``, with this
checkout's ``../shared/data`` as the data folder."""

from __future__ import annotations

from pathlib import Path

from embedq.tools.bench import load_texts as _load_texts
from embedq.tools.bench import median_time
from embedq.tools.procs import worker

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

__all__ = ["DATA", "ROOT", "load_texts", "median_time", "worker"]


def load_texts(name: str, limit: int | None = None) -> list[str]:
    """``pydoc``, ``sick`` or ``mixed`` texts from ``../shared/data``."""
    return _load_texts(name, DATA, limit)
