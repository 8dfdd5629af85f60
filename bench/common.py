"""Shared pieces of the benchmarks: data sets, timing, a worker subprocess."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def load_texts(name: str, limit: int | None = None) -> list[str]:
    """``pydoc`` docstrings, ``sick`` sentences, or ``mixed`` (both, interleaved)."""
    if name == "pydoc":
        lines = (DATA / "pydoc.jsonl").read_text().splitlines()
        texts = [json.loads(line)["text"] for line in lines if line.strip()]
    elif name == "sick":
        rows = (DATA / "sick" / "SICK_train.txt").read_text().splitlines()[1:]
        texts = list(dict.fromkeys(r.split("\t")[1] for r in rows if r.strip()))
    elif name == "mixed":
        a, b = load_texts("pydoc"), load_texts("sick")
        texts = [t for pair in zip(a, b, strict=False) for t in pair]
    else:
        raise SystemExit(f"unknown data set {name!r}: pydoc, sick or mixed")
    return texts[:limit] if limit else texts


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


@contextmanager
def worker(queue: str, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """An ``embedq worker`` subprocess, warm-stopped at the end."""
    cmd = [sys.executable, "-m", "embedq.cli", "worker", "--queue", queue, "--loglevel", "WARNING"]
    proc = subprocess.Popen(cmd, env=os.environ | env)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
