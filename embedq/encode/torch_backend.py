"""PyTorch backend of :class:`~embedq.encode.base.Encoder` (sentence-transformers model)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from embedq.encode.base import Encoder, Tokenized
from embedq.encode.device import batch_tokens_for, memory_cap_bytes, pick_device
from embedq.encode.models import fingerprint, resolve_model_path
from embedq.encode.tokenize import pad, tokenize_texts
from embedq.errors import ConfigurationError, ModelLoadError
from embedq.settings import Settings

try:
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer
except ImportError as exc:  # pragma: no cover - both are core dependencies
    raise ImportError("the torch encoder needs: pip install torch sentence-transformers") from exc

log = logging.getLogger(__name__)
# Weight-loading progress bars would land in every worker's log as WARNING lines.
transformers.utils.logging.disable_progress_bar()


GPU_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def gpu_dtype(name: str) -> torch.dtype:
    """The torch dtype of ``EMBEDQ_GPU_DTYPE``."""
    if name not in GPU_DTYPES:
        raise ConfigurationError(f"EMBEDQ_GPU_DTYPE={name!r}: use one of {sorted(GPU_DTYPES)}")
    return GPU_DTYPES[name]


class TorchEncoder(Encoder):
    """A sentence-transformers model run by PyTorch on cuda, mps or cpu."""

    def __init__(self, settings: Settings) -> None:
        path = resolve_model_path(settings.model)
        self.name = settings.model
        self.device = pick_device(settings.device)
        try:
            self.model = SentenceTransformer(str(path), device=self.device, local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"could not load model from {path}: {exc}") from exc
        self.model.eval()
        if self.device.startswith("cuda"):
            # Half precision doubles the tensor-core rate; vectors stay within cosine 0.999.
            self.model.to(gpu_dtype(settings.gpu_dtype))
        self.tokenizer = self.model.tokenizer
        self.max_seq_tokens = int(self.model.max_seq_length)
        self.dim = int(self.model.get_embedding_dimension())
        self.model_id = f"{Path(settings.model).name}@{fingerprint(path)}"
        self.memory_cap = memory_cap_bytes(settings, self.device)
        self.batch_tokens_setting = batch_tokens_for(settings, self.device)
        self._config = self.model[0].auto_model.config
        log.info("Loaded %s on %s (dim %d)", self.model_id, self.device, self.dim)

    def tokenize(self, texts: list[str]) -> Tokenized:
        """Fast-tokenizer ids cut to max tokens; overflow tells which texts were cut."""
        return tokenize_texts(self.tokenizer, texts, self.max_seq_tokens)

    def embed_ids(self, ids: list[list[int]], normalize: bool) -> np.ndarray:
        """One forward pass over a padded batch."""
        return self.fetch(self.launch(ids, normalize))

    def launch(self, ids: list[list[int]], normalize: bool) -> Any:
        """Start a forward pass; on cuda it runs while the caller pads the next batch."""
        input_ids, mask = pad(ids, self.tokenizer.pad_token_id or 0)
        features = {
            "input_ids": self._to_device(input_ids),
            "attention_mask": self._to_device(mask),
        }
        with torch.inference_mode():
            out = self.model(features)["sentence_embedding"].float()
            if normalize:
                out = torch.nn.functional.normalize(out, p=2, dim=-1)
        return out

    def fetch(self, handle: Any) -> np.ndarray:
        """Wait for a launched pass and return its vectors."""
        return handle.cpu().numpy()

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.startswith("cuda"):
            # Pinned host memory lets the copy overlap with the kernels already queued.
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def bytes_per_token(self, seq_len: int) -> int:
        """Activations of one layer (the peak: layers run one after another), times two."""
        cfg = self._config
        elem = 2 if next(self.model.parameters()).dtype in (torch.float16, torch.bfloat16) else 4
        floats = (
            2 * cfg.intermediate_size + 4 * cfg.hidden_size + 2 * cfg.num_attention_heads * seq_len
        )
        return 2 * elem * floats
