"""The ceiling Celery itself sets for one-text traffic here: a task that does nothing, sent
by N concurrent callers exactly as ``embedq bench`` sends ``embed_texts`` (same app,
transport, result backend and thread pool), waited for and forgotten. Prints tasks/s,
p50/p99 and the worker's and callers' CPU per task.

    EMBEDQ_REDIS_URL=redis://127.0.0.1:6391/0 .venv/bin/python bench/celery_ceiling.py

The Redis database is flushed first: never point it at one in use. The worker imports this
file for its task (``-I celery_ceiling``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from embedq.app import app

HERE = Path(__file__).resolve().parent
WORKER_START_S = 15.0


@app.task(name="embedq.bench.noop", acks_late=True)
def noop(texts: list[str]) -> list[float]:
    """Nothing: what is left is Celery's, kombu's and Redis's work per task."""
    return [0.0]


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    """Start a worker with the no-op task, warm it, measure, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--n", type=int, default=3000, help="requests")
    args = parser.parse_args()
    from embedq.broker.client import connect
    from embedq.broker.results import get_and_forget
    from embedq.tools.interactive import run_callers
    from embedq.tools.procs import start, stop

    url = os.environ["EMBEDQ_REDIS_URL"]
    connect(url).flushdb()
    env = {"EMBEDQ_REDIS_URL": url, "PYTHONPATH": f"{HERE}:{HERE.parent}"}
    cmd = [sys.executable, "-m", "celery", "-A", "embedq.app", "worker", "-Q", "cpu"]
    cmd += ["-P", "threads", "-c", "32", "-I", "celery_ceiling", "--loglevel", "WARNING"]
    proc = start(cmd, env, output=subprocess.DEVNULL)
    try:
        time.sleep(WORKER_START_S)  # loads the model too (worker_ready), then takes tasks

        def send(text: str) -> object:
            return get_and_forget(noop.apply_async(([text],), queue="cpu"), 60)

        run_callers(send, ["warm"], args.callers, 200, "warm-up")
        worker_cpu, own = _cpu_s(proc.pid), os.times()
        figures = run_callers(send, ["a"], args.callers, args.n, "no-op tasks")
        after = os.times()
        tasks = figures["tasks"]
        figures["worker_cpu_ms_per_task"] = round((_cpu_s(proc.pid) - worker_cpu) * 1e3 / tasks, 2)
        callers_s = after.user + after.system - own.user - own.system
        figures["callers_cpu_ms_per_task"] = round(callers_s * 1e3 / tasks, 2)
    finally:
        stop(proc)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
