"""Devices and what one batch may cost on them: the token budget and the memory cap."""

from __future__ import annotations

from typing import Any

import psutil

from embedq.errors import ConfigurationError
from embedq.settings import Settings

# Measured: on CPU small batches win (cache locality), 4096 padded tokens ran 1.35x faster
# than 16384 on pydoc docstrings; GPUs want large batches to stay busy.
DEVICE_BATCH_TOKENS = {"cpu": 4096, "cpu-int8": 2048, "mps": 8192, "cuda": 32768}
# Share of a GPU's memory its workers' batches may take (the rest: context, fragmentation).
GPU_MEMORY_SHARE = 0.8


def _torch_cuda() -> Any:
    import torch

    return torch.cuda


def device_index(device: str, cuda: Any = None) -> int:
    """The CUDA ordinal of ``cuda[:N]``: N, or the current device for a bare ``cuda``."""
    cuda = cuda or _torch_cuda()
    _, _, ordinal = device.partition(":")
    if ordinal and not ordinal.isdigit():
        raise ConfigurationError(f"EMBEDQ_DEVICE={device!r}: use cuda or cuda:N")
    index = int(ordinal) if ordinal else cuda.current_device()
    if index >= cuda.device_count():
        raise ConfigurationError(
            f"EMBEDQ_DEVICE={device!r}: this host has {cuda.device_count()} CUDA device(s)"
        )
    return index


def bind_device(device: str, cuda: Any = None) -> None:
    """Make ``device`` the calling thread's current CUDA device (a no-op elsewhere).

    CUDA's current device is per thread and starts at 0: every thread that launches work
    (the loader, the batcher) must bind, or it opens a second context on GPU 0."""
    if not device.startswith("cuda"):
        return
    cuda = cuda or _torch_cuda()
    index = device_index(device, cuda)
    if cuda.current_device() != index:
        cuda.set_device(index)


def batch_tokens_for(settings: Settings, device: str) -> int:
    """The token budget setting, or the default for ``device``."""
    return settings.max_batch_tokens or DEVICE_BATCH_TOKENS[device.split(":", 1)[0]]


def memory_cap_bytes(settings: Settings, device: str, cuda: Any = None) -> int:
    """Memory one batch may use: the setting, else a share of what the device has free."""
    if settings.max_memory_mb:
        return settings.max_memory_mb * 2**20
    if device.startswith("cuda"):
        return gpu_memory_cap(device, settings.workers_per_device, cuda or _torch_cuda())
    return int(min(psutil.virtual_memory().available * 0.25, 4 * 2**30))


def gpu_memory_cap(device: str, workers: int, cuda: Any) -> int:
    """This worker's share of its own GPU (measured there, after its model loaded): 80% of
    the free memory, and never more than 1/``workers`` of 80% of the total less what this
    process already holds, so workers sharing the GPU fit whatever order they start in."""
    index = device_index(device, cuda)
    free, total = cuda.mem_get_info(index)
    share = total * GPU_MEMORY_SHARE / workers - cuda.memory_reserved(index)
    return max(0, int(min(free * GPU_MEMORY_SHARE, share)))


def pick_device(wanted: str) -> str:
    """``auto`` means cuda, then mps, then cpu; anything else is checked, not trusted."""
    import torch

    if wanted == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if wanted.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigurationError("EMBEDQ_DEVICE=cuda but no CUDA device is visible")
        device_index(wanted)
        return wanted
    if wanted not in ("cpu", "mps"):
        raise ConfigurationError(f"EMBEDQ_DEVICE={wanted!r}: use auto, cpu, cuda[:N] or mps")
    return wanted
