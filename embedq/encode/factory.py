"""The encoder for the settings: ``EMBEDQ_CPU_BACKEND`` on a CPU device, torch on cuda and mps."""

from __future__ import annotations

from embedq.encode.base import Encoder
from embedq.encode.device import pick_device
from embedq.errors import ConfigurationError
from embedq.settings import Settings

BACKENDS = ("torch", "onnx-int8")


def create_encoder(settings: Settings) -> Encoder:
    """The encoder: ``EMBEDQ_CPU_BACKEND`` on a CPU device, torch on cuda and mps."""
    backend = settings.cpu_backend
    if backend not in BACKENDS:
        raise ConfigurationError(f"EMBEDQ_CPU_BACKEND={backend!r}; choose one of: {BACKENDS}")
    from embedq.encode.torch_backend import TorchEncoder

    if backend == "onnx-int8" and pick_device(settings.device) == "cpu":
        from embedq.encode.onnx_backend import OnnxInt8Encoder

        return OnnxInt8Encoder(settings)
    return TorchEncoder(settings)
