"""What one worker process holds: encoder, cache, batcher and store, built once, after start."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from typing import Any

import numpy as np

from embedq.broker.client import cache_client
from embedq.broker.traffic import Ticket, Traffic
from embedq.codec import Embeddings
from embedq.encode.base import Encoder
from embedq.encode.factory import create_encoders
from embedq.errors import EncoderError, UnknownModelError
from embedq.inputs import EmbedRequest
from embedq.keys import content_hash
from embedq.ops import metrics
from embedq.settings import Settings, get_settings
from embedq.store.base import Fingerprint, Item, Store, meta_hash, now_version
from embedq.store.factory import create_store
from embedq.worker.batcher import Batcher
from embedq.worker.cache import RedisCache
from embedq.worker.counting import worker_tally
from embedq.worker.flight import Flight
from embedq.worker.stop import stop_worker

log = logging.getLogger(__name__)

# What a request without a message (a direct call, a test) is served as.
UNCLASSED = Ticket(Traffic.INTERACTIVE, "-", None, None)
BULK = Ticket(Traffic.BULK, "-", None, None)


class Runtime:
    """The worker-side pipeline: request -> batcher (cache, encoder) -> store."""

    def __init__(
        self,
        settings: Settings,
        encoder: Encoder | None = None,
        encoders: Sequence[Encoder] | None = None,
    ) -> None:
        self.settings = settings
        # One encoder per model, the default first (``encoder`` alone: a one-model worker).
        found = list(encoders or ([encoder] if encoder else create_encoders(settings)))
        self.encoders = found
        self.encoder = found[0]
        client, shared = cache_client(settings.cache_url)
        # On the broker's Redis the cache keeps to its share; on its own Redis, LRU rules.
        share = settings.cache_max_share if shared else None
        self.cache = RedisCache(
            client, settings.cache_ttl_s, settings.lru_items, share, dtype=settings.vector_dtype
        )
        # A batch never mixes models: one batcher (thread, token budget) per model.
        self.batchers = {e.model_id: self._batcher(e) for e in found}
        self.batcher = self.batchers[self.encoder.model_id]
        self._store: Store | None = None
        self._store_lock = threading.Lock()

    def _batcher(self, encoder: Encoder) -> Batcher:
        settings = self.settings
        return Batcher(
            encoder,
            self.cache,
            wait_s=settings.batch_wait_ms / 1000,
            max_batch_size=settings.max_batch_size,
            adaptive=settings.learns_batch_budget,
            latency_target_s=(settings.batch_latency_target_ms or 0) / 1000 or None,
            flight=Flight(self.cache, settings.cache_lease_ms) if settings.cache_lease_ms else None,
            on_fatal=stop_worker,
            interactive_batch_s=settings.interactive_batch_ms / 1000,
            bulk_min_share=settings.bulk_min_share,
        )

    def select(self, model: str | None) -> Encoder:
        """The encoder a request naming ``model`` gets (``None``: the default)."""
        for encoder in self.encoders:
            if encoder.accepts(model):
                return encoder
        served = ", ".join(f"{e.name!r} ({e.model_id})" for e in self.encoders)
        raise UnknownModelError(f"model {model!r} is not served here; this worker serves {served}")

    def models(self) -> list[dict[str, Any]]:
        """Each model served, with its dimension and current token budget (for heartbeats)."""
        return [
            {**e.describe(), "max_batch_tokens": self.batchers[e.model_id].max_batch_tokens}
            for e in self.encoders
        ]

    def texts_encoded(self) -> int:
        """Texts encoded by all of this worker's models since it started."""
        return sum(b.stats.texts_encoded for b in self.batchers.values())

    def work(self) -> tuple[int, float]:
        """Tokens encoded and model seconds spent by all models (for the price per token)."""
        stats = [b.stats for b in self.batchers.values()]
        return sum(s.tokens_encoded for s in stats), sum(s.encode_seconds for s in stats)

    @property
    def store(self) -> Store:
        """The durable store, opened on first use."""
        with self._store_lock:
            if self._store is None:
                self._store = create_store(self.settings.database_url)
            return self._store

    def embed(self, request: EmbedRequest, ticket: Ticket = UNCLASSED) -> Embeddings:
        """Vectors for ``request`` in input order; stored too when it names a collection.
        ``ticket``: its traffic class, job and deadline (from the task's message)."""
        encoder = self.select(request.model)
        vectors, _ = self._encode(request, encoder, ticket)
        if request.collection:
            self.save(request, vectors, encoder=encoder)
        return vectors

    def _encode(
        self, request: EmbedRequest, encoder: Encoder, ticket: Ticket
    ) -> tuple[Embeddings, int]:
        """Vectors (and how many came from the cache) through the model's batcher."""
        if not request.texts:
            return Embeddings(np.zeros((0, encoder.dim), dtype=np.float32)), 0
        left = ticket.remaining_s()
        future = self.batchers[encoder.model_id].submit(
            request.texts,
            request.normalize,
            ticket.traffic,
            ticket.job,
            None if left is None else time.monotonic() + left,
        )
        try:
            result = future.result(timeout=self.settings.task_soft_time_limit_s)
        except FutureTimeout as exc:
            raise EncoderError("timed out waiting for the encoder") from exc
        truncated = sorted(set(result.truncated) | set(request.clipped))
        self._count(len(request.texts), result.cache_hits, len(truncated))
        if truncated:
            log.info(
                "%d of %d texts were truncated to the model's %d tokens (positions %s)",
                len(truncated),
                len(request.texts),
                encoder.max_seq_tokens,
                truncated[:10],
            )
        return Embeddings(result.vectors, truncated), result.cache_hits

    def _count(self, texts: int, hits: int, truncated: int) -> None:
        metrics.CACHE.labels("hit").inc(hits)
        metrics.CACHE.labels("miss").inc(texts - hits)
        metrics.TRUNCATED.inc(truncated)
        # Summed in process, written to Redis a few times a second (not once per task).
        worker_tally().add_cache(hits, texts - hits)

    def ingest(
        self, request: EmbedRequest, chunks: dict[str, int], ticket: Ticket = BULK
    ) -> dict[str, int]:
        """Store documents, skipping those stored with the same text, model, metadata,
        parent and chunk (or stored by a newer request).

        ``chunks`` maps a parent id to its number of chunks: stale chunks past it go.
        Returns counts only (never vectors).
        """
        assert request.collection is not None and request.ids is not None
        encoder = self.select(request.model)
        version = request.version or now_version()
        hashes = [content_hash(text) for text in request.texts]
        prints = self._fingerprints(request, hashes, encoder.model_id)
        current = self.store.mark_current(request.collection, prints, version)
        todo = [i for i, doc_id in enumerate(request.ids) if doc_id not in current]
        subset = _subset(request, todo)
        vectors, cache_hits = self._encode(subset, encoder, ticket)
        if todo:
            self.save(subset, vectors, [hashes[i] for i in todo], version, encoder)
        for parent, count in chunks.items():
            self.store.delete_chunks(request.collection, parent, count, version)
        return {
            "received": len(request.texts),
            "skipped": len(request.texts) - len(todo),
            "embedded": len(todo) - cache_hits,
            "cached": cache_hits,
            "stored": len(todo),
            "truncated": len(vectors.truncated),
        }

    def _fingerprints(
        self, request: EmbedRequest, hashes: list[str], model_id: str
    ) -> list[Fingerprint]:
        """What each document would be stored as, but its vector."""
        assert request.ids is not None
        return [
            Fingerprint(
                id=doc_id,
                content_hash=hashes[i],
                model=model_id,
                meta_hash=meta_hash(
                    request.metadata[i] if request.metadata else None,
                    request.parent_ids[i] if request.parent_ids else None,
                    request.chunk_indexes[i] if request.chunk_indexes else None,
                ),
            )
            for i, doc_id in enumerate(request.ids)
        ]

    def save(
        self,
        request: EmbedRequest,
        vectors: Embeddings,
        hashes: list[str] | None = None,
        version: int | None = None,
        encoder: Encoder | None = None,
    ) -> int:
        """Upsert the request's items; ids default to the content hash of each text.
        ``version`` (default: the request's, else now) orders writes of the same item.
        ``encoder`` made the vectors (default: the default model's); a collection bound to
        another model refuses them (:class:`~embedq.errors.CollectionModelError`)."""
        assert request.collection is not None
        model_id = (encoder or self.encoder).model_id
        hashes = hashes or [content_hash(t) for t in request.texts]
        ids = request.ids or hashes
        metadata = request.metadata or [{}] * len(ids)
        cut = set(vectors.truncated)
        version = version or request.version or now_version()
        # Repeated texts without ids share one content-hash id: keep the last occurrence.
        latest = {item_id: i for i, item_id in enumerate(ids)}
        items = [
            Item(
                collection=request.collection,
                id=item_id,
                text=request.texts[i],
                vector=np.asarray(vectors[i]),
                model=model_id,
                content_hash=hashes[i],
                metadata=metadata[i],
                truncated=i in cut,
                parent_id=request.parent_ids[i] if request.parent_ids else None,
                chunk_index=request.chunk_indexes[i] if request.chunk_indexes else None,
                version=version,
            )
            for item_id, i in latest.items()
        ]
        return self.store.upsert(items)

    def close(self) -> None:
        """Drain the batchers and close the store."""
        for batcher in self.batchers.values():
            batcher.close()
        if self._store is not None:
            self._store.close()


def _subset(request: EmbedRequest, keep: list[int]) -> EmbedRequest:
    def pick(values: list[Any] | None) -> list[Any] | None:
        return None if values is None else [values[i] for i in keep]

    position = {old: new for new, old in enumerate(keep)}
    return replace(
        request,
        texts=[request.texts[i] for i in keep],
        ids=pick(request.ids),
        metadata=pick(request.metadata),
        parent_ids=pick(request.parent_ids),
        chunk_indexes=pick(request.chunk_indexes),
        clipped=tuple(position[i] for i in request.clipped if i in position),
    )


_lock = threading.Lock()
_runtime: Runtime | None = None


def current_runtime() -> Runtime | None:
    """This process's runtime if one was built (never builds one)."""
    return _runtime


def get_runtime() -> Runtime:
    """This process's runtime, built on first call (the model loads here, never per task)."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = Runtime(get_settings())
        return _runtime


def close_runtime() -> None:
    """Close this process's runtime, if one was built."""
    global _runtime
    with _lock:
        if _runtime is not None:
            _runtime.close()
            _runtime = None
