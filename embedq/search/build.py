"""Building and publishing the per-collection indexes.

A build holds its collection's lock (:mod:`embedq.search.lock`), reads a snapshot of the
store, indexes it into a temp file, checks recall@10 against exact search on a sample, and
publishes the file with its sha256 to the store as a new version, unless a version read later
was published meanwhile. Any host with the same store loads the latest version
(:mod:`embedq.search.loader`), after checking its sha256.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

from embedq.broker.client import shared_client
from embedq.errors import (
    IndexBuildBusyError,
    IndexIntegrityError,
    IndexQualityError,
    StaleVersionError,
    StoreError,
)
from embedq.search.base import Index, normalize
from embedq.search.exact import RecallCheck, recall_check
from embedq.search.factory import create_index
from embedq.search.lock import BuildLock
from embedq.search.queries import MIN_QUERIES, recent, sampled
from embedq.store.base import CollectionState, Snapshot, Store

log = logging.getLogger(__name__)


INDEX_KIND = "hnsw"


RECALL_TARGET = 0.98


# A build tunes to this much above the target: 200 queries measure recall to about
# +-0.005, and other queries of the same kind must get the target too.
TUNING_MARGIN = 0.005


# Stored vectors held out for the check when the collection has too few recent queries.
RECALL_SAMPLE = 200


# Query breadths tried, narrowest first: the first that reaches the target is kept.
EF_STEPS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def blob_name(collection: str) -> str:
    """Store key under which a collection's index is published."""
    return f"index:{INDEX_KIND}:{collection}"


def index_dir(data_dir: Path, collection: str) -> Path:
    """Local folder of one collection's index files (readable name + hash: never shared)."""
    digest = hashlib.sha256(collection.encode()).hexdigest()[:8]
    return data_dir / "index" / f"{re.sub(r'[^A-Za-z0-9_-]', '_', collection)[:64]}-{digest}"


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temp file, fsync, then os.replace: readers see the old or the new file.

    The temp file's name is unique (``mkstemp``), so concurrent writers never share one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
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
    """Inverse of :func:`pack_blob`; raises :class:`IndexIntegrityError` on a bad layout."""
    if len(data) < 16:
        raise IndexIntegrityError(f"index blob of {len(data)} bytes has no header")
    size, count = (int(n) for n in np.frombuffer(data[:16], dtype=np.int64))
    body = 16 + size
    if size < 0 or count < 0 or len(data) != body + 16 * count:
        raise IndexIntegrityError(f"index blob of {len(data)} bytes: header ({size}, {count})")
    pks = np.frombuffer(data[body : body + 8 * count], dtype=np.int64)
    stamps = np.frombuffer(data[body + 8 * count :], dtype=np.int64)
    return data[16:body], pks, stamps


def sha256(data: bytes) -> str:
    """The checksum published with each index version and checked before it is loaded."""
    return hashlib.sha256(data).hexdigest()


def build_index(
    store: Store,
    collection: str,
    data_dir: Path,
    state: CollectionState | None = None,
    client: redis.Redis | None = None,
) -> tuple[int, dict[str, Any]]:
    """Build, check and publish the index of ``collection``; returns (version, metadata).

    Holds the collection's build lock (in Redis, ``client`` or the shared one) throughout:
    raises :class:`IndexBuildBusyError` if another build holds it, and
    :class:`StaleVersionError` if a version read later was published meanwhile.
    ``state`` is the collection's state read before the snapshot (read here if not given).
    """
    with BuildLock(client or shared_client(), collection) as lock:
        return _build_locked(store, collection, data_dir, state, lock)


def _build_locked(
    store: Store,
    collection: str,
    data_dir: Path,
    state: CollectionState | None,
    lock: BuildLock,
) -> tuple[int, dict[str, Any]]:
    if state is None:
        state = next((s for s in store.states() if s.collection == collection), None)
    snap = store.snapshot(collection)
    # int8 stores: writes from now on use a scale fitted to everything stored so far.
    scale = store.calibrate(collection, snap.vectors)
    started = time.perf_counter()
    dim = snap.vectors.shape[1] if len(snap.pks) else 1
    index = create_index(INDEX_KIND, dim)
    queries = recent(lock.client, collection, dim)
    tuning = _build_tuned(index, snap, queries if len(queries) >= MIN_QUERIES else None)
    data = _packed(index, snap, index_dir(data_dir, collection))
    meta = {
        "state": state.token if state else "0:-",
        "built_at": snap.taken_at.isoformat(),
        "count": len(snap.pks),
        "dim": dim,
        "ef": index.ef or None,
        **tuning,
        "build_s": round(time.perf_counter() - started, 3),
        "sha256": sha256(data),
    }
    if scale is not None:
        meta["int8_scale"] = scale
    lock.check()  # a build whose lock expired may race a newer one: publish nothing
    version = store.put_blob(blob_name(collection), data, meta, taken_at=snap.taken_at)
    write_atomically(index_dir(data_dir, collection) / f"v{version}.blob", data)
    log.info("index %s v%d: %s", collection, version, meta)
    return version, meta


