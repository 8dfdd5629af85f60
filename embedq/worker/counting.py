"""A worker's SLO counts: summed in process, written to the broker's Redis a few times a
second by one thread (see :class:`embedq.ops.slo.Tally`), never once per task."""

from __future__ import annotations

from embedq.broker.client import shared_client
from embedq.ops import slo
from embedq.settings import get_settings


def worker_tally() -> slo.Tally:
    """This process's tally, its flusher started, writing with the window's TTL (plus an
    hour) into the broker's Redis."""
    return slo.counting(shared_client, lambda: get_settings().slo_window_s + 3600)
