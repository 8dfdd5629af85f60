"""The gpu queue's path: CUDA, half precision, overlapped batches.

The first half runs anywhere: the logic of the cuda path (device binding, memory share,
event timing, out of memory, fatal device errors, non-finite rows, dtype-tagged ids) with a
fake ``torch.cuda`` and encoder doubles. The second half needs a CUDA GPU (skips without
one, CI has none): the encoder, the batcher, the runtime and a gpu-queue task on the device.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
import weakref
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from embedq.encode.base import Tokenized, is_fatal_device_error, is_out_of_memory
from embedq.encode.device import bind_device, device_index, memory_cap_bytes
from embedq.encode.torch_backend import (
    CudaBatch,
    TorchEncoder,
    gpu_dtype,
    load_model,
    run_dtype,
    tagged_model_id,
)
from embedq.errors import ConfigurationError, DeviceFailedError, EncoderError
from embedq.ops import metrics
from embedq.settings import Settings
from embedq.worker import stop
from embedq.worker.batcher import Batcher, encode_all
from tests.helpers import DictCache, load_pydoc

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GIB = 2**30
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"
ILLEGAL = "CUDA error: an illegal memory access was encountered"
# fp16 keeps 10 mantissa bits: within 0.999 of fp32 (the README's promise). bf16 keeps 7:
# measured on CPU (torch 2.13, 512 pydoc docstrings, the 256 longest among them) its
# min cosine to fp32 was 0.99992, but GPU kernels keep more intermediates in bf16, so the
# bound is looser; it must be confirmed on a GPU (bench/gpu_run.py runs this file there).
COSINE_BOUND = {"float16": 0.999, "bfloat16": 0.998}


class FakeCuda:
    """The parts of ``torch.cuda`` the cuda path calls, on a host with two fake GPUs."""

    def __init__(self, free: int = 60 * GIB, total: int = 80 * GIB, reserved: int = GIB):
        self.current, self.free, self.total, self.reserved = 0, free, total, reserved
        self.calls: list[str] = []

    def device_count(self) -> int:
        return 2

    def current_device(self) -> int:
        return self.current

    def set_device(self, index: int) -> None:
        self.calls.append(f"set_device {index}")
        self.current = index

    def mem_get_info(self, index: int | None = None) -> tuple[int, int]:
        self.calls.append(f"mem_get_info {index}")
        return self.free, self.total

    def memory_reserved(self, index: int | None = None) -> int:
        return self.reserved

    def Event(self, enable_timing: bool = False) -> FakeEvent:  # torch's name
        return FakeEvent(self, enable_timing)

    def Stream(self) -> str:  # torch's name
        self.calls.append("new stream")
        return f"stream {self.calls.count('new stream')}"

    @contextlib.contextmanager
    def stream(self, stream: str) -> Iterator[None]:
        self.calls.append(f"on {stream}")
        yield


class FakeEvent:
    """A CUDA event: recorded on the stream, waited on, timed against another."""

    made = 0

    def __init__(self, cuda: FakeCuda, timing: bool) -> None:
        FakeEvent.made += 1
        self.cuda, self.timing, self.name, self.at = cuda, timing, f"e{FakeEvent.made}", 0.0

    def record(self) -> None:
        self.at = 0.010 * FakeEvent.made
        self.cuda.calls.append(f"record {self.name}")

    def synchronize(self) -> None:
        self.cuda.calls.append(f"synchronize {self.name}")

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.timing and end.timing, "timing events only"
        return (end.at - self.at) * 1000


# -- devices and memory -------------------------------------------------------------------


def test_a_cuda_n_worker_measures_and_binds_its_own_device():
    cuda = FakeCuda()
    assert device_index("cuda:1", cuda) == 1 and device_index("cuda", cuda) == 0
    bind_device("cuda:1", cuda)
    assert cuda.current == 1 and cuda.calls == ["set_device 1"]
    bind_device("cuda:1", cuda)  # already there: no call
    bind_device("cpu", cuda)
    assert cuda.calls == ["set_device 1"]
    cap = memory_cap_bytes(Settings(), "cuda:1", cuda)
    assert cuda.calls[-1] == "mem_get_info 1", "free memory is read on the worker's GPU"
    assert cap == int(60 * GIB * 0.8)
    for wrong in ("cuda:2", "cuda:x"):
        with pytest.raises(ConfigurationError, match=wrong):
            device_index(wrong, cuda)


def test_workers_sharing_a_gpu_split_its_memory_whatever_order_they_start_in():
    # The first of two workers sees 78 GiB free; the second, 44 GiB (the first holds its
    # share, model and context): each keeps to 80% of its half, less what it already holds.
    first = memory_cap_bytes(Settings(workers_per_device=2), "cuda:0", FakeCuda(78 * GIB))
    second = memory_cap_bytes(Settings(workers_per_device=2), "cuda:0", FakeCuda(44 * GIB))
    assert first == second == int(80 * GIB * 0.8 / 2 - GIB)
    alone = memory_cap_bytes(Settings(), "cuda:0", FakeCuda(78 * GIB))
    assert alone == int(78 * GIB * 0.8)
    assert memory_cap_bytes(Settings(max_memory_mb=512), "cuda:0", FakeCuda()) == 512 * 2**20


# -- dtypes and model ids -----------------------------------------------------------------


def test_gpu_dtype_names_are_checked():
    assert gpu_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ConfigurationError, match="EMBEDQ_GPU_DTYPE='fp8'"):
        gpu_dtype("fp8")


def test_each_dtype_has_its_own_model_id():
    assert run_dtype("cpu", "float16") is torch.float32
    assert run_dtype("cuda:1", "bfloat16") is torch.bfloat16
    ids = {tagged_model_id("m@abc", gpu_dtype(n)) for n in ("float16", "bfloat16", "float32")}
    assert ids == {"m@abc+fp16", "m@abc+bf16", "m@abc"}


def test_the_model_loads_in_the_target_dtype():
    from embedq.encode.models import resolve_model_path

    model = load_model(resolve_model_path(Settings().model), "cpu", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# -- cuda batches: pinned copy, one event pair each ---------------------------------------


@pytest.fixture(scope="module")
def cpu_encoder() -> TorchEncoder:
    return TorchEncoder(Settings(device="cpu"))


def test_a_cuda_batch_is_timed_by_its_events_and_fetch_waits_for_its_own_only(
    cpu_encoder, monkeypatch
):
    encoder, cuda, pinned = cpu_encoder, FakeCuda(), []
    # The cuda path, on the CPU: fake events, and a plain tensor as the pinned buffer.
    monkeypatch.setattr(encoder, "_cuda", cuda)
    monkeypatch.setattr(encoder, "_stream", None)
    monkeypatch.setattr(encoder, "_pinned", lambda s: pinned.append(s) or torch.empty(s))
    tok = encoder.tokenize(["first batch", "of two texts", "second batch"])
    first = encoder.launch(tok.ids[:2], True)
    second = encoder.launch(tok.ids[2:], True)
    # Both on this model's own stream, made once (not the default one other models share).
    assert cuda.calls.count("new stream") == 1 and cuda.calls.count("on stream 1") == 2
    assert isinstance(first, CudaBatch) and pinned == [(2, 384), (1, 384)]
    assert not [c for c in cuda.calls if c.startswith("synchronize")], "launch never waits"
    vectors = encoder.fetch(first)
    assert cuda.calls[-1] == f"synchronize {first.end.name}", "waits for batch 1's end only"
    assert first.seconds == pytest.approx(first.end.at - first.start.at)
    expected = encoder._forward(encoder.model, tok.ids[:2], True).numpy()
    np.testing.assert_allclose(vectors, expected, rtol=1e-5, atol=1e-6)
    assert encoder.fetch(second).shape == (1, 384)


def test_the_batcher_reports_a_batchs_own_device_time():
    class Timed(FakeEncoder):
        def launch(self, ids, normalize):
            return SimpleNamespace(ids=ids, seconds=None)

        def fetch(self, handle):
            handle.seconds = 0.5 * len(handle.ids)  # as the events would say
            return self.embed_ids(handle.ids, True)

    seen: list[float] = []
    encode_all(Timed(), _tok(6), True, 1000, 2, on_batch=lambda *a: seen.append(a[3]))
    assert seen == [1.0, 1.0, 1.0]


# -- out of memory, fatal errors, non-finite rows -----------------------------------------


class FakeEncoder:
    """Vector = [first token id, length]; allocates a 'tensor' per call, fails when told."""

    dim, model_id, device, max_seq_tokens = 2, "fake@0+fp16", "cuda:0", 512
    max_batch_tokens, max_fit_tokens = 1024, 4096

    def __init__(self, oom_above: int = 10**9, fatal: int | None = None, nan: int | None = None):
        self.oom_above, self.fatal, self.nan = oom_above, fatal, nan
        self.calls: list[int] = []
        self.failed_buffers: list[weakref.ref] = []
        self.alive_at_split: list[bool] = []
        self.fp32_calls: list[int] = []
        self.fp32_finite = True

    def tokenize(self, texts: list[str]) -> Tokenized:
        ids = [[int(t.split()[0])] * len(t.split()) for t in texts]
        return Tokenized(ids, np.zeros(len(ids), dtype=bool))

    def embed_ids(self, ids: list[list[int]], normalize: bool) -> np.ndarray:
        self.alive_at_split += [ref() is not None for ref in self.failed_buffers]
        self.calls.append(len(ids))
        activations = _Buffer(bytearray(len(ids)))  # held by this frame when it raises
        if any(x[0] == self.fatal for x in ids):
            raise RuntimeError(ILLEGAL)
        if len(ids) > self.oom_above:
            self.failed_buffers.append(weakref.ref(activations))
            raise torch.OutOfMemoryError(OOM)
        rows = np.array([[x[0], len(x)] for x in ids], dtype=np.float32)
        rows[[x[0] == self.nan for x in ids]] = np.nan
        return rows

    def launch(self, ids: list[list[int]], normalize: bool) -> Any:
        return self.embed_ids(ids, normalize)

    def fetch(self, handle: Any) -> np.ndarray:
        return handle

    def embed_fp32(self, ids: list[list[int]], normalize: bool) -> np.ndarray | None:
        self.fp32_calls.append(len(ids))
        rows = np.array([[x[0], len(x)] for x in ids], dtype=np.float32)
        return rows if self.fp32_finite else rows * np.nan


class _Buffer:
    """Stands in for a device tensor: weakly referable, held by the raising frame."""

    def __init__(self, data: bytearray) -> None:
        self.data = data


class LateFailing(FakeEncoder):
    """Like cuda: launch returns at once with the batch's buffer; errors surface at fetch."""

    def launch(self, ids, normalize):
        handle = _Buffer(bytearray(len(ids)))
        handle.ids = ids
        return handle

    def fetch(self, handle):
        if len(handle.ids) > self.oom_above:
            self.failed_buffers.append(weakref.ref(handle))
            raise torch.OutOfMemoryError(OOM)
        return self.embed_ids(handle.ids, True)


