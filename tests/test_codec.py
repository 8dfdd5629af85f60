"""The wire format: raw float32 bytes inside msgpack."""

from __future__ import annotations

import json

import numpy as np

from embedq import codec
from embedq.codec import Embeddings


def test_embeddings_round_trip_with_truncation_flags():
    vectors = Embeddings(np.random.default_rng(0).random((3, 384)), truncated=[2])
    back = codec.loads(codec.dumps({"result": vectors, "status": "SUCCESS"}))["result"]
    assert isinstance(back, Embeddings)
    assert back.truncated == (2,)
    np.testing.assert_array_equal(back, vectors)


def test_plain_arrays_keep_dtype_and_shape():
    arr = np.arange(12, dtype=np.int16).reshape(3, 4)
    back = codec.loads(codec.dumps([arr]))[0]
    assert back.dtype == np.int16
    np.testing.assert_array_equal(back, arr)


def test_binary_is_four_times_smaller_than_json():
    vectors = Embeddings(np.random.default_rng(1).random((100, 384)))
    as_json = json.dumps(np.asarray(vectors).tolist()).encode()
    assert len(codec.dumps(vectors)) < len(as_json) / 4


def test_slices_drop_truncation_flags():
    vectors = Embeddings(np.zeros((3, 4)), truncated=[0])
    assert vectors[1:].truncated == ()
    assert vectors.copy().truncated == (0,)
