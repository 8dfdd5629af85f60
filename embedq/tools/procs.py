"""``embedq worker`` subprocesses: start one, wait until it takes tasks, stop it.

One implementation for ``embedq demo``, ``embedq bench``, bench/*.py and the tests. A worker
is ready once its heartbeat key is in Redis: Celery sends ``worker_ready`` after it has
connected, and embedq loads the model and starts beating in that signal.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

STOP_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 600.0


def worker_command(
    queue: str = "cpu",
    *,
    hostname: str | None = None,
    loglevel: str | None = None,
    devices: str | None = None,
) -> list[str]:
    """``python -m embedq.cli worker`` for ``queue`` (this interpreter, so this checkout);
    ``devices`` (``all``, ``0,1``, ``cpu,cpu``): one worker per device, named
    ``<queue>-<N>@host``, under one supervisor process (wait for them with
    :func:`wait_ready`, ``hostname=f"{queue}-*"`` and ``expected`` the number of devices)."""
    cmd = [sys.executable, "-m", "embedq.cli", "worker", "--queue", queue]
    if devices:
        cmd += ["--devices", devices]
    if hostname:
        cmd += ["--hostname", hostname]
    if loglevel:
        cmd += ["--loglevel", loglevel]
    return cmd


def start(
    cmd: list[str],
    env: Mapping[str, str] | None = None,
    *,
    output: IO[Any] | int | None = None,
    cwd: Path | str | None = None,
    group: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with ``env`` over this process's environment; its output to ``output``
    (a file; default: this process's). ``group``: in a session of its own, so that
    :func:`stop` reaches its children too (honcho, Flower)."""
    return subprocess.Popen(
        cmd,
        env=os.environ | dict(env or {}),
        cwd=cwd,
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
        start_new_session=group,
    )


def stop(*procs: subprocess.Popen[Any], timeout_s: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM (Celery's warm shutdown: running tasks finish) to every one of ``procs`` at
    once, then SIGKILL to those still running after ``timeout_s``; the last one's exit
    code. A process that already exited is only reaped."""
    for proc in procs:
        if proc.poll() is None:
            _signal(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGKILL)
            proc.wait()
    return procs[-1].returncode if procs else 0


def _signal(proc: subprocess.Popen[Any], sig: int) -> None:
    try:
        if os.getpgid(proc.pid) == proc.pid:  # a session of its own: signal all of it
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


def heartbeats(redis_url: str, queue: str, hostname: str = "*") -> list[str]:
    """The hostnames of ``queue``'s live workers (matching ``hostname``, a glob) in
    ``redis_url``'s heartbeat registry."""
    from embedq.broker.client import connect
    from embedq.ops.heartbeat import read_heartbeats

    client = connect(redis_url)
    try:
        beats = read_heartbeats(client).get(queue, [])
    finally:
        client.close()
    return [b["hostname"] for b in beats if fnmatch.fnmatchcase(b["hostname"], hostname)]


def wait_ready(
    procs: list[subprocess.Popen[Any]],
    redis_url: str,
    queue: str = "cpu",
    hostname: str = "*",
    timeout_s: float = READY_TIMEOUT_S,
    expected: int | None = None,
) -> None:
    """Wait until as many heartbeats of ``queue`` (``hostname``, a glob) as ``procs`` (or
    ``expected``) are in Redis; raise ``RuntimeError`` when one of ``procs`` exits first or
    time runs out."""
    deadline = time.monotonic() + timeout_s
    while len(heartbeats(redis_url, queue, hostname)) < (expected or len(procs)):
        if dead := [p.args for p in procs if p.poll() is not None]:
            raise RuntimeError(f"worker exited before it was ready: {dead}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{expected or len(procs)} worker(s) not ready after {timeout_s:.0f} s"
            )
        time.sleep(0.2)


@contextmanager
def worker(
    queue: str = "cpu",
    env: Mapping[str, str] | None = None,
    *,
    cmd: list[str] | None = None,
    output: IO[Any] | int | None = None,
    ready: bool = False,
    stop_timeout_s: float = STOP_TIMEOUT_S,
) -> Iterator[subprocess.Popen[bytes]]:
    """A worker subprocess of ``queue`` (or ``cmd``), stopped warmly at the end.

    ``ready``: first wait for its heartbeat (in ``env``'s ``EMBEDQ_REDIS_URL``)."""
    proc = start(cmd or worker_command(queue, loglevel="WARNING"), env, output=output)
    try:
        if ready:
            url = (env or {}).get("EMBEDQ_REDIS_URL") or os.environ["EMBEDQ_REDIS_URL"]
            wait_ready([proc], url, queue)
        yield proc
    finally:
        stop(proc, timeout_s=stop_timeout_s)