def _tok(n: int) -> Tokenized:
    return Tokenized([[i] for i in range(n)], np.zeros(n, dtype=bool))


def _splits() -> float:
    return metrics.SPLITS._value.get()


@pytest.mark.parametrize("kind", [FakeEncoder, LateFailing])
def test_out_of_memory_lowers_the_budget_frees_the_batch_then_splits(kind, caplog):
    encoder, ooms = kind(oom_above=2), []
    with caplog.at_level(logging.WARNING, logger="embedq.worker.encoding"):
        out = encode_all(encoder, _tok(16), True, 4, 16, on_oom=lambda: ooms.append(1))
    assert out.failed == {} and out.vectors[:, 0].tolist() == list(range(16))
    # One out of memory (and the batch already in flight then): later ones are packed smaller.
    assert 1 <= len(ooms) <= (2 if kind is LateFailing else 1)
    assert encoder.calls.count(4) <= 1, "the failed batch is never retried whole"
    assert encoder.alive_at_split and not any(encoder.alive_at_split), (
        "the failed batch's buffers were freed before its halves ran"
    )
    assert "splitting it in half" in caplog.text and "out of memory" in caplog.text


def test_a_fatal_device_error_stops_the_worker_instead_of_failing_texts_one_by_one():
    encoder, stopped, before = FakeEncoder(fatal=5), [], _splits()
    with pytest.raises(DeviceFailedError, match="illegal memory access"):
        encode_all(encoder, _tok(16), True, 8, 16, on_fatal=stopped.append)
    assert len(stopped) == 1 and isinstance(stopped[0], DeviceFailedError)
    assert _splits() == before and max(encoder.calls) == 8, "no split, no text tried alone"
    assert is_fatal_device_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_fatal_device_error(torch.OutOfMemoryError(OOM))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_fatal_device_error(ValueError("CUDA error in a user's text"))


