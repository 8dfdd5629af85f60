"""Interactive load for ``embedq bench``: N concurrent callers, one text per request.

Each caller sends one request, waits for its answer, and sends the next, until ``tasks``
requests are answered: through Celery (``embed_texts.apply_async(...).get``) or through the
HTTP API (``POST /v1/embeddings``). A progress line on stderr says how far it is.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import numpy as np

from embedq.broker.results import get_and_forget
from embedq.tools.procs import start, stop

API_READY_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 60.0


class Progress:
    """A ``label: done/total, rate/s`` line on ``stream``, rewritten about once a second."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total, self.stream = label, total, stream or sys.stderr
        self.done = 0
        self._start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-progress", daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.stream.write(self.line() + "\n")
        self.stream.flush()

    def line(self) -> str:
        """The current progress line (no newline)."""
        seconds = max(1e-9, time.perf_counter() - self._start)
        rate = self.done / seconds
        return f"\r{self.label}: {self.done}/{self.total} in {seconds:.0f} s, {rate:.1f}/s"

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.stream.write(self.line())
            self.stream.flush()


def run_callers(
    send: Callable[[str], object], texts: list[str], callers: int, tasks: int, label: str
) -> dict[str, float]:
    """``callers`` threads, each sending one text at a time through ``send`` until ``tasks``
    requests are answered; requests/s and latency percentiles (ms)."""
    claim, lock = itertools.count(), threading.Lock()
    seconds: list[float] = []
    errors: list[BaseException] = []
    with Progress(label, tasks) as progress:

        def caller() -> None:
            while not errors:
                with lock:
                    i = next(claim)
                if i >= tasks:
                    return
                began = time.perf_counter()
                try:
                    send(texts[i % len(texts)])
                except BaseException as exc:  # reported once all callers stopped
                    errors.append(exc)
                    return
                with lock:
                    seconds.append(time.perf_counter() - began)
                    progress.done += 1

        start_s = time.perf_counter()
        threads = [threading.Thread(target=caller, daemon=True) for _ in range(callers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start_s
    if errors:
        raise errors[0]
    return _figures(seconds, wall, callers)


def _figures(seconds: list[float], wall: float, callers: int) -> dict[str, float]:
    return {
        "callers": callers,
        "tasks": len(seconds),
        "tasks_per_s": round(len(seconds) / wall, 1),
        **percentiles_ms(seconds),
    }


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    """p50 and p99 of ``seconds``, in milliseconds."""
    return {
        "p50_ms": round(float(np.percentile(seconds, 50)) * 1000, 2),
        "p99_ms": round(float(np.percentile(seconds, 99)) * 1000, 2),
    }


def celery_sender(queue: str) -> Callable[[str], object]:
    """One ``embed_texts`` task of one text to ``queue``, waited for and forgotten."""
    from embedq.tasks import embed_texts

    def send(text: str) -> object:
        return get_and_forget(embed_texts.apply_async(([text],), queue=queue), REQUEST_TIMEOUT_S)

    return send


def http_sender(base_url: str) -> Callable[[str], object]:
    """One ``POST /v1/embeddings`` of one text (a client per caller thread)."""
    import httpx

    local = threading.local()

    def send(text: str) -> object:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT_S)
        response = local.client.post("/v1/embeddings", json={"input": text})
        response.raise_for_status()
        return response.json()

    return send


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def api_server(env: dict[str, str]) -> Iterator[str]:
    """``embedq api --insecure-no-auth`` on a free local port; its base URL."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "embedq.cli", "api", "--insecure-no-auth", "--port", str(port)]
    # Rate limiting would throttle the load itself.
    limits = {"EMBEDQ_API_RATE_LIMIT_PER_MIN": "100000000"}
    # Its access log (a line per request) would bury the progress line.
    proc = start(cmd, env | limits, output=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + API_READY_TIMEOUT_S
        while not _answers(httpx, url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start (run it alone to see why): {cmd}")
            time.sleep(0.2)
        yield url
    finally:
        stop(proc, timeout_s=10)


def _answers(httpx: Any, url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
