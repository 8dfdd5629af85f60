"""Profile one worker under N concurrent one-text callers: requests/s, p50/p99, the CPU
per task of the worker, the callers (this process) and Redis, Redis commands per task
(``INFO commandstats``) and, with ``--spy``, a py-spy profile of the worker (GIL-holding
samples, raw collapsed stacks).

    EMBEDQ_REDIS_URL=redis://127.0.0.1:6391/0 .venv/bin/python bench/interactive_profile.py \\
        --callers 32 --n 2500 --spy worker-gil.txt

The Redis database is flushed first: never point it at one in use.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--n", type=int, default=1500, help="requests")
    parser.add_argument("--via", choices=("tasks", "http"), default="tasks")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--spy", type=Path, default=None, help="py-spy output (raw format)")
    parser.add_argument("--spy-s", type=int, default=8)
    return parser.parse_args()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def _redis_cpu_s(client: object) -> float:
    info = client.info("cpu")  # type: ignore[attr-defined]
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _per_task(seconds: float, figures: dict[str, float]) -> float:
    return round(seconds * 1000 / figures["tasks"], 2)


def _spy(pid: int, out: Path, seconds: int) -> subprocess.Popen[bytes]:
    cmd = [
        str(Path(sys.executable).parent / "py-spy"),
        "record",
        "-p",
        str(pid),
        "-o",
        str(out),
        "-f",
        "raw",
        "--gil",
    ]
    cmd += ["-r", "250", "-d", str(seconds), "--threads"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    """Start a worker, warm it, measure, print JSON lines."""
    args = _args()
    from embedq.broker.client import connect
    from embedq.tools.bench import load_texts
    from embedq.tools.interactive import api_server, celery_sender, http_sender, run_callers
    from embedq.tools.procs import worker

    url = os.environ["EMBEDQ_REDIS_URL"]
    texts = load_texts("sick", args.data_dir)
    client = connect(url)
    client.flushdb()
    with worker("cpu", {"EMBEDQ_REDIS_URL": url, "EMBEDQ_LRU_ITEMS": "1"}, ready=True) as proc:
        run_callers(celery_sender("cpu"), texts[::-1], args.callers, 100, "warm-up")
        with api_server({"EMBEDQ_REDIS_URL": url}) as base:
            send = celery_sender("cpu") if args.via == "tasks" else http_sender(base)
            run_callers(send, texts[::-1], 1, 5, "warm-up")
            client.config_resetstat()
            spy = _spy(proc.pid, args.spy, args.spy_s) if args.spy else None
            cpu, start = _cpu_s(proc.pid), time.monotonic()
            own, redis_cpu = _own_cpu_s(), _redis_cpu_s(client)
            figures = run_callers(send, texts, args.callers, args.n, args.via)
            cpu_ms = (_cpu_s(proc.pid) - cpu) * 1000 / figures["tasks"]
            figures["callers_cpu_ms_per_task"] = _per_task(_own_cpu_s() - own, figures)
            figures["redis_cpu_ms_per_task"] = _per_task(_redis_cpu_s(client) - redis_cpu, figures)
            figures["worker_cpu_share"] = round(
                cpu_ms * figures["tasks"] / 1000 / (time.monotonic() - start), 2
            )
            if spy is not None:
                spy.wait()
    figures["worker_cpu_ms_per_task"] = round(cpu_ms, 2)
    stats = client.info("commandstats")
    figures["redis_commands_per_task"] = {
        name.removeprefix("cmdstat_"): round(v["calls"] / figures["tasks"], 2)
        for name, v in sorted(stats.items(), key=lambda kv: -kv[1]["calls"])
        if v["calls"] >= figures["tasks"] / 10
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
