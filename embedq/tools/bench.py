"""``embedq bench``: raw ``SentenceTransformer.encode`` vs the whole pipeline, in one run.

For each device (cpu always, cuda when one is visible) and each data set (SICK sentences,
pydoc docstrings, both mixed) it measures, on the same machine and the same texts:

- raw: ``model.encode(texts, normalize_embeddings=True)`` in this process (on cuda in
  ``EMBEDQ_GPU_DTYPE``, at its fastest batch size of 128-1024; 32 on cpu);
- pipeline: tasks of ``chunk`` texts through Redis to an ``embedq worker`` subprocess of the
  device's queue and back; every cache is emptied before each repeat, so each text is
  really encoded;
- single-text round trip (p50/p99) through the queue vs raw ``encode`` of one text;
- interactive: ``callers`` concurrent callers (and one caller), one text per request, as
  ``embed_texts`` tasks and through the HTTP API (``POST /v1/embeddings``): requests/s and
  p50/p99, vs raw ``encode`` (batch 32) of the same texts. A progress line shows on stderr.

Figures are medians over repeats. Writes ``bench.json`` and ``bench.png`` into ``out``.
The Redis database given is flushed before each repeat: never point it at one in use.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

import numpy as np

from embedq.broker.client import connect
from embedq.broker.results import get_result
from embedq.errors import ConfigurationError
from embedq.tools.interactive import percentiles_ms
from embedq.tools.mixed import table as mixed_table
from embedq.tools.procs import wait_ready, worker

DATASETS = ("sick", "pydoc", "mixed")
DEVICE_QUEUES = {"cpu": "cpu", "cuda": "gpu"}
WORKER_START_TIMEOUT_S = 600


def load_texts(name: str, data_dir: Path, limit: int | None = None) -> list[str]:
    """``pydoc`` docstrings, ``sick`` sentences (unique), or ``mixed`` (both, interleaved)."""
    if name == "pydoc":
        lines = _read(data_dir / "pydoc.jsonl").splitlines()
        texts = [json.loads(line)["text"] for line in lines if line.strip()]
    elif name == "sick":
        rows = _read(data_dir / "sick" / "SICK_train.txt").splitlines()[1:]
        texts = list(dict.fromkeys(r.split("\t")[1] for r in rows if r.strip()))
    elif name == "mixed":
        a, b = load_texts("pydoc", data_dir), load_texts("sick", data_dir)
        texts = [t for pair in zip(a, b, strict=False) for t in pair]
    else:
        raise ConfigurationError(f"unknown data set {name!r}: choose from {DATASETS}")
    return texts[:limit] if limit else texts


def _read(path: Path) -> str:
    if not path.is_file():
        raise ConfigurationError(f"benchmark data not found: {path} (see --data-dir)")
    return path.read_text(encoding="utf-8")


def median_time(
    fn: Callable[[], object], repeats: int, before: Callable[[], object] | None = None
) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs (``before`` runs untimed)."""
    times = []
    for _ in range(repeats):
        if before:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# A GPU user sets a large batch: raw encode on cuda is measured at the fastest of these.
RAW_GPU_BATCH_SIZES = (128, 256, 512, 1024)
# sentence-transformers' default, as a CPU user runs it.
RAW_CPU_BATCH_SIZE = 32


def raw_model(device: str) -> Any:
    """The configured model (``EMBEDQ_MODEL``) as users load it; on cuda in
    ``EMBEDQ_GPU_DTYPE`` (as the gpu worker runs it), loaded in that dtype."""
    from sentence_transformers import SentenceTransformer

    from embedq.encode.models import resolve_model_path
    from embedq.encode.torch_backend import gpu_dtype
    from embedq.settings import get_settings

    settings = get_settings()
    path = resolve_model_path(settings.model)
    kwargs = {"model_kwargs": {"dtype": gpu_dtype(settings.gpu_dtype)}} if device == "cuda" else {}
    return SentenceTransformer(str(path), device=device, local_files_only=True, **kwargs)


def best_batch_size(model: Any, texts: list[str], sizes: tuple[int, ...]) -> int:
    """The batch size of ``sizes`` at which raw ``encode`` of ``texts`` is fastest (one timed
    pass each, after the warm-up)."""
    timed = {
        size: median_time(
            lambda size=size: model.encode(texts, batch_size=size, normalize_embeddings=True), 1
        )
        for size in sizes
    }
    return min(timed, key=timed.__getitem__)


