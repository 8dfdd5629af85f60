"""The gpu queue's encoder: CUDA, half precision, overlapped batches. Skips without CUDA
(CI has none)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedq.encode.torch_backend import TorchEncoder, gpu_dtype
from embedq.errors import ConfigurationError
from embedq.settings import Settings
from embedq.worker.batcher import encode_all
from tests.helpers import load_pydoc

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_gpu_dtype_names_are_checked():
    assert gpu_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ConfigurationError, match="EMBEDQ_GPU_DTYPE='fp8'"):
        gpu_dtype("fp8")


@needs_cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_half_precision_vectors_match_fp32_raw_encode(raw_model, dtype):
    encoder = TorchEncoder(Settings(device="cuda", gpu_dtype=dtype))
    assert next(encoder.model.parameters()).dtype == gpu_dtype(dtype)
    texts = [d["text"] for d in load_pydoc()[:512]]
    tok = encoder.tokenize(texts)
    ours = encode_all(encoder, tok, True, encoder.max_batch_tokens, 256).vectors
    raw = raw_model.encode(texts, normalize_embeddings=True)
    cosine = np.sum(ours * raw, axis=1)
    print(f"\n{dtype}: min cosine {cosine.min():.5f}, mean {cosine.mean():.6f}")
    assert cosine.min() >= 0.999
