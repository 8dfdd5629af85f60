"""PyTorch backend of :class:`~embedq.encode.base.Encoder` (sentence-transformers model).

On cuda the model runs in ``EMBEDQ_GPU_DTYPE`` on the worker's own device (``cuda:N``).
A batch is launched, its vectors copied back without blocking into pinned host memory, and
a CUDA event recorded on each side of it: fetching batch i waits for batch i's end event
only (not for batch i+1, queued behind it), and the two events time batch i alone.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedq.encode.base import Encoder, Tokenized
from embedq.encode.device import batch_tokens_for, bind_device, memory_cap_bytes, pick_device
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
# A reduced-precision model's vectors differ from fp32 ones: each dtype gets its own model
# id, hence its own cache keys and stored ids (as int8 has "+int8").
DTYPE_TAGS = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def gpu_dtype(name: str) -> torch.dtype:
    """The torch dtype of ``EMBEDQ_GPU_DTYPE``."""
    if name not in GPU_DTYPES:
        raise ConfigurationError(f"EMBEDQ_GPU_DTYPE={name!r}: use one of {sorted(GPU_DTYPES)}")
    return GPU_DTYPES[name]


def run_dtype(device: str, gpu_dtype_name: str) -> torch.dtype:
    """The dtype the model runs in: ``EMBEDQ_GPU_DTYPE`` on cuda, fp32 elsewhere."""
    return gpu_dtype(gpu_dtype_name) if device.startswith("cuda") else torch.float32


def tagged_model_id(base_id: str, dtype: torch.dtype) -> str:
    """``base_id`` with its dtype's tag (``name@hash+fp16``); fp32 keeps the bare id."""
    tag = DTYPE_TAGS.get(dtype)
    return f"{base_id}+{tag}" if tag else base_id


def load_model(path: Path, device: str, dtype: torch.dtype) -> SentenceTransformer:
    """The model on ``device``, its weights loaded in ``dtype`` (never fp32 then cast, which
    would leave fp32-sized blocks in the GPU's cache and a low free-memory reading)."""
    kwargs: dict[str, Any] = {"model_kwargs": {"dtype": dtype}} if dtype != torch.float32 else {}
    try:
        model = SentenceTransformer(str(path), device=device, local_files_only=True, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"could not load model from {path}: {exc}") from exc
    return model.eval()


@dataclass
class CudaBatch:
    """A batch in flight: its pinned host buffer and the events recorded around it."""

    host: torch.Tensor
    start: Any
    end: Any
    seconds: float | None = None


class TorchEncoder(Encoder):
    """A sentence-transformers model run by PyTorch on cuda, mps or cpu."""

    def __init__(self, settings: Settings) -> None:
        path = resolve_model_path(settings.model)
        self.name = settings.model
        self.device = pick_device(settings.device)
        self.dtype = run_dtype(self.device, settings.gpu_dtype)
        # Before anything touches CUDA: the context opens on this worker's own device.
        bind_device(self.device)
        self.model = load_model(path, self.device, self.dtype)
        self.tokenizer = self.model.tokenizer
        self.max_seq_tokens = int(self.model.max_seq_length)
        self.dim = int(self.model.get_embedding_dimension())
        base_id = f"{Path(settings.model).name}@{fingerprint(path)}"
        self.model_id = tagged_model_id(base_id, self.dtype)
        self.memory_cap = memory_cap_bytes(settings, self.device)
        self.batch_tokens_setting = batch_tokens_for(settings, self.device)
        self._config = self.model[0].auto_model.config
        self._path = path
        self._cuda: Any = torch.cuda if self.device.startswith("cuda") else None
        # This model's own CUDA stream (made on first launch): models sharing a GPU would
        # otherwise time each other's kernels with events on the one default stream.
        self._stream: Any = None
        self._fp32: SentenceTransformer | None = None
        self._fp32_lock = threading.Lock()
        log.info("Loaded %s on %s (dim %d)", self.model_id, self.device, self.dim)

    def tokenize(self, texts: list[str]) -> Tokenized:
        """Fast-tokenizer ids cut to max tokens; overflow tells which texts were cut."""
        return tokenize_texts(self.tokenizer, texts, self.max_seq_tokens)

    def embed_ids(self, ids: list[list[int]], normalize: bool) -> np.ndarray:
        """One forward pass over a padded batch."""
        return self.fetch(self.launch(ids, normalize))

    def launch(self, ids: list[list[int]], normalize: bool) -> Any:
        """Start a forward pass; on cuda it runs while the caller pads the next batch."""
        if self._cuda is None:
            return self._forward(self.model, ids, normalize)
        # The calling thread (the batcher's) must work on this worker's device too.
        bind_device(self.device, self._cuda)
        if self._stream is None:
            self._stream = self._cuda.Stream()
        with self._cuda.stream(self._stream):
            start = self._cuda.Event(enable_timing=True)
            start.record()
            out = self._forward(self.model, ids, normalize)
            host = self._pinned(tuple(out.shape))
            host.copy_(out, non_blocking=True)
            end = self._cuda.Event(enable_timing=True)
            end.record()
        return CudaBatch(host, start, end)

    def fetch(self, handle: Any) -> np.ndarray:
        """Wait for a launched pass (on cuda: for its end event only) and return its vectors;
        a cuda batch's ``seconds`` is then its own time on the device."""
        if not isinstance(handle, CudaBatch):
            return handle.cpu().numpy()
        handle.end.synchronize()
        handle.seconds = handle.start.elapsed_time(handle.end) / 1000
        return handle.host.numpy()

    def embed_fp32(self, ids: list[list[int]], normalize: bool) -> np.ndarray | None:
        """The batch through an fp32 copy of the model on the CPU (loaded on first use: rows
        that overflow in half precision are rare, and it takes no GPU memory)."""
        if self.dtype == torch.float32:
            return None
        with self._fp32_lock:
            if self._fp32 is None:
                log.warning("loading an fp32 copy of %s on cpu for non-finite rows", self.name)
                self._fp32 = load_model(self._path, "cpu", torch.float32)
        return self._forward(self._fp32, ids, normalize, "cpu").numpy()

    def _forward(
        self, model: SentenceTransformer, ids: list[list[int]], normalize: bool, device: str = ""
    ) -> torch.Tensor:
        input_ids, mask = pad(ids, self.tokenizer.pad_token_id or 0)
        device = device or self.device
        features = {
            "input_ids": self._to_device(input_ids, device),
            "attention_mask": self._to_device(mask, device),
        }
        with torch.inference_mode():
            out = model(features)["sentence_embedding"].float()
            if normalize:
                out = torch.nn.functional.normalize(out, p=2, dim=-1)
        return out

    def _to_device(self, array: np.ndarray, device: str) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if device.startswith("cuda"):
            # Pinned host memory lets the copy overlap with the kernels already queued.
            return tensor.pin_memory().to(device, non_blocking=True)
        return tensor.to(device)

    def _pinned(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.float32, pin_memory=True)

    def bytes_per_token(self, seq_len: int) -> int:
        """Activations of one layer (the peak: layers run one after another), times two."""
        cfg = self._config
        elem = 2 if self.dtype in (torch.float16, torch.bfloat16) else 4
        floats = (
            2 * cfg.intermediate_size + 4 * cfg.hidden_size + 2 * cfg.num_attention_heads * seq_len
        )
        return 2 * elem * floats