def raw_figures(model: Any, texts: list[str], repeats: int, device: str = "cpu") -> dict:
    """Raw ``encode`` texts/s over all ``texts``, tokens/s, its tokens and batch size (on
    cuda the best of ``RAW_GPU_BATCH_SIZES``: the baseline a GPU user would tune to)."""
    model.encode(texts[:64])  # warm-up
    size = RAW_CPU_BATCH_SIZE
    if device.startswith("cuda"):
        size = best_batch_size(model, texts, RAW_GPU_BATCH_SIZES)

    def encode() -> object:
        return model.encode(texts, batch_size=size, normalize_embeddings=True)

    seconds = median_time(encode, repeats)
    tokens = sum(len(ids) for ids in model.tokenizer(texts, truncation=True)["input_ids"])
    rate = len(texts) / seconds
    return {"seconds": seconds, "texts_per_s": rate, "tokens": tokens, "batch": size}


def raw_latency(model: Any, texts: list[str]) -> dict[str, float]:
    """Raw ``encode`` of one text at a time."""
    seconds = []
    for text in texts:
        start = time.perf_counter()
        model.encode([text], normalize_embeddings=True)
        seconds.append(time.perf_counter() - start)
    return percentiles_ms(seconds)


def pipeline_seconds(texts: list[str], queue: str, chunk: int, repeats: int, flush: Any) -> float:
    """Median seconds to embed ``texts`` as tasks of ``chunk`` through ``queue``."""
    chunks = [texts[i : i + chunk] for i in range(0, len(texts), chunk)]

    def run() -> None:
        pending = [embed_texts_async(c, queue) for c in chunks]
        for result in pending:
            get_result(result, 3600)

    return median_time(run, repeats, before=flush)


def pipeline_latency(texts: list[str], queue: str) -> dict[str, float]:
    """One text per task, one task at a time, through ``queue``."""
    seconds = []
    for text in texts:
        start = time.perf_counter()
        get_result(embed_texts_async([text], queue), 60)
        seconds.append(time.perf_counter() - start)
    return percentiles_ms(seconds)


def with_db(url: str, db: int) -> str:
    """``url`` pointing at Redis database ``db`` (TCP or Unix-socket URLs)."""
    parsed = urlparse(url)
    if parsed.scheme == "unix":
        query = dict(parse_qsl(parsed.query)) | {"db": str(db)}
        return f"unix://{parsed.path}?{urlencode(query)}"
    return urlunparse(parsed._replace(path=f"/{db}"))


@dataclass
class BenchOptions:
    """What one ``embedq bench`` run measures (see :func:`run`)."""

    redis_url: str
    out: Path
    data_dir: Path
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    devices: list[str] | None = None
    repeats: int = 3
    chunk: int = 64
    limit: int | None = None
    latency_n: int = 200
    callers: int = 32
    interactive_n: int = 1000
    #: Documents of the mixed scenario's ingest (0: no mixed scenario).
    mixed_docs: int = 6000
    #: The fairness scenario's two ingests, small and large (large 0: none).
    fair_docs: tuple[int, int] = (500, 20_000)
    command: str = "embedq bench"


def available_devices() -> list[str]:
    """cpu, and cuda when a CUDA device is visible."""
    import torch

    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def bench_device(device: str, opts: BenchOptions, data: dict[str, list[str]]) -> dict[str, Any]:
    """Raw figures first (model in this process), then the pipeline (model dropped)."""
    model = raw_model(device)
    raw = {name: raw_figures(model, texts, opts.repeats, device) for name, texts in data.items()}
    one_by_one = _latency_texts(data, opts.latency_n)
    raw_lat = raw_latency(model, one_by_one)
    inter_texts = _interactive_texts(opts, data)
    # Raw encode of the interactive texts as users call it (batch 32, its default).
    raw_inter = raw_figures(model, inter_texts[: opts.interactive_n], opts.repeats)
    # The raw model's threads (or GPU memory) must not compete with the worker's.
    del model
    gc.collect()
    queue = DEVICE_QUEUES[device]
    flush = connect(opts.redis_url).flushdb
    flush()
    scratch = Path(tempfile.mkdtemp(prefix="embedq-bench-"))
    env = {
        "EMBEDQ_REDIS_URL": opts.redis_url,
        "EMBEDQ_LRU_ITEMS": "1",
        "EMBEDQ_DEVICE": device,
        # The mixed scenario's ingests store here, never in the user's own store.
        "EMBEDQ_DATABASE_URL": f"sqlite:///{scratch / 'bench.db'}",
    }
    with worker(queue, env, stop_timeout_s=120) as proc:
        get_result(embed_texts_async(["warm-up"], queue), WORKER_START_TIMEOUT_S)
        piped, budgets = {}, {}
        for name, texts in data.items():
            piped[name] = pipeline_seconds(texts, queue, opts.chunk, opts.repeats, flush)
            budgets[name] = worker_budget(opts.redis_url, queue)
        lat = pipeline_latency(one_by_one, queue)
        flush()
        # The flush removed the worker's heartbeat: the API needs it back first.
        wait_ready([proc], opts.redis_url, queue)
        rows = interactive_rows(device, queue, opts, inter_texts, raw_inter)
        mixed = mixed_rows(device, queue, opts, env, scratch) if opts.mixed_docs else None
    table_rows = [_row(device, name, len(data[name]), raw[name], piped[name]) for name in data]
    for row in table_rows:
        row["batch_budget_tokens"] = budgets[row["data"]]
    gap = round(lat["p50_ms"] - raw_lat["p50_ms"], 2)
    latency = {"device": device, "raw": raw_lat, "pipeline": lat, "p50_gap_ms": gap}
    return {"rows": table_rows, "latency": latency, "interactive": rows, "mixed": mixed}


