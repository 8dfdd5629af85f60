"""A fleet on one host, end to end: ``embedq worker --queue gpu --devices cpu,cpu`` (two
Celery worker processes standing in for two GPUs) beside a plain cpu worker, with prices.

One test, so the three workers load their models once, at the same time: names in the
heartbeats, the router's weighting across the two device workers, the cheapest policy,
cost per 1 M tokens in status, and one SIGTERM stopping both device workers.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from embedq.broker.client import connect
from embedq.broker.fetch import fetch_order
from embedq.broker.landing import queue_of
from embedq.keys import LANDING_PREFIX
from embedq.ops.heartbeat import read_heartbeats
from embedq.ops.status import build_report, render
from embedq.settings import Settings
from tests.helpers import BIN, isolated_env, process, run_client, wait_until, workers

CLIENT = """
import json, os
from embedq.producer import router
from embedq.settings import get_settings
from embedq.tasks import embed_texts

def send(tag):
    return embed_texts.delay([f"{tag} text {i}" for i in range(80)])

# fastest (the default): 80 texts go to gpu, spread over the device workers' own queues.
pending = [send(f"fast-{k}") for k in range(4)]
assert all(r.get(timeout=120).shape == (80, 384) for r in pending)
os.environ["EMBEDQ_ROUTER_POLICY"] = "cheapest"
get_settings.cache_clear()
assert send("cheap").get(timeout=120).shape == (80, 384)
print(json.dumps(dict(router.decisions)))
"""


B = "\x06\x169"  # kombu's name suffix of a queue's bulk list (embedq.broker.traffic)


@pytest.mark.parametrize(
    ("queues", "held", "order"),
    [
        # Bulk first while the worker holds fewer than EMBEDQ_BULK_MIN_TASKS (2) bulk tasks.
        (["cpu"], 0, [f"cpu{B}", "cpu"]),
        (["cpu"], 2, ["cpu", f"cpu{B}"]),
        # At EMBEDQ_BULK_MAX_TASKS (16) no bulk list at all: threads stay for interactive.
        (["cpu"], 16, ["cpu"]),
        # A device worker: its own queue before the shared one, in each class.
        (["gpu", "gpu.gpu-0@h"], 5, ["gpu.gpu-0@h", "gpu", f"gpu.gpu-0@h{B}", f"gpu{B}"]),
        # The test suite's worker: two unrelated queues.
        (["cpu", "gpu"], 16, ["cpu", "gpu"]),
    ],
)
def test_fetch_order(queues, held, order):
    assert fetch_order(queues, held, bulk_min=2, bulk_max=16) == order


def _beats(client) -> dict[str, dict]:
    return {b["hostname"].split("@")[0]: b for bs in read_heartbeats(client).values() for b in bs}


def test_devices_fleet(tmp_path: Path, side_redis):
    url = side_redis(11)
    environ = isolated_env(tmp_path, url, EMBEDQ_ROUTER_DEADLINE_MS="600000")
    fleet_cmd = [str(BIN / "embedq"), "worker", "--queue", "gpu", "--devices", "cpu,cpu"]
    client = connect(url)
    with (
        process(
            fleet_cmd, environ | {"EMBEDQ_COST_PER_HOUR": "50"}, tmp_path / "fleet.log"
        ) as fleet,
        workers(environ | {"EMBEDQ_COST_PER_HOUR": "1"}, [tmp_path / "cpu.log"], ready=False) as (
            cpu_worker,
        ),
    ):
        names = {"gpu-0", "gpu-1", "cpu"}
        wait_until(lambda: _beats(client).keys() == names, 300, 0.2, lambda: _log(tmp_path))
        beats = _beats(client)
        assert beats["gpu-0"]["direct_queue"] == f"gpu.{beats['gpu-0']['hostname']}"
        assert read_heartbeats(client).keys() == {"gpu", "cpu"}

        decisions = json.loads(run_client(environ, CLIENT))
        assert decisions == {"gpu:large_batch": 4, "cpu:cheapest": 1}
        # Equal speeds, no backlog: each device worker got two of the four gpu tasks.
        wait_until(
            lambda: [_beats(client)[n]["texts_encoded"] for n in sorted(names)] == [80, 160, 160],
            10,
            0.2,
            lambda: str({n: b["texts_encoded"] for n, b in _beats(client).items()}),
        )
        # Device workers took from their own and the shared queue into landing lists
        # (reliable fetch), not with kombu's BRPOP over both.
        landed = {queue_of(k.decode()) for k in client.zrange(LANDING_PREFIX, 0, -1)}
        own = {beats[n]["direct_queue"] for n in ("gpu-0", "gpu-1")}
        assert own | {"gpu", "cpu"} <= landed, landed
        report = build_report(client, None, Settings(redis_url=url))
        costs = report.costs["queues"]
        assert (
            costs["cpu"]["cost_per_million_tokens_at_full"]
            < (costs["gpu"]["cost_per_million_tokens_at_full"])
        )
        assert set(report.costs["workers"]["gpu"]) == {
            beats["gpu-0"]["hostname"],
            beats["gpu-1"]["hostname"],
        }
        assert "cost:" in render(report) and "/1M tokens" in render(report)
        pids = [beats[n]["pid"] for n in ("gpu-0", "gpu-1")]
        cpu_worker.send_signal(signal.SIGTERM)  # its shutdown overlaps the fleet's
        fleet.send_signal(signal.SIGTERM)
        assert fleet.wait(timeout=60) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
        assert not {"gpu-0", "gpu-1"} & _beats(client).keys()  # both removed their heartbeats


def _log(folder: Path) -> str:
    return "all three workers beating\n" + "\n".join(
        p.read_text(errors="replace")[-1500:] for p in folder.glob("*.log")
    )


@pytest.mark.soak
def test_a_killed_device_worker_is_restarted_under_its_name(tmp_path: Path, side_redis):
    """kill -9 of one device worker: the supervisor logs it and starts it again, same name
    (so the same direct queue), while the other keeps running; kill -9 of the supervisor:
    its workers stop."""
    url = side_redis(11)
    environ = isolated_env(tmp_path, url)
    fleet_cmd = [str(BIN / "embedq"), "worker", "--queue", "gpu", "--devices", "cpu,cpu"]
    client = connect(url)
    log = tmp_path / "fleet.log"
    with process(fleet_cmd, environ, log) as fleet:
        wait_until(lambda: _beats(client).keys() == {"gpu-0", "gpu-1"}, 300, 0.2, "two workers")
        before = {n: b["pid"] for n, b in _beats(client).items()}
        os.kill(before["gpu-1"], signal.SIGKILL)
        wait_until(
            lambda: _beats(client).get("gpu-1", {}).get("pid") not in (None, before["gpu-1"]),
            300,
            0.5,
            lambda: log.read_text(errors="replace")[-3000:],
        )
        assert _beats(client)["gpu-0"]["pid"] == before["gpu-0"]
        assert "worker 1 (cpu) exited with status -9" in log.read_text(errors="replace")
        # kill -9 of the supervisor itself: its workers get SIGTERM (PR_SET_PDEATHSIG).
        pids = [b["pid"] for b in _beats(client).values()]
        fleet.kill()
        fleet.wait()
        wait_until(
            lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), 60, 0.2, "workers gone"
        )
        assert not _beats(client)  # they stopped warmly: heartbeats removed
