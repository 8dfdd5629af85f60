"""The ``Encoder`` seam: token ids in, vectors out, on one device. One module per backend."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedq.encode.models import model_matches
from embedq.errors import ModelLoadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tokenized:
    """Token ids per text (already cut to the model's max tokens) and which texts were cut."""

    ids: list[list[int]]
    truncated: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per text, special tokens included."""
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))


class Encoder(ABC):
    """Turns token ids into vectors on one device. Loaded once per worker process."""

    name: str
    model_id: str
    dim: int
    max_seq_tokens: int
    device: str
    memory_cap: int = 2**30
    batch_tokens_setting: int = 16384

    @abstractmethod
    def tokenize(self, texts: list[str]) -> Tokenized:
        """Token ids of ``texts``, each cut to ``max_seq_tokens``."""

    @abstractmethod
    def embed_ids(self, ids: list[list[int]], normalize: bool) -> np.ndarray:
        """Vectors (float32, one row per id list) for one batch."""

    def launch(self, ids: list[list[int]], normalize: bool) -> Any:
        """Start encoding one batch; :meth:`fetch` returns its vectors. Backends that can
        overlap (cuda) return before the work is done; the default just does it.

        A handle with a ``seconds`` attribute (set by :meth:`fetch`) tells the batcher how
        long this batch alone took on the device; otherwise the batcher times it itself."""
        return self.embed_ids(ids, normalize)

    def fetch(self, handle: Any) -> np.ndarray:
        """The vectors of a batch started by :meth:`launch`."""
        return handle

    def embed_fp32(self, ids: list[list[int]], normalize: bool) -> np.ndarray | None:
        """The same batch in full precision, for rows whose vectors came out non-finite;
        None when this encoder already runs in fp32 (nothing better to try)."""
        return None

    @abstractmethod
    def bytes_per_token(self, seq_len: int) -> int:
        """Peak activation memory per padded token at sequence length ``seq_len``."""

    @property
    def max_fit_tokens(self) -> int:
        """Padded tokens of the largest batch the memory cap holds (never below one text)."""
        fits = self.memory_cap // max(1, self.bytes_per_token(self.max_seq_tokens))
        return max(self.max_seq_tokens, fits)

    @property
    def max_batch_tokens(self) -> int:
        """Padded-token budget of one batch: the setting, lowered to fit the memory cap."""
        return max(self.max_seq_tokens, min(self.batch_tokens_setting, self.max_fit_tokens))

    def health(self) -> dict[str, Any]:
        """A small self-description; raises if the model cannot embed."""
        vector = self.embed_ids(self.tokenize(["health check"]).ids, normalize=True)
        if vector.shape != (1, self.dim) or not np.isfinite(vector).all():
            raise ModelLoadError(f"model {self.name} returned a bad vector: {vector.shape}")
        return {
            "model": self.name,
            "model_id": self.model_id,
            "dim": self.dim,
            "device": self.device,
            "max_seq_tokens": self.max_seq_tokens,
            "max_batch_tokens": self.max_batch_tokens,
        }

    def accepts(self, model: str | None) -> bool:
        """Whether a request naming ``model`` may be served by this encoder."""
        return model_matches(model, self.name, self.model_id)

    def describe(self) -> dict[str, Any]:
        """What heartbeats, status and the API's /metadata say about this model."""
        return {"name": self.name, "model_id": self.model_id, "dim": self.dim}


# Allocation failures: torch.OutOfMemoryError ("CUDA out of memory"), MPS, cuBLAS handles.
_OOM_MARKS = ("out of memory", "cublas_status_alloc_failed")
# Errors after which a CUDA context is unusable (sticky): every later call fails too.
_FATAL_MARKS = (
    "cuda error",
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "cublas_status_execution_failed",
    "cudnn_status_execution_failed",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for allocation failures on any device (CUDA, MPS, host)."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKS)


def is_fatal_device_error(exc: BaseException) -> bool:
    """True for device failures no split can help (illegal memory access, device-side
    assert, any "CUDA error" but out of memory): the worker must be restarted."""
    if not isinstance(exc, RuntimeError) or is_out_of_memory(exc):
        return False
    # torch >= 2.8 raises CUDA errors as torch.AcceleratorError (no torch import here).
    if type(exc).__name__ == "AcceleratorError":
        return True
    return any(mark in str(exc).lower() for mark in _FATAL_MARKS)
