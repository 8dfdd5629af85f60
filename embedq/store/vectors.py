"""How a store writes vectors (``EMBEDQ_VECTOR_DTYPE``): float32, float16 or int8.

int8 rows use their collection's scale, calibrated from the collection's stored vectors when
its index is rebuilt (and from the first batch written before that), published as the
metadata of the blob ``calibration:int8:<collection>`` so every writer uses the same one.
Every row carries its own scale, so rows written before a recalibration still read right.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial

import numpy as np
from cachetools import TTLCache

from embedq.codec import VECTOR_DTYPES, encode_vector, int8_scale
from embedq.errors import ConfigurationError
from embedq.store.base import BlobStore

log = logging.getLogger(__name__)

# A recalibration published by a rebuild reaches every writer within this long.
SCALE_TTL_S = 60.0
SCALES_KEPT = 1024


def calibration_name(collection: str) -> str:
    """Blob whose metadata holds ``collection``'s int8 scale."""
    return f"calibration:int8:{collection}"


class VectorFormat:
    """The dtype one store writes, and each collection's int8 scale (cached a minute)."""

    def __init__(self, blobs: BlobStore, dtype: str) -> None:
        if dtype not in VECTOR_DTYPES:
            raise ConfigurationError(
                f"EMBEDQ_VECTOR_DTYPE={dtype!r}: use one of {', '.join(VECTOR_DTYPES)}"
            )
        self.blobs = blobs
        self.dtype = dtype
        self._scales: TTLCache[str, float] = TTLCache(maxsize=SCALES_KEPT, ttl=SCALE_TTL_S)
        self._lock = threading.Lock()

    def packer(self, collection: str, vectors: np.ndarray | None) -> Callable[[np.ndarray], bytes]:
        """Encodes vectors of ``collection`` (``vectors``: the batch about to be written,
        needed by int8 only)."""
        scale = self.scale(collection, vectors) if vectors is not None else None
        return partial(encode_vector, dtype=self.dtype, scale=scale)

    def scale(self, collection: str, batch: np.ndarray) -> float:
        """The collection's published scale; none yet: calibrated from ``batch`` and published."""
        with self._lock:
            cached = self._scales.get(collection)
        if cached is not None:
            return cached
        published = self.blobs.blob_version(calibration_name(collection))
        if published and published[1].get("scale"):
            return self._remember(collection, float(published[1]["scale"]))
        return self.calibrate(collection, batch)

    def calibrate(self, collection: str, vectors: np.ndarray) -> float:
        """Compute ``collection``'s int8 scale from ``vectors`` and publish it."""
        scale = int8_scale(vectors)
        meta = {"scale": scale, "count": len(vectors), "dtype": "int8"}
        self.blobs.put_blob(calibration_name(collection), b"", meta)
        log.info("collection %s: int8 scale %.6g from %d vectors", collection, scale, len(vectors))
        return self._remember(collection, scale)

    def _remember(self, collection: str, scale: float) -> float:
        with self._lock:
            self._scales[collection] = scale
        return scale
