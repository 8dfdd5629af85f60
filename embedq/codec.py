"""The wire format: msgpack, with numpy arrays carried as raw float32 bytes.

Registered with kombu as ``embedq-msgpack``. A 384-dim vector costs 1,536 bytes instead of
about 7,500 as JSON text, and ``.get()`` hands the caller an :class:`Embeddings` array.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime
from typing import Any

import msgpack
import numpy as np
from kombu.serialization import register

CONTENT_TYPE = "application/x-embedq-msgpack"
SERIALIZER = "embedq-msgpack"
_EXT_NDARRAY = 1
_EXT_EMBEDDINGS = 2


class Embeddings(np.ndarray):
    """A float32 array of shape (texts, dim), one row per input text, in input order.

    ``truncated`` lists the input positions whose text was cut to the model's max tokens.
    """

    truncated: tuple[int, ...]

    def __new__(cls, vectors: Any, truncated: Iterable[int] = ()) -> Embeddings:
        """Wrap ``vectors`` (any array-like) as float32 embeddings."""
        obj = np.ascontiguousarray(vectors, dtype=np.float32).view(cls)
        obj.truncated = tuple(int(i) for i in truncated)
        return obj

    def __array_finalize__(self, obj: Any) -> None:
        # Views of the same shape keep the flags; slices and reshapes drop them.
        same = obj is not None and getattr(obj, "shape", None) == self.shape
        self.truncated = getattr(obj, "truncated", ()) if same else ()

    def __repr__(self) -> str:
        """A short preview: Celery reprs every task result, and numpy's full repr of one
        384-float row costs ~2 ms of CPU (with the GIL) per task."""
        if self.ndim != 2 or not self.size:
            return f"Embeddings(shape={self.shape})"
        first = ", ".join(f"{v:.4f}" for v in np.asarray(self[0, :3]))
        cut = f", truncated={list(self.truncated[:5])}" if self.truncated else ""
        return f"Embeddings(shape={self.shape}, first=[{first}, ...]{cut})"


def _default(obj: Any) -> Any:
    if isinstance(obj, Embeddings):
        payload = [list(obj.shape), np.asarray(obj).tobytes(), list(obj.truncated)]
        return msgpack.ExtType(_EXT_EMBEDDINGS, msgpack.packb(payload))
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        payload = [arr.dtype.str, list(arr.shape), arr.tobytes()]
        return msgpack.ExtType(_EXT_NDARRAY, msgpack.packb(payload))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, datetime | date):
        return obj.isoformat()
    if isinstance(obj, tuple | set | frozenset):
        return list(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_EMBEDDINGS:
        shape, raw, truncated = msgpack.unpackb(data)
        return Embeddings(np.frombuffer(raw, dtype=np.float32).reshape(shape), truncated)
    if code == _EXT_NDARRAY:
        dtype, shape, raw = msgpack.unpackb(data)
        return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()
    return msgpack.ExtType(code, data)


def dumps(obj: Any) -> bytes:
    """Serialize ``obj`` (msgpack; numpy arrays as raw bytes)."""
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def loads(data: bytes) -> Any:
    """Inverse of :func:`dumps`."""
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def register_serializer() -> None:
    """Make ``embedq-msgpack`` known to kombu (idempotent)."""
    register(SERIALIZER, dumps, loads, content_type=CONTENT_TYPE, content_encoding="binary")
