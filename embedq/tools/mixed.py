"""Mixed traffic for ``embedq bench``: one-text callers while a full-speed ingest runs.

Measured against one worker of one queue, every figure from one run on one machine:

- ingest alone: ``docs`` documents of ~70 tokens (pydoc docstrings cut short, each made
  unique to this run so nothing is skipped or cached) through ``embedq ingest``: docs/s;
- callers alone: 1 (then ``callers``) one-text callers (``embed_texts`` tasks): p50/p99;
- both at once: the same callers for as long as the ingest runs: their p50/p99, and the
  ingest's docs/s as a share of its speed alone;
- fairness: two ingests started together (``small_docs`` and ``large_docs``): the small
  one's wall time against its time alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedq.tools.interactive import celery_sender, percentiles_ms

# ~70 tokens of English prose or code documentation.
DOC_CHARS = 300
INGEST_TIMEOUT_S = 1800.0


@dataclass
class MixedOptions:
    """What the mixed scenario runs (see the module docstring)."""

    queue: str
    env: dict[str, str]
    workdir: Path
    docs: int = 6000
    callers: int = 32
    alone_n: int = 300
    small_docs: int = 500
    large_docs: int = 20_000
    fairness: bool = True


def corpus(texts: list[str], n: int, path: Path, tag: str) -> Path:
    """``n`` JSONL documents of about ``DOC_CHARS`` characters, unique to ``tag``."""
    with path.open("w", encoding="utf-8") as out:
        for i in range(n):
            text = f"{tag} {i}: {texts[i % len(texts)][:DOC_CHARS]}"
            out.write(json.dumps({"id": f"{tag}-{i}", "text": text}) + "\n")
    return path


def start_ingest(path: Path, collection: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """``embedq ingest PATH --json`` as a subprocess (a producer of its own, as users run it)."""
    cmd = [sys.executable, "-m", "embedq.cli", "ingest", str(path), "--collection", collection]
    return subprocess.Popen(
        [*cmd, "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )


def ingest_result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The ingest's JSON summary once it exits; ``docs_per_s`` added."""
    out, _ = proc.communicate(timeout=INGEST_TIMEOUT_S)
    summary = json.loads(out.strip().splitlines()[-1])
    summary["docs_per_s"] = round(summary["stored"] / max(summary["wall_s"], 1e-9), 1)
    return summary


class Callers:
    """``n`` threads each sending one text at a time until :meth:`stop` (or ``limit``)."""

    def __init__(self, send: Callable[[str], object], texts: list[str], n: int) -> None:
        self.send, self.texts, self.n = send, texts, n
        self.seconds: list[float] = []
        self.errors: list[BaseException] = []
        self._next, self._lock, self._stop = 0, threading.Lock(), threading.Event()

    def run(self, limit: int | None = None) -> dict[str, float]:
        """Run until ``limit`` requests are answered; p50/p99 ms and requests/s."""
        self.start(limit)
        return self.finish()

    def start(self, limit: int | None = None) -> None:
        """Start the callers (in the background)."""
        self._limit, self._began = limit, time.perf_counter()
        self._threads = [threading.Thread(target=self._caller, daemon=True) for _ in range(self.n)]
        for thread in self._threads:
            thread.start()

    def finish(self) -> dict[str, float]:
        """Stop the callers (each finishes its request) and report."""
        if self._limit is None:
            self._stop.set()
        for thread in self._threads:
            thread.join()
        if self.errors:
            raise self.errors[0]
        wall = time.perf_counter() - self._began
        rate = round(len(self.seconds) / wall, 1)
        return {"callers": self.n, "requests": len(self.seconds), "per_s": rate} | percentiles_ms(
            self.seconds
        )

    def _claim(self) -> str | None:
        with self._lock:
            if self._stop.is_set() or (self._limit is not None and self._next >= self._limit):
                return None
            self._next += 1
            return self.texts[(self._next - 1) % len(self.texts)]

    def _caller(self) -> None:
        while (text := self._claim()) is not None:
            began = time.perf_counter()
            try:
                self.send(text)
            except BaseException as exc:  # reported by finish()
                self.errors.append(exc)
                self._stop.set()
                return
            with self._lock:
                self.seconds.append(time.perf_counter() - began)


