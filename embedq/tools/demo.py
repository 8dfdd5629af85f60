"""``make demo``: a real worker process, real Redis (or the embedded one), real model."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from embedq.tools import procs

TEXTS = [
    "A man is playing a guitar.",
    "Someone is strumming a guitar on stage.",
    "A chef is cooking pasta in the kitchen.",
    "How do I parse a JSON string in Python?",
    "json.loads turns a JSON document into Python objects.",
]


def _start_worker(redis_url: str) -> subprocess.Popen[bytes]:
    env = {"EMBEDQ_REDIS_URL": redis_url, "EMBEDQ_WORKER_CONCURRENCY": "4"}
    return procs.start(procs.worker_command("cpu", loglevel="WARNING"), env)


def _stop_worker(proc: subprocess.Popen[bytes], console: Console) -> int:
    code = procs.stop(proc)  # SIGTERM is Celery's warm shutdown: finish tasks, then exit
    console.print(
        f"worker stopped cleanly (exit code {code})" if code == 0 else f"worker exit {code}"
    )
    return code


def _print_matrix(console: Console, vectors: np.ndarray) -> None:
    sims = vectors @ vectors.T
    table = Table(title="cosine similarity")
    table.add_column("")
    for i in range(len(TEXTS)):
        table.add_column(f"[{i}]", justify="right")
    for i, row in enumerate(sims):
        table.add_row(f"[{i}] {TEXTS[i][:40]}", *(f"{x:.3f}" for x in row))
    console.print(table)


def main() -> int:
    """Run the demo; returns a process exit code."""
    from embedq.broker.results import get_and_forget
    from embedq.broker.url import redis_url
    from embedq.tasks import embed_texts

    console = Console()
    url = redis_url()  # starts the embedded Redis here when none answers, so both share it
    console.print(f"Redis: {url}")
    worker = _start_worker(url)
    try:
        start = time.perf_counter()
        vectors = get_and_forget(embed_texts.delay(TEXTS, collection="demo"), 180)
        console.print(
            f"{len(TEXTS)} texts -> {vectors.shape[0]} vectors of {vectors.shape[1]} float32 "
            f"in {time.perf_counter() - start:.1f}s (includes the worker's model load)"
        )
        _print_matrix(console, np.asarray(vectors))
    finally:
        code = _stop_worker(worker, console)
    return code


if __name__ == "__main__":
    sys.exit(main())
