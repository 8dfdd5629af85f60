"""The wire format: msgpack, with numpy arrays carried as raw float32 bytes.

Registered with kombu as ``embedq-msgpack``. A 384-dim vector costs 1,536 bytes instead of
about 7,500 as JSON text, and ``.get()`` hands the caller an :class:`Embeddings` array.

Also the compact vector format of store rows and cache values (``EMBEDQ_VECTOR_DTYPE``):
float32, float16 or int8, each blob saying which it is, always decoded to float32.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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


# --- Compact vectors (store rows and cache values) -------------------------------------
# float32 is stored bare (4 bytes a dimension), as embedq always wrote it. A compact vector
# starts with a 4-byte tag that reads as a float32 NaN (payload "Q" and a type byte): no
# stored vector holds NaN, so an old bare float32 row is never mistaken for a tagged one.
VECTOR_DTYPES = ("float32", "float16", "int8")
_TAG_FLOAT16 = bytes([0x10, 0x51, 0xC5, 0x7F])
_TAG_INT8 = bytes([0x08, 0x51, 0xC5, 0x7F])
_TAG_BYTES = 4
# int8 rows carry their scale (float32) after the tag: a row reads the same after the
# collection is recalibrated.
_INT8_HEAD = _TAG_BYTES + 4
# Calibration clips the rarest components: a finer step for the rest is worth more.
INT8_QUANTILE = 0.9999


def vector_dtype(blob: bytes) -> str:
    """The dtype ``blob`` was encoded with (by its tag; untagged blobs are float32)."""
    tag = bytes(blob[:_TAG_BYTES])
    if tag == _TAG_FLOAT16 and len(blob) % 2 == 0:
        return "float16"
    if tag == _TAG_INT8 and len(blob) >= _INT8_HEAD:
        return "int8"
    return "float32"


def vector_dim(blob: bytes) -> int:
    """Dimensions of the vector in ``blob``, whatever its dtype."""
    kind = vector_dtype(blob)
    if kind == "float16":
        return (len(blob) - _TAG_BYTES) // 2
    if kind == "int8":
        return len(blob) - _INT8_HEAD
    return len(blob) // 4


def int8_scale(vectors: np.ndarray, quantile: float = INT8_QUANTILE) -> float:
    """The int8 step for ``vectors``: their ``quantile`` absolute component over 127."""
    values = np.abs(np.asarray(vectors, dtype=np.float32)).ravel()
    if not values.size:
        return 1.0 / 127
    # The 1.0 quantile is the maximum: no sort (a cached value's own scale, once per text).
    top = float(values.max() if quantile >= 1.0 else np.quantile(values, quantile))
    return top / 127 if top > 0 else 1.0 / 127


def encode_vector(vector: np.ndarray, dtype: str = "float32", scale: float | None = None) -> bytes:
    """``vector`` as stored bytes in ``dtype``; int8 uses ``scale`` (default: its own)."""
    values = np.asarray(vector, dtype=np.float32).ravel()
    if dtype == "float32":
        return values.tobytes()
    if dtype == "float16":
        return _TAG_FLOAT16 + values.astype(np.float16).tobytes()
    if dtype == "int8":
        step = np.float32(scale if scale else int8_scale(values, 1.0))
        codes = np.clip(np.rint(values / step), -127, 127).astype(np.int8)
        return _TAG_INT8 + step.tobytes() + codes.tobytes()
    raise ValueError(f"unknown vector dtype {dtype!r}: use one of {', '.join(VECTOR_DTYPES)}")


def decode_vector(blob: bytes, as_stored: bool = False) -> np.ndarray:
    """The float32 vector in ``blob`` (any dtype embedq wrote). ``as_stored``: the stored
    values instead (float16, or int8 codes, whose step :func:`vector_scale` gives)."""
    kind = vector_dtype(blob)
    if kind == "float16":
        half = np.frombuffer(blob, dtype=np.float16, offset=_TAG_BYTES)
        return half if as_stored else half.astype(np.float32)
    if kind == "int8":
        codes = np.frombuffer(blob, dtype=np.int8, offset=_INT8_HEAD)
        step = np.frombuffer(blob, dtype=np.float32, count=1, offset=_TAG_BYTES)[0]
        return codes if as_stored else codes.astype(np.float32) * step
    return np.frombuffer(blob, dtype=np.float32)


def vector_scale(blob: bytes) -> float:
    """The int8 step of ``blob`` (1.0 for float dtypes)."""
    if vector_dtype(blob) != "int8":
        return 1.0
    return float(np.frombuffer(blob, dtype=np.float32, count=1, offset=_TAG_BYTES)[0])


def decode_vectors(blobs: Sequence[bytes], dim: int) -> np.ndarray:
    """Rows of float32 vectors, one per blob; rows that share a layout decode at once."""
    # Past 4 dimensions the three layouts differ in length: one length means one dtype.
    if blobs and dim > 4 and len({len(b) for b in blobs}) == 1:
        return _decode_uniform(b"".join(blobs), len(blobs), vector_dtype(blobs[0]), dim)
    out = np.empty((len(blobs), dim), dtype=np.float32)
    for i, blob in enumerate(blobs):
        out[i] = decode_vector(blob)
    return out


def _decode_uniform(joined: bytes, rows: int, kind: str, dim: int) -> np.ndarray:
    """Blobs of one dtype and width, joined, decoded as one array (no per-row work)."""
    raw = np.frombuffer(joined, dtype=np.uint8).reshape(rows, -1)
    if kind == "float32":
        return raw.view(np.float32).reshape(rows, dim)
    if kind == "float16":
        return raw[:, _TAG_BYTES:].copy().view(np.float16).astype(np.float32).reshape(rows, dim)
    scales = raw[:, _TAG_BYTES:_INT8_HEAD].copy().view(np.float32)
    codes = raw[:, _INT8_HEAD:].view(np.int8).astype(np.float32)
    return (codes * scales).reshape(rows, dim)