def mixed_rows(
    device: str, queue: str, opts: BenchOptions, env: dict[str, str], scratch: Path
) -> dict[str, Any]:
    """One-text callers while an ingest runs, and two ingests at once (see
    :mod:`embedq.tools.mixed`); pydoc docstrings cut to ~70 tokens, SICK sentences."""
    from embedq.tools.mixed import MixedOptions, run_mixed

    small, large = opts.fair_docs
    mixed = MixedOptions(
        queue=queue,
        env=os.environ | env,
        workdir=scratch,
        docs=opts.mixed_docs,
        callers=opts.callers,
        alone_n=max(20, opts.interactive_n // 5),
        small_docs=small,
        large_docs=large,
        fairness=large > 0,
    )
    docs, queries = load_texts("pydoc", opts.data_dir), load_texts("sick", opts.data_dir)
    return {"device": device, **run_mixed(mixed, docs, queries)}


def interactive_rows(
    device: str, queue: str, opts: BenchOptions, texts: list[str], raw: dict[str, float]
) -> list[dict[str, Any]]:
    """Concurrent one-text callers (``opts.callers``, then one), as tasks and through the
    HTTP API; each scenario gets texts of its own, so none is answered by the cache."""
    from embedq.tools.interactive import api_server, celery_sender, http_sender, run_callers

    single_n = max(20, opts.interactive_n // 10)
    plan = [(opts.callers, opts.interactive_n), (1, single_n)]
    slices = _slices(texts, [n for _, n in plan] * 2 + [40])
    rows = []
    for (callers, n), part in zip(plan, slices, strict=False):
        figures = run_callers(celery_sender(queue), part, callers, n, f"{device} tasks x{callers}")
        rows.append(_inter_row(device, "tasks", figures, raw))
    with api_server({"EMBEDQ_REDIS_URL": opts.redis_url}) as url:
        send = http_sender(url)
        run_callers(send, slices[-1], 4, 40, f"{device} http warm-up")
        for (callers, n), part in zip(plan, slices[len(plan) :], strict=False):
            figures = run_callers(send, part, callers, n, f"{device} http x{callers}")
            rows.append(_inter_row(device, "http", figures, raw))
    return rows


def _slices(texts: list[str], sizes: list[int]) -> list[list[str]]:
    """Consecutive slices of ``texts`` of ``sizes`` (wrapping round when there are too few)."""
    out, start = [], 0
    for size in sizes:
        out.append([texts[(start + i) % len(texts)] for i in range(size)])
        start += size
    return out


def _inter_row(
    device: str, via: str, figures: dict[str, float], raw: dict[str, float]
) -> dict[str, Any]:
    raw_tps = round(raw["texts_per_s"], 1)
    ratio = round(figures["tasks_per_s"] / raw_tps, 3)
    return {"device": device, "via": via, **figures, "raw_texts_per_s": raw_tps, "ratio": ratio}


def worker_budget(url: str, queue: str) -> int | None:
    """The token budget the worker has learned, from its next heartbeat."""
    from embedq.ops.heartbeat import INTERVAL_S
    from embedq.ops.status import read_workers

    time.sleep(INTERVAL_S + 0.5)
    workers = read_workers(connect(url)).get(queue) or [{}]
    return workers[0].get("max_batch_tokens")


def _interactive_texts(opts: BenchOptions, data: dict[str, list[str]]) -> list[str]:
    # Every SICK sentence (--limit cuts the bulk sets only): each scenario needs its own.
    try:
        return load_texts("sick", opts.data_dir)
    except ConfigurationError:
        return _latency_texts(data, sum(len(t) for t in data.values()))


def _latency_texts(data: dict[str, list[str]], n: int) -> list[str]:
    # Short interactive queries: SICK sentences when measured, else the shortest texts.
    pool = data.get("sick") or sorted((t for ts in data.values() for t in ts), key=len)
    return pool[:n]


def embed_texts_async(texts: list[str], queue: str) -> Any:
    """One ``embed_texts`` task sent to ``queue``."""
    from embedq.tasks import embed_texts

    return embed_texts.apply_async((texts,), queue=queue)


def _row(device: str, name: str, count: int, raw: dict[str, float], seconds: float) -> dict:
    return {
        "device": device,
        "data": name,
        "texts": count,
        "tokens": raw["tokens"],
        "raw_texts_per_s": round(raw["texts_per_s"], 1),
        "raw_batch_size": raw.get("batch"),
        "pipeline_texts_per_s": round(count / seconds, 1),
        "pipeline_tokens_per_s": round(raw["tokens"] / seconds),
        "ratio": round(raw["seconds"] / seconds, 3),
    }


def run(opts: BenchOptions) -> dict[str, Any]:
    """Measure every device and data set; write ``bench.json`` and ``bench.png``."""
    data = {name: load_texts(name, opts.data_dir, opts.limit) for name in opts.datasets}
    devices = opts.devices or available_devices()
    parts = [bench_device(device, opts, data) for device in devices]
    report = {
        "command": opts.command,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "repeats": opts.repeats,
        "chunk": opts.chunk,
        "rows": [row for part in parts for row in part["rows"]],
        "latency": [part["latency"] for part in parts],
        "interactive": [row for part in parts for row in part["interactive"]],
        "mixed": [part["mixed"] for part in parts if part.get("mixed")],
    }
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "bench.json").write_text(json.dumps(report, indent=2))
    plot(report, opts.out / "bench.png")
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    """Texts/s, raw vs pipeline, one bar pair per device and data set."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigurationError("the plot needs: pip install 'embedq[bench]'") from exc
    rows, inter = report["rows"], report.get("interactive") or []
    mixed = report.get("mixed") or []
    labels = [f"{r['device']}\n{r['data']}" for r in rows]
    x = np.arange(len(rows))
    width = max(5, 1.6 * len(rows)) + (1.4 * len(inter) if inter else 0) + 4 * len(mixed)
    panels = 1 + bool(inter) + len(mixed)
    fig, axes = plt.subplots(1, panels, figsize=(width, 4), squeeze=False)
    ax = axes[0][0]
    ax.bar(x - 0.2, [r["raw_texts_per_s"] for r in rows], 0.4, label="raw encode")
    ax.bar(x + 0.2, [r["pipeline_texts_per_s"] for r in rows], 0.4, label="embedq pipeline")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['ratio']:.2f}x", (i + 0.2, r["pipeline_texts_per_s"]), ha="center")
    ax.set_xticks(x, labels)
    ax.set_ylabel("texts/s")
    ax.set_title(f"embedq bench ({report['machine']}, {report['date']})")
    ax.legend()
    if inter:
        _plot_interactive(axes[0][1], inter)
    for i, part in enumerate(mixed):
        _plot_mixed(axes[0][1 + bool(inter) + i], part)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_interactive(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Requests/s of one-text callers (tasks, HTTP) next to raw encode's texts/s."""
    x = np.arange(len(rows))
    labels = [f"{r['device']} {r['via']}\nx{r['callers']}" for r in rows]
    ax.bar(x - 0.2, [r["raw_texts_per_s"] for r in rows], 0.4, label="raw encode (batch 32)")
    ax.bar(x + 0.2, [r["tasks_per_s"] for r in rows], 0.4, label="one-text requests")
    for i, r in enumerate(rows):
        note = f"{r['ratio']:.2f}x\np50 {r['p50_ms']:g} ms"
        ax.annotate(note, (i + 0.2, r["tasks_per_s"]), ha="center", fontsize=7)
    ax.set_xticks(x, labels)
    ax.set_ylabel("texts/s = requests/s")
    ax.set_title("interactive: concurrent callers, one text each")
    ax.legend(fontsize=7)


def _plot_mixed(ax: Any, mixed: dict[str, Any]) -> None:
    """p50/p99 of one-text callers alone and while an ingest runs, with the ingest's share
    of its speed alone."""
    keys = sorted(k for k in mixed if k.startswith("callers_"))
    x = np.arange(len(keys))
    bars = ((-0.2, "alone", 0.4), (0.2, "during_ingest", 0.9))
    for offset, when, shade in bars:
        p99 = [mixed[k][when]["p99_ms"] for k in keys]
        ax.bar(x + offset, p99, 0.4, alpha=shade, label=f"{when.replace('_', ' ')} p99")
        p50 = [mixed[k][when]["p50_ms"] for k in keys]
        ax.scatter(x + offset, p50, color="black", marker="_", s=200, zorder=3)
    for i, k in enumerate(keys):
        note = f"ingest at {mixed[k]['ingest_share']:.0%}"
        ax.annotate(note, (i, mixed[k]["during_ingest"]["p99_ms"]), ha="center", fontsize=7)
    ax.set_xticks(x, [f"x{mixed[k]['alone']['callers']}" for k in keys])
    ax.set_yscale("log")
    ax.set_ylabel("ms (bar p99, tick p50)")
    ax.set_title(f"{mixed['device']}: callers during an ingest of {mixed['docs']:,} docs")
    ax.legend(fontsize=7)


def interactive_table(report: dict[str, Any]) -> str:
    """The interactive rows as a Markdown table."""
    lines = [
        "| device | via | callers | requests | requests/s | p50 / p99 ms | raw texts/s | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report.get("interactive") or []:
        lines.append(
            f"| {r['device']} | {r['via']} | {r['callers']} | {r['tasks']} | {r['tasks_per_s']} "
            f"| {r['p50_ms']} / {r['p99_ms']} | {r['raw_texts_per_s']} | **{r['ratio']}x** |"
        )
    return "\n".join(lines)


def table(report: dict[str, Any]) -> str:
    """The report as the Markdown tables of docs/benchmarks.md."""
    lines = [
        "| device | data | texts | raw texts/s | pipeline texts/s | pipeline tokens/s | ratio "
        "| learned budget |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['device']} | {r['data']} | {r['texts']:,} | {r['raw_texts_per_s']} | "
            f"{r['pipeline_texts_per_s']} | {r['pipeline_tokens_per_s']:,} | **{r['ratio']}x** | "
            f"{r.get('batch_budget_tokens') or '-'} |"
        )
    lines += ["", "| device | raw p50 / p99 ms | pipeline p50 / p99 ms | p50 gap ms |"]
    lines.append("| --- | --- | --- | --- |")
    for lat in report["latency"]:
        raw, pipe = lat["raw"], lat["pipeline"]
        lines.append(
            f"| {lat['device']} | {raw['p50_ms']} / {raw['p99_ms']} | "
            f"{pipe['p50_ms']} / {pipe['p99_ms']} | {lat['p50_gap_ms']} |"
        )
    if report.get("interactive"):
        lines += ["", interactive_table(report)]
    for mixed in report.get("mixed") or []:
        lines += ["", f"mixed traffic ({mixed['device']}):", mixed_table(mixed)]
    return "\n".join(lines)


def launch(opts: BenchOptions) -> int:
    """Run :func:`run` in a process of its own (the caller's Celery app is already bound to
    the configured Redis, not the bench's database); its exit code."""
    spec = json.dumps(asdict(opts), default=str)
    env = os.environ | {"EMBEDQ_REDIS_URL": opts.redis_url, "EMBEDQ_LRU_ITEMS": "1"}
    done = subprocess.run([sys.executable, "-m", "embedq.tools.bench", spec], env=env, check=False)
    if done.returncode == 0:
        print(f"wrote {opts.out / 'bench.json'} and {opts.out / 'bench.png'}")
    return done.returncode


def main(argv: list[str]) -> None:
    """``python -m embedq.tools.bench '<options as JSON>'``: what ``embedq bench`` runs."""
    raw = json.loads(argv[0])
    paths = {"out": Path(raw["out"]), "data_dir": Path(raw["data_dir"])}
    opts = BenchOptions(**raw | paths | {"fair_docs": tuple(raw["fair_docs"])})
    print(table(run(opts)))


if __name__ == "__main__":
    main(sys.argv[1:])
