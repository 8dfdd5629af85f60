"""``embedq worker --devices``: one Celery worker process per device, run as one unit.

Each device gets a plain ``embedq worker`` subprocess (its own model copy, batcher and
heartbeat), named ``<queue>-<N>@<host>``, that consumes the shared queue and a direct queue
of its own (see :mod:`embedq.producer.router`). A CUDA device is given to its process as
its only visible GPU (``CUDA_VISIBLE_DEVICES``), so everything in that process (memory
readings, contexts) lands on it.

Rules, in one place:

- SIGTERM, SIGINT and SIGQUIT to the supervisor go to every worker (Celery's warm, warm
  and cold shutdown); it exits once all have, with status 0 if every one exited cleanly.
- The workers run in a session of their own (a terminal's Ctrl-C reaches them once, through
  the supervisor) and get SIGTERM if the supervisor itself dies (Linux: PR_SET_PDEATHSIG).
- A worker that exits on its own, whatever its status, is logged and restarted after
  ``RESTART_DELAY_S``; one that already restarted ``MAX_RESTARTS`` times within
  ``RESTART_WINDOW_S`` is broken (a crash loop): the supervisor then stops the others and
  exits 1, for systemd or Kubernetes to notice.
- A worker that exits with ``EX_CONFIG`` (78: its settings or model cannot work, see
  :mod:`embedq.ops.failures`) failed to start, and would again: the supervisor stops the others
  and exits 78 at once. (It checks the broker, the store and the model files itself before
  it starts any, as ``embedq worker`` does.)
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from embedq.errors import ConfigurationError
from embedq.ops.failures import EX_CONFIG

log = logging.getLogger(__name__)

MAX_RESTARTS = 3
RESTART_WINDOW_S = 600.0
RESTART_DELAY_S = 2.0
POLL_S = 0.2
STOP_TIMEOUT_S = 60.0
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
# Settings a device worker must not inherit: it would supervise again, or miss its device.
CHILD_DROPPED = ("EMBEDQ_DEVICES", "EMBEDQ_DEVICE", "EMBEDQ_HOSTNAME", "EMBEDQ_DIRECT_QUEUE")


@dataclass(frozen=True)
class Slot:
    """One device worker: its number N (in ``<queue>-N@host``), device, visible GPU."""

    index: int
    device: str
    visible_gpu: str | None = None


def visible_gpus() -> list[str]:
    """This host's GPUs as ``CUDA_VISIBLE_DEVICES`` entries (honouring one already set)."""
    if (already := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        return [g.strip() for g in already.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def parse_devices(spec: str, gpus: Callable[[], list[str]] = visible_gpus) -> list[Slot]:
    """``all`` (every visible GPU), GPU numbers ``0,1,3``, or ``cpu`` slots (``cpu,cpu``:
    CPU processes standing in for GPUs, to try the fleet without one)."""
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if items == ["all"]:
        found = gpus()
        if not found:
            raise ConfigurationError("--devices all: no CUDA device is visible on this host")
        return [Slot(i, "cuda", gpu) for i, gpu in enumerate(found)]
    if items and all(item == "cpu" for item in items):
        return [Slot(i, "cpu") for i in range(len(items))]
    if not items or not all(item.isdigit() for item in items) or len(set(items)) < len(items):
        raise ConfigurationError(
            f"--devices {spec!r}: use all, distinct GPU numbers (0,1,3), or cpu,cpu"
        )
    found = gpus()
    missing = [item for item in items if int(item) >= len(found)]
    if missing:
        raise ConfigurationError(f"--devices: no GPU {', '.join(missing)} ({len(found)} visible)")
    return [Slot(int(item), "cuda", found[int(item)]) for item in items]


def slot_env(slot: Slot, base: dict[str, str]) -> dict[str, str]:
    """The environment of ``slot``'s worker: ``base`` without supervisor settings, with
    its device (a GPU: the only one it sees, as cuda)."""
    env = {k: v for k, v in base.items() if k not in CHILD_DROPPED}
    env["EMBEDQ_DEVICE"] = slot.device
    if slot.visible_gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.visible_gpu
    return env


def slot_command(slot: Slot, queue: str, options: Sequence[str] = ()) -> list[str]:
    """``python -m embedq.cli worker`` for ``slot``: named ``<queue>-N@%h``, direct queue on."""
    name = f"{queue}-{slot.index}@%h"
    cmd = [sys.executable, "-m", "embedq.cli", "worker", "--queue", queue, "--hostname", name]
    return [*cmd, "--direct-queue", *options]


@dataclass
class RestartBudget:
    """Restarts of one slot within the window; :meth:`allow` says whether one more is."""

    times: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_RESTARTS))

    def allow(self, now: float) -> bool:
        """True (and counted) unless ``MAX_RESTARTS`` happened within ``RESTART_WINDOW_S``."""
        if len(self.times) == MAX_RESTARTS and now - self.times[0] < RESTART_WINDOW_S:
            return False
        self.times.append(now)
        return True


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    # Linux: SIGTERM (warm shutdown) to the worker when the supervisor dies, even by kill -9.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A worker process in a session of its own, told to stop when its parent dies."""
    return subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)


