"""Worker heartbeats: a short-lived Redis key per queue saying "alive, this fast"."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import redis

from embedq.keys import HEARTBEAT_PREFIX, heartbeat_key
from embedq.ops import slo

if TYPE_CHECKING:
    from embedq.encode.base import Encoder

log = logging.getLogger(__name__)

INTERVAL_S = 2.0
TTL_S = 10
# Alive marks outlive the longest SLO window anyone is likely to set.
ALIVE_TTL_S = 8 * 24 * 3600


def read_heartbeats(client: redis.Redis) -> dict[str, list[dict[str, Any]]]:
    """Live workers' heartbeats, by queue (the router, status and the API read them)."""
    found: dict[str, list[dict[str, Any]]] = {}
    keys = sorted(client.scan_iter(f"{HEARTBEAT_PREFIX}:*", count=1000))
    for key, raw in zip(keys, client.mget(keys) if keys else [], strict=True):
        if raw:
            found.setdefault(key.decode().split(":")[2], []).append(json.loads(raw))
    return found


class Heartbeat:
    """Publishes liveness and throughput (texts/s, smoothed) every ``INTERVAL_S``."""

    def __init__(
        self,
        client: redis.Redis,
        queues: Sequence[str],
        hostname: str,
        encoder: Encoder,
        texts_encoded: Callable[[], int],
        extra: dict[str, Any] | None = None,
        live: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.client = client
        self.queues = list(queues)
        self.hostname = hostname
        self.device = encoder.device
        # What status, the API's /metadata and the router read about this worker.
        self.about = {
            "model": encoder.name,
            "model_id": encoder.model_id,
            "dim": encoder.dim,
            "max_batch_tokens": encoder.max_batch_tokens,
            **(extra or {}),
        }
        self.texts_encoded = texts_encoded
        # Figures that change while the worker runs (the learned batch budget).
        self.live = live or dict
        self.texts_per_s: float | None = None
        self._last = (time.monotonic(), texts_encoded())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embedq-heartbeat", daemon=True)

    def start(self) -> None:
        """Beat now and then every interval, in a daemon thread."""
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and remove this worker's keys."""
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
            self.client.delete(*(heartbeat_key(q, self.hostname) for q in self.queues))

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            try:
                self.beat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def beat(self) -> None:
        """Measure throughput since the last beat and publish it."""
        now, count = time.monotonic(), self.texts_encoded()
        then, before = self._last
        if count > before:
            rate = (count - before) / max(now - then, 1e-6)
            # Smoothed, and only from busy intervals: an idle worker is not a slow one.
            self.texts_per_s = (
                rate if self.texts_per_s is None else 0.7 * self.texts_per_s + 0.3 * rate
            )
        self._last = (now, count)
        payload = json.dumps(
            {
                "hostname": self.hostname,
                "device": self.device,
                "texts_per_s": self.texts_per_s,
                "texts_encoded": count,
                **self.about,
                **self.live(),
            }
        )
        pipe = self.client.pipeline(transaction=False)
        for queue in self.queues:
            pipe.set(heartbeat_key(queue, self.hostname), payload, ex=TTL_S)
        slo.mark_alive(self.client, ALIVE_TTL_S, pipeline=pipe)
        pipe.execute()