def run_mixed(opts: MixedOptions, docs: list[str], queries: list[str]) -> dict[str, Any]:
    """Every scenario of the module docstring; the figures as one dict."""
    send, fresh = celery_sender(opts.queue), _Fresh(queries)
    report: dict[str, Any] = {"docs": opts.docs, "queue": opts.queue}
    report["ingest_alone"] = _ingest(opts, docs, opts.docs, "alone")
    for n in (1, opts.callers):
        alone = Callers(send, fresh.take(opts.alone_n * max(1, n // 4)), n).run(
            opts.alone_n * max(1, n // 4)
        )
        callers = Callers(send, fresh.take(20_000), n)
        callers.start()
        during = _ingest(opts, docs, opts.docs, f"with{n}")
        mixed = callers.finish()
        report[f"callers_{n}"] = {
            "alone": alone,
            "during_ingest": mixed,
            "ingest": during,
            "ingest_share": round(during["docs_per_s"] / report["ingest_alone"]["docs_per_s"], 3),
            "p99_ratio": round(mixed["p99_ms"] / max(alone["p99_ms"], 1e-9), 2),
        }
    if opts.fairness:
        report["fairness"] = fairness(opts, docs)
    return report


def fairness(opts: MixedOptions, docs: list[str]) -> dict[str, Any]:
    """Two ingests started together: the small one's wall time vs alone."""
    alone = _ingest(opts, docs, opts.small_docs, "small-alone")
    tag = uuid.uuid4().hex[:8]
    large = start_ingest(
        corpus(docs, opts.large_docs, opts.workdir / "large.jsonl", f"large{tag}"),
        "bench-large",
        opts.env,
    )
    small = start_ingest(
        corpus(docs, opts.small_docs, opts.workdir / "small.jsonl", f"small{tag}"),
        "bench-small",
        opts.env,
    )
    together, big = ingest_result(small), ingest_result(large)
    return {
        "small_alone_s": alone["wall_s"],
        "small_together_s": together["wall_s"],
        "ratio": round(together["wall_s"] / max(alone["wall_s"], 1e-9), 2),
        "large_docs_per_s": big["docs_per_s"],
    }


def _ingest(opts: MixedOptions, docs: list[str], n: int, label: str) -> dict[str, Any]:
    tag = f"{label}{uuid.uuid4().hex[:8]}"
    path = corpus(docs, n, opts.workdir / f"{label}.jsonl", tag)
    return ingest_result(start_ingest(path, f"bench-{label}", opts.env))


class _Fresh:
    """Hands out query texts never sent before in this run (none answered by the cache)."""

    def __init__(self, texts: list[str]) -> None:
        self.texts, self.used = texts, 0

    def take(self, n: int) -> list[str]:
        tag = uuid.uuid4().hex[:6]
        out = [f"{self.texts[(self.used + i) % len(self.texts)]} ({tag}{i})" for i in range(n)]
        self.used += n
        return out


def table(report: dict[str, Any]) -> str:
    """The mixed figures as the Markdown table of docs/benchmarks.md."""
    alone = report["ingest_alone"]
    lines = [
        f"ingest alone: {report['docs']:,} docs in {alone['wall_s']} s "
        f"({alone['docs_per_s']} docs/s)",
        "",
        "| callers | alone p50 / p99 ms | during ingest p50 / p99 ms | p99 ratio "
        "| requests during | ingest docs/s (share of alone) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key in sorted(k for k in report if k.startswith("callers_")):
        row = report[key]
        a, m = row["alone"], row["during_ingest"]
        lines.append(
            f"| {a['callers']} | {a['p50_ms']} / {a['p99_ms']} | {m['p50_ms']} / {m['p99_ms']} "
            f"| {row['p99_ratio']} | {m['requests']} | {row['ingest']['docs_per_s']} "
            f"({row['ingest_share']:.0%}) |"
        )
    if fair := report.get("fairness"):
        lines += [
            "",
            f"two ingests together: the small one {fair['small_together_s']} s "
            f"(alone {fair['small_alone_s']} s, {fair['ratio']}x); the large one "
            f"{fair['large_docs_per_s']} docs/s",
        ]
    return "\n".join(lines)
