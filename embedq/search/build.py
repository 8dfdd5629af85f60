"""Building and publishing the per-collection indexes.

A build reads a snapshot of the store, indexes it into a temp file, checks recall@10 against
exact search on a sample, and publishes the file to the store as a new version. Any host
with the same store loads the latest version (:mod:`embedq.search.loader`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from embedq.errors import IndexQualityError, StoreError
from embedq.search.base import Index
from embedq.search.exact import recall_at_k
from embedq.search.factory import create_index
from embedq.store.base import CollectionState, Store

log = logging.getLogger(__name__)


INDEX_KIND = "hnsw"


RECALL_TARGET = 0.98


RECALL_SAMPLE = 200


EF_STEPS = (64, 128, 256, 512)


def blob_name(collection: str) -> str:
    """Store key under which a collection's index is published."""
    return f"index:{INDEX_KIND}:{collection}"


def index_dir(data_dir: Path, collection: str) -> Path:
    """Local folder of one collection's index files (readable name + hash: never shared)."""
    digest = hashlib.sha256(collection.encode()).hexdigest()[:8]
    return data_dir / "index" / f"{re.sub(r'[^A-Za-z0-9_-]', '_', collection)[:64]}-{digest}"


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temp file, fsync, then os.replace: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk must not keep the half-written file
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def pack_blob(index_bytes: bytes, pks: np.ndarray, stamps: np.ndarray) -> bytes:
    """What is published: the index file, then each indexed row's key and update time."""
    head = np.array([len(index_bytes), len(pks)], dtype=np.int64).tobytes()
    return head + index_bytes + pks.astype(np.int64).tobytes() + stamps.astype(np.int64).tobytes()


def unpack_blob(data: bytes) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_blob`."""
    size, count = np.frombuffer(data[:16], dtype=np.int64)
    body = 16 + int(size)
    pks = np.frombuffer(data[body : body + 8 * int(count)], dtype=np.int64)
    stamps = np.frombuffer(data[body + 8 * int(count) :], dtype=np.int64)
    return data[16:body], pks, stamps


def build_index(
    store: Store, collection: str, data_dir: Path, state: CollectionState | None = None
) -> tuple[int, dict[str, Any]]:
    """Build, check and publish the index of ``collection``; returns (version, metadata).

    ``state`` is the collection's state read before the snapshot (read here if not given).
    """
    if state is None:
        state = next((s for s in store.states() if s.collection == collection), None)
    snap = store.snapshot(collection)
    started = time.perf_counter()
    dim = snap.vectors.shape[1] if len(snap.pks) else 1
    index = create_index(INDEX_KIND, dim)
    index.build(snap.pks, snap.vectors)
    recall = _tune_ef(index, snap.vectors, snap.pks)
    tmp = index_dir(data_dir, collection) / f".build-{os.getpid()}.tmp"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        index.save(tmp)
        data = pack_blob(tmp.read_bytes(), snap.pks, snap.stamps)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {
        "state": state.token if state else "0:-",
        "built_at": snap.taken_at.isoformat(),
        "count": len(snap.pks),
        "dim": dim,
        "ef": getattr(index, "ef", None),
        "recall_at_10": round(recall, 4),
        "build_s": round(time.perf_counter() - started, 3),
    }
    version = store.put_blob(blob_name(collection), data, meta)
    write_atomically(index_dir(data_dir, collection) / f"v{version}.blob", data)
    log.info("index %s v%d: %s", collection, version, meta)
    return version, meta


def _tune_ef(index: Index, vectors: Any, labels: Any) -> float:
    recall = 0.0
    for ef in EF_STEPS:
        index.ef = ef  # type: ignore[attr-defined]
        recall = recall_at_k(index, vectors, labels, RECALL_SAMPLE)
        if recall >= RECALL_TARGET:
            return recall
    raise IndexQualityError(
        f"recall@10 {recall:.3f} < {RECALL_TARGET} even at ef={EF_STEPS[-1]}; old index kept"
    )


def rebuild_changed(store: Store, data_dir: Path, only: str | None = None) -> dict[str, Any]:
    """Rebuild the index of every collection whose contents changed since its last build."""
    report: dict[str, Any] = {}
    for state in store.states():
        if only and state.collection != only:
            continue
        published = store.blob_version(blob_name(state.collection))
        if published and published[1].get("state") == state.token:
            report[state.collection] = "unchanged"
            continue
        try:
            report[state.collection] = build_index(store, state.collection, data_dir, state)[1]
        # The previous version stays published and in use; the next run tries again.
        except (IndexQualityError, StoreError, OSError, RuntimeError) as exc:
            log.error("index %s not rebuilt (old index kept): %s", state.collection, exc)
            report[state.collection] = f"failed: {type(exc).__name__}: {exc}"
    return report
