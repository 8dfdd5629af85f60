"""Compact vectors (EMBEDQ_VECTOR_DTYPE): the codec, the cache values and the store rows."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from embedq.codec import (
    decode_vector,
    decode_vectors,
    encode_vector,
    int8_scale,
    vector_dim,
    vector_dtype,
    vector_scale,
)
from embedq.errors import ConfigurationError
from embedq.search.build import build_index
from embedq.settings import Settings
from embedq.store.base import Item
from embedq.store.sql import SQLStore
from embedq.store.vectors import VectorFormat, calibration_name
from embedq.worker.cache import pack_vector, unpack_vector

DIM = 384


def _unit(n: int, seed: int = 0, spread: float = 1.0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return spread * v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize(
    ("dtype", "size", "tolerance"),
    [
        ("float32", 4 * DIM, 0.0),
        ("float16", 4 + 2 * DIM, 1e-3),
        ("int8", 8 + DIM, 2e-3),
    ],
)
def test_each_dtype_round_trips_within_its_precision(dtype, size, tolerance):
    vectors = _unit(20)
    scale = int8_scale(vectors) if dtype == "int8" else None
    blobs = [encode_vector(v, dtype, scale) for v in vectors]
    assert {len(b) for b in blobs} == {size}
    assert {vector_dtype(b) for b in blobs} == {dtype}
    assert {vector_dim(b) for b in blobs} == {DIM}
    decoded = decode_vectors(blobs, DIM)
    assert decoded.dtype == np.float32
    error = np.abs(decoded - vectors)
    # int8 clips the rarest components (past the 99.99th percentile) to refine the rest.
    assert np.quantile(error, 0.999) <= tolerance
    assert (np.sum(decoded * vectors, axis=1) / np.linalg.norm(decoded, axis=1)).min() > 0.9995
    np.testing.assert_array_equal(decode_vector(blobs[3]), decoded[3])


def test_old_float32_blobs_and_mixed_dtypes_decode_together():
    vectors = _unit(3, seed=1)
    legacy = vectors[0].tobytes()  # what embedq wrote before compact vectors
    blobs = [legacy, encode_vector(vectors[1], "float16"), encode_vector(vectors[2], "int8")]
    decoded = decode_vectors(blobs, DIM)
    np.testing.assert_array_equal(decoded[0], vectors[0])
    assert np.abs(decoded - vectors).max() < 3e-3


def test_as_stored_gives_the_compact_values_and_the_int8_step():
    vector = _unit(1, seed=2)[0]
    blob = encode_vector(vector, "int8", scale=0.002)
    codes = decode_vector(blob, as_stored=True)
    assert codes.dtype == np.int8
    assert vector_scale(blob) == pytest.approx(0.002)
    np.testing.assert_allclose(codes * vector_scale(blob), decode_vector(blob), rtol=1e-6)
    assert decode_vector(encode_vector(vector, "float16"), as_stored=True).dtype == np.float16


def test_int8_clips_components_beyond_its_scale_instead_of_wrapping():
    vector = np.zeros(DIM, dtype=np.float32)
    vector[:2] = (0.9, -0.9)
    decoded = decode_vector(encode_vector(vector, "int8", scale=0.001))
    assert decoded[0] == pytest.approx(0.127) and decoded[1] == pytest.approx(-0.127)


def test_cache_values_keep_the_truncated_flag_and_read_old_float32_entries():
    vector = _unit(1, seed=3)[0]
    for dtype in ("float32", "float16", "int8"):
        got, cut = unpack_vector(pack_vector(vector, True, dtype))
        assert cut and got.dtype == np.float32
        assert np.abs(got - vector).max() < 3e-3
    old = vector.tobytes() + b"\x00"
    got, cut = unpack_vector(old)
    assert not cut
    np.testing.assert_array_equal(got, vector)


def test_an_unknown_dtype_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigurationError, match="float64"):
        VectorFormat(SQLStore(f"sqlite:///{tmp_path / 's.db'}"), "float64")


def _items(collection: str, vectors: np.ndarray, start: int = 0) -> list[Item]:
    return [
        Item(collection, f"id-{start + i}", f"text {start + i}", v, "m@1", f"h{start + i}")
        for i, v in enumerate(vectors)
    ]


def test_a_store_switched_to_int8_reads_its_float32_rows_and_recalibrates_on_rebuild(
    db_url, tmp_path, redis_client
):
    collection = f"c-{uuid.uuid4().hex[:8]}"
    old, new = _unit(40, seed=4), _unit(40, seed=5, spread=2.0)
    SQLStore(db_url, Settings(vector_dtype="float32")).upsert(_items(collection, old))
    store = SQLStore(db_url, Settings(vector_dtype="int8"))
    store.upsert(_items(collection, new, start=40))
    # No calibration before: the first int8 batch set the collection's scale.
    first = store.blob_version(calibration_name(collection))
    assert first and first[1]["scale"] == pytest.approx(int8_scale(new))
    got = {item.id: item.vector for item in store.get(collection, ["id-0", "id-41"])}
    np.testing.assert_array_equal(got["id-0"], old[0])
    assert got["id-41"].dtype == np.float32 and np.abs(got["id-41"] - new[1]).max() < 5e-3
    snap = store.snapshot(collection)
    assert snap.vectors.shape == (80, DIM)
    _, meta = build_index(store, collection, tmp_path, client=redis_client)
    rebuilt = store.blob_version(calibration_name(collection))
    assert rebuilt and rebuilt[0] == first[0] + 1
    assert rebuilt[1]["scale"] == pytest.approx(meta["int8_scale"])
    assert rebuilt[1]["scale"] == pytest.approx(int8_scale(snap.vectors))
    store.close()