def _packed(index: Index, snap: Snapshot, folder: Path) -> bytes:
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix=".build-", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        index.save(tmp)
        return pack_blob(tmp.read_bytes(), snap.pks, snap.stamps)
    finally:
        tmp.unlink(missing_ok=True)


def _build_tuned(index: Index, snap: Snapshot, queries: np.ndarray | None) -> dict[str, Any]:
    """Build ``index`` from the snapshot with the narrowest ``ef`` whose recall@10 reaches
    the target on queries it never holds: the collection's recent queries when given, else
    stored vectors held out (up to ``RECALL_SAMPLE``, a tenth of the collection at most),
    indexed only once the check is done. What it was tuned on, and the recall it measured."""
    unit = normalize(snap.vectors)
    if queries is not None:
        index.build(snap.pks, snap.vectors)
        recall = _tune_ef(index, recall_check(unit, snap.pks, queries), unit, snap.pks)
        if recall < RECALL_TARGET:
            # What users ask defines the target: the widest search is the best there is.
            log.warning(
                "recall@10 %.3f < %s even at ef %d on recent queries",
                recall,
                RECALL_TARGET,
                index.ef,
            )
        return {"recall_at_10": recall, "tuned_on": "queries", "tuned_queries": len(queries)}
    # A fixed seed: rebuilds of the same collection hold out alike.
    count = min(RECALL_SAMPLE, len(snap.pks) // 10)
    held = np.zeros(len(snap.pks), dtype=bool)
    held[np.random.default_rng(0).permutation(len(snap.pks))[:count]] = True
    pks, kept = snap.pks[~held], unit[~held]
    index.build(pks, snap.vectors[~held])
    recall = _tune_ef(index, recall_check(kept, pks, unit[held]), kept, pks)
    if recall < RECALL_TARGET:
        raise IndexQualityError(
            f"recall@10 {recall:.3f} < {RECALL_TARGET} even at ef={EF_STEPS[-1]}; old index kept"
        )
    index.add(snap.pks[held], snap.vectors[held])
    return {"recall_at_10": recall, "tuned_on": "held_out", "tuned_queries": count}


def _tune_ef(index: Index, check: RecallCheck, unit: np.ndarray, labels: np.ndarray) -> float:
    """Raise ``index.ef`` through ``EF_STEPS`` until ``check`` reaches the target (with its
    margin); the recall there (rounded), or at the widest ef when none does."""
    recall = 0.0
    for ef in EF_STEPS:
        index.ef = ef
        recall = check.recall(index, unit, labels)
        if recall >= RECALL_TARGET + TUNING_MARGIN:
            break
    return round(recall, 4)


def rebuild_changed(
    store: Store, data_dir: Path, only: str | None = None, client: redis.Redis | None = None
) -> dict[str, Any]:
    """Rebuild the index of every collection whose contents changed since its last build,
    or whose index was tuned on held-out vectors while enough recent queries are now
    sampled to tune it on them.

    Each collection is reported on its own: its build's metadata, ``unchanged``,
    ``skipped: <why>`` (another build holds it, or published newer) or ``failed: <why>``
    (its old index stays published); one failure never stops the others.
    """
    report: dict[str, Any] = {}
    client = client or shared_client()
    for state in store.states():
        if only and state.collection != only:
            continue
        if _is_current(store, state, client):
            report[state.collection] = "unchanged"
            continue
        report[state.collection] = _rebuild(store, state, data_dir, client)
    return report


def _is_current(store: Store, state: CollectionState, client: redis.Redis) -> bool:
    published = store.blob_version(blob_name(state.collection))
    if not published or published[1].get("state") != state.token:
        return False
    # One LLEN: queries arrived since a build that had none to tune on.
    return published[1].get("tuned_on") != "held_out" or (
        sampled(client, state.collection) < MIN_QUERIES
    )


def _rebuild(
    store: Store, state: CollectionState, data_dir: Path, client: redis.Redis
) -> dict[str, Any] | str:
    name = state.collection
    try:
        with BuildLock(client, name) as lock:
            # Another build may have published this very state while this one waited.
            if _is_current(store, state, client):
                return "unchanged"
            return _build_locked(store, name, data_dir, state, lock)[1]
    except (IndexBuildBusyError, StaleVersionError) as exc:
        log.info("index %s not rebuilt here: %s", name, exc)
        return f"skipped: {exc}"
    # The previous version stays published and in use; the next run tries again.
    except (IndexQualityError, StoreError, OSError, RuntimeError, redis.RedisError) as exc:
        log.error("index %s not rebuilt (old index kept): %s", name, exc)
        return f"failed: {type(exc).__name__}: {exc}"
    # Whatever one collection's rows hold, the collections after it are still rebuilt.
    except Exception as exc:
        log.exception("index %s not rebuilt (old index kept)", name)
        return f"failed: {type(exc).__name__}: {exc}"
