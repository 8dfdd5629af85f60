"""The int8 ONNX CPU backend: quality gate on SICK, closeness to fp32, cached export."""

from __future__ import annotations

import numpy as np
import pytest

from embedq.encode.factory import create_encoder
from embedq.errors import ConfigurationError
from embedq.settings import Settings
from embedq.worker.batcher import encode_all
from tests.helpers import load_pydoc, load_sick

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")


@pytest.fixture(scope="module")
def int8(onnx_data_dir):
    return create_encoder(Settings(cpu_backend="onnx-int8", data_dir=onnx_data_dir))


@pytest.fixture(scope="module")
def fp32():
    return create_encoder(Settings(cpu_backend="torch"))


def _embed(encoder, texts):
    tok = encoder.tokenize(texts)
    return encode_all(encoder, tok, True, encoder.max_batch_tokens, 256).vectors


def _spearman(x, y):
    rank = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731
    return float(np.corrcoef(rank(x), rank(y))[0, 1])


def test_sick_quality_gate_keeps_995_permille_of_fp32(int8, fp32):
    pairs = load_sick()
    # Each distinct sentence is encoded once (about half of the 9,854 are repeats).
    unique = list(dict.fromkeys(s for p in pairs for s in p[:2]))
    row = {text: i for i, text in enumerate(unique)}
    a, b = [row[p[0]] for p in pairs], [row[p[1]] for p in pairs]
    gold = np.array([p[2] for p in pairs])
    scores = {}
    for name, encoder in (("fp32", fp32), ("int8", int8)):
        vectors = _embed(encoder, unique)
        scores[name] = _spearman((vectors[a] * vectors[b]).sum(1), gold)
    print(f"SICK Spearman fp32 {scores['fp32']:.4f} int8 {scores['int8']:.4f}")
    assert scores["int8"] >= 0.995 * scores["fp32"]


def test_int8_vectors_stay_close_to_fp32(int8, fp32):
    texts = [d["text"] for d in load_pydoc()[:300]]
    cos = (_embed(int8, texts) * _embed(fp32, texts)).sum(1)
    assert cos.mean() >= 0.97
    assert int8.model_id == f"{fp32.model_id}+int8"  # never mixed in cache or store


def test_the_export_is_cached_per_model(int8, onnx_data_dir):
    files = list((onnx_data_dir / "onnx" / int8.model_id).glob("model.int8.onnx"))
    assert len(files) == 1
    before = files[0].stat().st_mtime_ns
    again = create_encoder(Settings(cpu_backend="onnx-int8", data_dir=onnx_data_dir))
    assert again.dim == 384 and files[0].stat().st_mtime_ns == before


def test_unknown_backend_is_a_named_error():
    with pytest.raises(ConfigurationError, match="EMBEDQ_CPU_BACKEND"):
        create_encoder(Settings(cpu_backend="tpu"))
