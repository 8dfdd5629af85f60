"""ONNX Runtime int8 backend of :class:`~embedq.encode.base.Encoder`, for CPU workers.

On first use the model is exported to ONNX (mean pooling included), fused by onnxruntime's
transformer optimizer, and quantized dynamically to int8 with per-channel weight scales
(per-tensor scales lost 1% of SICK quality; per-channel keeps 99.9%). The files are cached
under ``EMBEDQ_DATA_DIR/onnx/<model id>/``, so each model is converted once per host.

Dynamic quantization scales activations per batch, so an int8 vector depends slightly on
the texts batched with it (cosine ~0.99 between the same text alone and beside a long one;
the fp32 export gives 1.0). Use ``EMBEDQ_CPU_BACKEND=torch`` where vectors must be exact.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np

from embedq.encode.base import Encoder, Tokenized
from embedq.encode.device import batch_tokens_for, memory_cap_bytes
from embedq.encode.tokenize import pad, tokenize_texts
from embedq.encode.torch_backend import TorchEncoder
from embedq.errors import ConfigurationError, ModelLoadError
from embedq.settings import Settings

try:
    import onnx
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ImportError(
        "the onnx-int8 backend needs onnx and onnxruntime (installed with embedq); "
        "or set EMBEDQ_CPU_BACKEND=torch"
    ) from exc

log = logging.getLogger(__name__)


class _MeanPooled(torch.nn.Module):
    """The transformer plus mean pooling, as exported (normalizing happens after)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def _check_pooling(source: TorchEncoder) -> None:
    names = [type(m).__name__ for m in source.model]
    pooling = source.model[1] if len(names) > 1 else None
    mode = getattr(pooling, "pooling_mode", None) or getattr(
        getattr(pooling, "config", None), "pooling_mode", None
    )
    if names[:2] != ["Transformer", "Pooling"] or (mode not in (None, "mean")):
        raise ConfigurationError(
            f"onnx-int8 supports mean-pooled models; {source.name} is {names} ({mode}): "
            "use EMBEDQ_CPU_BACKEND=torch"
        )


def _export_fp32(wrapped: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        wrapped,
        (example, example),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["embedding"],
        dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}},
        opset_version=17,
        dynamo=False,
    )


def export_int8(source: TorchEncoder, folder: Path) -> Path:
    """Export, fuse and quantize ``source``'s model into ``folder``; returns the int8 file."""
    final = folder / "model.int8.onnx"
    if final.exists():
        return final
    log.info("exporting %s to int8 ONNX (once per host) into %s", source.model_id, folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    example = torch.ones((2, 16), dtype=torch.int64)
    wrapped = _MeanPooled(source.model[0].auto_model.eval())
    # The tracer warns about shapes it fixes; the dynamic axes below keep what matters.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _export_fp32(wrapped, example, tmp / "fp32.onnx")
    cfg = source.model[0].auto_model.config
    fused = optimizer.optimize_model(
        str(tmp / "fp32.onnx"),
        model_type="bert",
        num_heads=cfg.num_attention_heads,
        hidden_size=cfg.hidden_size,
    )
    fused.save_model_to_file(str(tmp / "fused.onnx"))
    quantize_dynamic(
        str(tmp / "fused.onnx"),
        str(tmp / "int8.onnx"),
        weight_type=QuantType.QInt8,
        per_channel=True,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    # Workers on one host may export at once: the rename makes one of them win whole.
    os.replace(tmp / "int8.onnx", final)
    for leftover in tmp.iterdir():
        leftover.unlink()
    tmp.rmdir()
    return final


class OnnxInt8Encoder(Encoder):
    """int8 ONNX Runtime on the CPU; tokenization as the torch backend does it."""

    def __init__(self, settings: Settings) -> None:
        source = TorchEncoder(settings.model_copy(update={"device": "cpu"}))
        _check_pooling(source)
        # Its own id: int8 vectors never answer (from cache or store) for exact fp32 ones.
        self.name, self.model_id = source.name, f"{source.model_id}+int8"
        self.dim, self.max_seq_tokens, self.device = source.dim, source.max_seq_tokens, "cpu"
        self.tokenizer = source.tokenizer
        self._normalize_always = any(type(m).__name__ == "Normalize" for m in source.model)
        self._config = source._config
        path = export_int8(source, settings.data_dir / "onnx" / self.model_id)
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        # ONNX Runtime's idle intra-op threads spin by default: between small batches they
        # burn the cores the task threads need (~2 ms of CPU per one-text task on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelLoadError(f"could not load {path}: {exc}") from exc
        self.memory_cap = memory_cap_bytes(settings, "cpu")
        self.batch_tokens_setting = batch_tokens_for(settings, "cpu-int8")
        # Only the tokenizer is kept: the fp32 torch model was needed for the export alone.
        del source
        log.info("Loaded %s as int8 ONNX from %s", self.model_id, path)

    def tokenize(self, texts: list[str]) -> Tokenized:
        """Same ids as the torch backend."""
        return tokenize_texts(self.tokenizer, texts, self.max_seq_tokens)

    def embed_ids(self, ids: list[list[int]], normalize: bool) -> np.ndarray:
        """One ONNX Runtime run over a padded batch."""
        input_ids, mask = pad(ids, self.tokenizer.pad_token_id or 0)
        out = self.session.run(None, {"input_ids": input_ids, "attention_mask": mask})[0]
        if normalize or self._normalize_always:
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out.astype(np.float32, copy=False)

    def bytes_per_token(self, seq_len: int) -> int:
        """Activations stay fp32 between int8 matmuls: as the torch estimate."""
        cfg = self._config
        floats = (
            2 * cfg.intermediate_size + 4 * cfg.hidden_size + 2 * cfg.num_attention_heads * seq_len
        )
        return 8 * floats