def test_the_batcher_fails_its_requests_and_calls_on_fatal():
    stopped: list[DeviceFailedError] = []
    batcher = Batcher(
        FakeEncoder(fatal=3), DictCache(), wait_s=0.0, max_batch_size=64, on_fatal=stopped.append
    )
    future = batcher.submit([f"{i} w" for i in range(8)], normalize=True)
    with pytest.raises(EncoderError, match="device failed"):
        future.result(timeout=10)
    batcher.close()
    assert len(stopped) == 1


def test_stop_worker_asks_celery_for_a_warm_shutdown_with_a_failure_code(monkeypatch):
    state, error = SimpleNamespace(should_stop=None), DeviceFailedError("planted")
    stop.stop_worker(error, state, SimpleNamespace(name="MainProcess"))
    assert state.should_stop == stop.EX_SOFTWARE == 70
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(stop.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    child = SimpleNamespace(should_stop=None)
    stop.stop_worker(error, child, SimpleNamespace(name="ForkPoolWorker-1"))
    assert child.should_stop is None and killed == [(stop.os.getpid(), signal.SIGTERM)]


def test_non_finite_rows_are_redone_in_fp32_or_refused_and_never_cached():
    encoder = FakeEncoder(nan=3)
    out = encode_all(encoder, _tok(8), True, 1000, 8)
    assert out.failed == {} and out.vectors[:, 0].tolist() == list(range(8))
    assert encoder.fp32_calls == [1], "only the bad row is redone"
    encoder.fp32_finite = False
    cache = DictCache()
    batcher = Batcher(encoder, cache, wait_s=0.0, max_batch_size=64)
    bad = batcher.submit(["3 x", "4 y"], normalize=True)
    with pytest.raises(EncoderError, match=r"NonFiniteVectorError.*in fp32 too"):
        bad.result(timeout=10)
    assert batcher.submit(["4 y"], normalize=True).result(timeout=10).cache_hits == 1
    batcher.close()
    assert len(cache.data) == 1, "the refused vector was not cached"


# -- on a GPU -----------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_half_precision_vectors_match_fp32_raw_encode(raw_model, dtype):
    encoder = TorchEncoder(Settings(device="cuda", gpu_dtype=dtype))
    assert next(encoder.model.parameters()).dtype == gpu_dtype(dtype)
    assert encoder.model_id.endswith({"float16": "+fp16", "bfloat16": "+bf16"}[dtype])
    texts = [d["text"] for d in load_pydoc()[:512]]
    tok = encoder.tokenize(texts)
    before = _splits()
    out = encode_all(encoder, tok, True, encoder.max_batch_tokens, 256)
    raw = raw_model.encode(texts, normalize_embeddings=True)
    cosine = np.sum(out.vectors * raw, axis=1)
    print(f"\n{dtype}: min cosine {cosine.min():.5f}, mean {cosine.mean():.6f}")
    assert out.failed == {} and _splits() == before, "nothing failed or split"
    assert cosine.min() >= COSINE_BOUND[dtype]


@needs_cuda
def test_the_batcher_on_cuda_learns_from_event_timed_batches(raw_model):
    encoder = TorchEncoder(Settings(device="cuda"))
    batcher = Batcher(encoder, DictCache(), wait_s=0.002, max_batch_size=256, adaptive=True)
    texts = [d["text"] for d in load_pydoc()[:1024]]
    before = _splits()
    futures = [batcher.submit(texts[i : i + 64], True) for i in range(0, len(texts), 64)]
    vectors = np.concatenate([f.result(timeout=120).vectors for f in futures])
    batcher.close()
    cosine = np.sum(vectors * raw_model.encode(texts, normalize_embeddings=True), axis=1)
    assert batcher.stats.failed_texts == 0 and _splits() == before
    assert batcher.stats.batches >= 2 and cosine.min() >= COSINE_BOUND["float16"]


@needs_cuda
def test_a_gpu_queue_task_runs_on_the_device(runtime, raw_model):
    from embedq.tasks import embed_texts

    if not runtime.encoder.device.startswith("cuda"):
        pytest.skip("the session worker runs on the CPU here (EMBEDQ_DEVICE is not cuda)")
    texts = [f"{d['text']} ({time.time_ns()})" for d in load_pydoc()[:300]]
    before, failed = _splits(), runtime.batcher.stats.failed_texts
    vectors = embed_texts.apply_async((texts,), queue="gpu").get(timeout=120)
    cosine = np.sum(np.asarray(vectors) * raw_model.encode(texts, normalize_embeddings=True), 1)
    dtype = runtime.settings.gpu_dtype
    model_id = runtime.encoder.model_id
    assert model_id == tagged_model_id(model_id.split("+")[0], gpu_dtype(dtype))
    assert cosine.min() >= COSINE_BOUND.get(dtype, 0.9999)
    assert runtime.batcher.stats.failed_texts == failed and _splits() == before


# -- the benchmark's raw baseline -----------------------------------------------------------


def test_the_raw_gpu_baseline_runs_at_its_best_batch_size(monkeypatch):
    from embedq.tools import bench

    class Model:
        """Raw encode whose (fake) time depends on the batch size: 512 is fastest."""

        batches: list[int] = []

        def encode(self, texts, batch_size=32, normalize_embeddings=False):
            self.batches.append(batch_size)

        def tokenizer(self, texts, truncation):
            return {"input_ids": [[1, 2, 3]] * len(texts)}

    cost = {32: 9.0, 128: 4.0, 256: 2.0, 512: 1.0, 1024: 1.5}

    def fake_median_time(fn, repeats, before=None):
        fn()
        return cost[Model.batches[-1]]

    monkeypatch.setattr(bench, "median_time", fake_median_time)
    figures = bench.raw_figures(Model(), ["a text"] * 8, 3, "cuda")
    assert figures["batch"] == 512 and figures["seconds"] == 1.0
    assert Model.batches[-5:] == [128, 256, 512, 1024, 512], "each tried once, then the best"
    assert bench.raw_figures(Model(), ["a text"] * 8, 3, "cpu")["batch"] == 32
