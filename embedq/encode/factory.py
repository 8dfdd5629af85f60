"""The encoder for the settings: ``EMBEDQ_CPU_BACKEND`` on a CPU device, torch on cuda and mps."""

from __future__ import annotations

from embedq.encode.base import Encoder
from embedq.encode.device import memory_cap_bytes, pick_device
from embedq.encode.models import ModelSpec, model_specs
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


def create_model_encoder(settings: Settings, spec: ModelSpec) -> Encoder:
    """The encoder of one model of ``EMBEDQ_MODELS``, selected by ``spec.name``."""
    encoder = create_encoder(settings.model_copy(update={"model": spec.source, "models": None}))
    encoder.name = spec.name
    return encoder


def create_encoders(settings: Settings) -> list[Encoder]:
    """One encoder per configured model, the default first. The memory cap is the worker's:
    each model's batches get an equal share, so all of them at once stay within it."""
    encoders = [create_model_encoder(settings, spec) for spec in model_specs(settings)]
    if len(encoders) > 1:
        # Read after every model loaded: what is left beside all their weights is shared.
        total = memory_cap_bytes(settings, pick_device(settings.device))
        for encoder in encoders:
            encoder.memory_cap = total // len(encoders)
    return encoders