class Supervisor:
    """Starts one process per slot, forwards stop signals, restarts per the module's rules."""

    def __init__(
        self,
        slots: Sequence[Slot],
        command: Callable[[Slot], list[str]],
        env: Callable[[Slot], dict[str, str]],
    ) -> None:
        self.slots = list(slots)
        self.command, self.env = command, env
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.budgets = {slot.index: RestartBudget() for slot in self.slots}
        self.stopping = False
        self.failed = False
        #: The status to exit with when a worker could not start (its own, e.g. 78).
        self.failed_start: int | None = None

    def run(self) -> int:
        """Run until told to stop (or a worker crash-loops); the exit status."""
        previous = {sig: signal.signal(sig, self._forward) for sig in FORWARDED}
        try:
            for slot in self.slots:
                if not self.stopping:  # a stop signal during start-up starts no more
                    self._start(slot)
            while not self._all_exited():
                self._check()
                time.sleep(POLL_S)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        codes = [proc.returncode for proc in self.procs.values()]
        if self.failed_start is not None:
            return self.failed_start
        return 1 if self.failed or any(codes) else 0

    def _start(self, slot: Slot) -> None:
        self.procs[slot.index] = proc = spawn(self.command(slot), self.env(slot))
        if self.stopping:  # the stop signal came while it was being spawned
            _send(proc, signal.SIGTERM)
        log.info("started worker %d (%s) as pid %d", slot.index, slot.device, proc.pid)

    def _forward(self, signum: int, _frame: FrameType | None = None) -> None:
        self.stopping = True
        for proc in self.procs.values():
            if proc.poll() is None:
                _send(proc, signum)

    def _all_exited(self) -> bool:
        return self.stopping and all(p.poll() is not None for p in self.procs.values())

    def _check(self) -> None:
        """Restart (or give up on) workers that exited while nobody asked them to."""
        for slot in self.slots:
            if self.stopping:
                return
            code = self.procs[slot.index].poll()
            if code is None:
                continue
            log.error("worker %d (%s) exited with status %s", slot.index, slot.device, code)
            if code == EX_CONFIG:
                log.error(
                    "worker %d cannot start (a setting or its model): stopping all", slot.index
                )
                self.failed_start = code
                self._forward(signal.SIGTERM)
                return
            if not self.budgets[slot.index].allow(time.monotonic()):
                log.error(
                    "worker %d restarted %d times in %.0f s: stopping all",
                    slot.index,
                    MAX_RESTARTS,
                    RESTART_WINDOW_S,
                )
                self.failed = True
                self._forward(signal.SIGTERM)
                return
            time.sleep(RESTART_DELAY_S)
            if not self.stopping:
                self._start(slot)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM to every worker, SIGKILL to those still running after ``timeout_s``."""
        self._forward(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _send(proc, signal.SIGKILL)
                proc.wait()


def _send(proc: subprocess.Popen[Any], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signum)


def supervise(slots: Sequence[Slot], queue: str, options: Sequence[str] = ()) -> int:
    """Run one worker per slot of ``queue`` until stopped; the exit status."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: embedq supervisor] %(message)s")
    base = dict(os.environ)
    supervisor = Supervisor(
        slots, lambda slot: slot_command(slot, queue, options), lambda slot: slot_env(slot, base)
    )
    try:
        return supervisor.run()
    finally:
        supervisor.stop()
