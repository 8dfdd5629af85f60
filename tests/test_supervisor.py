"""``embedq worker --devices``: device parsing and the supervisor's rules, with real (tiny)
child processes; tests/test_fleet.py runs it with real Celery workers."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from embedq.errors import ConfigurationError
from embedq.worker import supervisor
from embedq.worker.supervisor import RestartBudget, Slot, Supervisor, parse_devices
from tests.helpers import wait_until

FOUR_GPUS = lambda: ["0", "1", "2", "3"]  # noqa: E731


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all", [Slot(i, "cuda", str(i)) for i in range(4)]),
        ("0,1,3", [Slot(0, "cuda", "0"), Slot(1, "cuda", "1"), Slot(3, "cuda", "3")]),
        (" 2 ", [Slot(2, "cuda", "2")]),
        ("cpu,cpu", [Slot(0, "cpu"), Slot(1, "cpu")]),
    ],
)
def test_parse_devices(spec, expected):
    assert parse_devices(spec, FOUR_GPUS) == expected


def test_parse_devices_maps_through_visible_devices():
    # CUDA_VISIBLE_DEVICES=4,6 already set: device 1 is physical GPU 6.
    assert parse_devices("1", lambda: ["4", "6"]) == [Slot(1, "cuda", "6")]


@pytest.mark.parametrize("spec", ["", "0,0", "7", "gpu", "0,cpu", "-1"])
def test_bad_devices_are_refused(spec):
    with pytest.raises(ConfigurationError):
        parse_devices(spec, FOUR_GPUS)


def test_all_without_a_gpu_is_refused():
    with pytest.raises(ConfigurationError, match="no CUDA device"):
        parse_devices("all", lambda: [])


def test_each_worker_gets_its_device_and_name():
    base = {"EMBEDQ_DEVICES": "all", "EMBEDQ_HOSTNAME": "x", "EMBEDQ_MODEL": "m", "PATH": "/bin"}
    env = supervisor.slot_env(Slot(3, "cuda", "6"), base)
    assert env == {"EMBEDQ_MODEL": "m", "PATH": "/bin", "EMBEDQ_DEVICE": "cuda"} | {
        "CUDA_VISIBLE_DEVICES": "6"
    }
    cmd = supervisor.slot_command(Slot(3, "cuda", "6"), "gpu", ["--loglevel", "INFO"])
    tail = ["--queue", "gpu", "--hostname", "gpu-3@%h", "--direct-queue", "--loglevel", "INFO"]
    assert cmd[-len(tail) :] == tail
    assert "--devices" not in cmd


def test_restart_budget():
    budget = RestartBudget()
    assert all(budget.allow(t) for t in (0.0, 1.0, 2.0))
    assert not budget.allow(3.0)  # a fourth exit within the window: a crash loop
    assert budget.allow(supervisor.RESTART_WINDOW_S + 1.0)  # the first restart aged out


CHILD = """
import signal, sys, time, pathlib
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
pathlib.Path(sys.argv[1]).touch()
time.sleep(120)
"""


def _child(folder: Path):
    return lambda slot: [sys.executable, "-c", CHILD, str(folder / f"up-{slot.index}")]


def test_one_signal_stops_every_worker(tmp_path):
    sup = Supervisor([Slot(0, "cpu"), Slot(1, "cpu")], _child(tmp_path), lambda _: dict(os.environ))

    def stop_when_up() -> None:
        wait_until(lambda: len(list(tmp_path.glob("up-*"))) == 2, 30, 0.05, "both children up")
        os.kill(os.getpid(), signal.SIGTERM)  # caught by the supervisor's handler

    thread = threading.Thread(target=stop_when_up)
    thread.start()
    assert sup.run() == 0
    thread.join()
    assert [p.returncode for p in sup.procs.values()] == [0, 0]
    assert signal.getsignal(signal.SIGTERM) is not sup._forward  # handlers restored


def test_a_crash_looping_worker_stops_them_all(tmp_path, monkeypatch):
    monkeypatch.setattr(supervisor, "RESTART_DELAY_S", 0.01)
    crashing = [sys.executable, "-c", "import sys; sys.exit(3)"]
    healthy = _child(tmp_path)
    sup = Supervisor(
        [Slot(0, "cpu"), Slot(1, "cpu")],
        lambda slot: crashing if slot.index == 1 else healthy(slot),
        lambda _: dict(os.environ),
    )
    assert sup.run() == 1
    assert sup.failed and len(sup.budgets[1].times) == supervisor.MAX_RESTARTS
    # The healthy one was stopped too (warmly, unless it had not yet set its handler).
    assert sup.procs[0].returncode in (0, -signal.SIGTERM)
    assert sup.procs[1].returncode == 3


def test_a_stop_during_start_up_starts_no_more(tmp_path):
    started: list[int] = []

    def command(slot: Slot) -> list[str]:
        started.append(slot.index)
        if slot.index == 0:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the first one starts
        return [sys.executable, "-c", "import time; time.sleep(120)"]

    sup = Supervisor([Slot(0, "cpu"), Slot(1, "cpu")], command, lambda _: dict(os.environ))
    assert sup.run() == 1  # the one started was interrupted before it could exit cleanly
    assert started == [0] and list(sup.procs) == [0]


def test_a_worker_that_cannot_start_stops_them_all_at_once(tmp_path):
    # A worker exits 78 (EX_CONFIG) when its settings or model cannot work: a restart would
    # fail the same way, so the supervisor gives up at once, with that code.
    failing = [sys.executable, "-c", "import sys; sys.exit(78)"]
    healthy = _child(tmp_path)
    sup = Supervisor(
        [Slot(0, "cpu"), Slot(1, "cpu")],
        lambda slot: failing if slot.index == 1 else healthy(slot),
        lambda _: dict(os.environ),
    )
    assert sup.run() == 78
    assert not sup.budgets[1].times, "never restarted"
    assert sup.procs[0].returncode in (0, -signal.SIGTERM)
