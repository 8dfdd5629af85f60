"""Fast recovery from dead workers with default settings (task leases, embedq.worker.leases).

Real processes: a private redis-server started here, real worker subprocesses (default
settings: onnx-int8, 32 threads, the default lease timeout), the real ``embedq ingest`` CLI,
a real SQLite store. Figures are printed (``pytest -s``) for docs/reliability.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from embedq.app import broker_transport_options
from embedq.broker.landing import queue_of, register, restore_expired
from embedq.keys import DELIVERY_PREFIX, LANDING_PREFIX, landing_key
from embedq.store.factory import create_store
from embedq.tools import procs
from embedq.worker.leases import REDELIVERED_KEY, TaskLeases, held_tags, index_key, renew
from tests.helpers import (
    audit,
    corpus,
    finish_callers,
    free_port,
    private_redis,
    start_callers,
    wait_rows,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKER = [str(BIN / "embedq"), "worker", "--queue", "cpu"]
# One ONNX export for every worker of this module (it is made once per data dir).
DATA_DIR = Path(tempfile.mkdtemp(prefix="embedq-recovery-"))
# The bound from the kill to the ingest's exit (restore within 60 s, then the rest).
KILL_TO_EXIT_S = 90


@pytest.fixture(scope="module", autouse=True)
def _drop_data_dir() -> Iterator[None]:
    """The ONNX export (tens of MiB) goes with the module's tests."""
    yield
    shutil.rmtree(DATA_DIR, ignore_errors=True)


@pytest.fixture
def broker_url(tmp_path: Path) -> Iterator[str]:
    """A private redis-server run as docs/reliability.md advises (noeviction)."""
    with private_redis(tmp_path, "--maxmemory-policy", "noeviction") as url:
        yield url


def default_env(tmp_path: Path, url: str, **extra: str) -> dict[str, str]:
    """The environment of a fresh install: no EMBEDQ_* setting but where things live."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")}
    return env | {
        "EMBEDQ_REDIS_URL": url,
        "EMBEDQ_DATABASE_URL": f"sqlite:///{tmp_path / 'recovery.db'}",
        "EMBEDQ_DATA_DIR": str(DATA_DIR),
        "EMBEDQ_METRICS_PORT": "0",  # tests run side by side: no fixed port
        **extra,
    }


@contextmanager
def logged_worker(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """A worker process logging to ``log``, stopped warmly (SIGTERM) at the end."""
    with log.open("a") as handle:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=handle, stderr=handle)
        try:
            yield proc
        finally:
            procs.stop(proc)


@pytest.mark.timeout(600)
def test_kill_9_of_the_only_worker_at_15_percent_recovers_within_90_s(tmp_path, broker_url):
    env = default_env(tmp_path, broker_url)
    docs = corpus(tmp_path / "docs.jsonl", 4000)
    store = create_store(env["EMBEDQ_DATABASE_URL"])
    broker, log = redis.Redis.from_url(broker_url), tmp_path / "worker.log"
    cmd = [str(BIN / "embedq"), "ingest", str(tmp_path / "docs.jsonl"), "--collection", "killed"]
    ingest = subprocess.Popen(
        [*cmd, "--json"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # Both classes in flight: an application's one-text calls beside the (bulk) ingest.
    calls = start_callers(env, "calls", 60)
    try:
        with logged_worker(WORKER, env, log) as first:
            wait_rows(store, "killed", 500, timeout_s=240, alive=ingest)
            first.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            first.wait()
            at_kill, held = store.count("killed"), broker.hlen("unacked")
        with logged_worker(WORKER, env, log):
            first_new_row_s = _first_new_row_s(store, "killed", at_kill, killed, ingest)
            out = _finish_or_explain(ingest, broker, killed + KILL_TO_EXIT_S + 30)
            kill_to_exit_s = time.monotonic() - killed
            called = finish_callers(calls)
    finally:
        ingest.kill()
        calls.kill()
    summary = json.loads(out.strip().splitlines()[-1])
    figures = audit(env["EMBEDQ_DATABASE_URL"], "killed", docs)
    again = int(broker.get(REDELIVERED_KEY) or 0)
    print(
        f"\nFIGURES kill -9 at {at_kill}/4000 stored, {held} tasks held by the dead worker; "
        f"first new row {first_new_row_s:.1f} s after the kill; ingest exit "
        f"{kill_to_exit_s:.1f} s after the kill; {again} redelivered; {json.dumps(figures)}; "
        f"interactive calls meanwhile {json.dumps(called)}"
    )
    assert ingest.returncode == 0, out[-3000:]
    assert held >= 1, "the dead worker held tasks (else this test shows nothing)"
    assert again >= 1, "the tasks it held were delivered again, to the new worker"
    assert summary["failed"] == 0 and summary["stored"] + summary["skipped"] == 4000
    assert figures == {"attempted": 4000, "stored": 4000, "lost": 0, "duplicated": 0, "wrong": 0}
    assert kill_to_exit_s <= KILL_TO_EXIT_S, (log.read_text()[-3000:], kill_to_exit_s)
    assert called["ok"] == 60 and not called["failed"], called
    assert store.count("calls") == 60, "every interactive call stored once"


# The real worker, killed (as by the kernel) in the gap kombu's BRPOP leaves: the message
# is off its queue and not yet recorded in ``unacked``.
DIES_TAKING_WORKER = textwrap.dedent(
    """
    import os, sys
    from kombu.transport import redis as kombu_redis
    real_append = kombu_redis.QoS.append

    def append(self, message, delivery_tag):
        if "die-in-flight-mark" in str(message.decode()):
            os._exit(137)
        return real_append(self, message, delivery_tag)

    kombu_redis.QoS.append = append
    from embedq.cli import main
    sys.argv = ["embedq", "worker", "--queue", "cpu"]
    main()
    """
)


def test_a_message_whose_worker_died_taking_it_comes_back(tmp_path, broker_url):
    # Landing lists expire with the lease timeout: 10 s here (30 s by default, shown by the
    # kill -9 test above).
    env = default_env(tmp_path, broker_url, EMBEDQ_DEAD_WORKER_RESTORE_S="10")
    broker, log = redis.Redis.from_url(broker_url), tmp_path / "worker.log"
    with logged_worker([sys.executable, "-c", DIES_TAKING_WORKER], env, log) as first:
        client = subprocess.Popen(
            [sys.executable, "-c", SEND.replace("slow-lease-mark", "die-in-flight-mark")],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert first.wait(timeout=240) == 137, log.read_text()[-3000:]
        died = time.monotonic()
    queued, unacked = broker.llen("cpu"), broker.hlen("unacked")
    with logged_worker(WORKER, env, log):
        out, _ = client.communicate(timeout=120)  # a lost message never comes
        back_s = time.monotonic() - died
    print(f"\nFIGURES died taking a message: answered {back_s:.1f} s after the death")
    assert (queued, unacked) == (0, 0), "the message was neither queued nor unacked"
    assert client.returncode == 0 and json.loads(out.strip().splitlines()[-1]) == [2, 384]
    assert back_s <= 60


def _finish_or_explain(ingest: subprocess.Popen, broker: redis.Redis, deadline: float) -> str:
    """The ingest's output once it exits; fails (saying where the work is) past ``deadline``."""
    try:
        return ingest.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
    except subprocess.TimeoutExpired:
        queued, unacked = broker.llen("cpu"), broker.hlen("unacked")
        ingest.kill()
        # Nothing queued or held, yet the ingest waits: a message the dead worker had taken
        # with BRPOP but not yet recorded in ``unacked`` died with it (kombu's Redis transport
        # is not atomic there); only the producer's re-send, minutes later, brings it back.
        pytest.fail(f"ingest still running past the bound: {queued} queued, {unacked} unacked")


def _first_new_row_s(store, collection: str, at_kill: int, killed: float, ingest) -> float:
    """Seconds from the kill to the first row stored after it (or to the ingest's end)."""
    while store.count(collection) <= at_kill and ingest.poll() is None:
        if time.monotonic() - killed > 300:
            break
        time.sleep(0.2)
    return time.monotonic() - killed


# The real worker, with one task made slow: a text holding MARK keeps its tokenizing
# thread busy for SLOW_S and appends a line to RUNS_FILE each time it runs.
SLOW_WORKER = textwrap.dedent(
    """
    import os, sys, time
    from embedq.encode.onnx_backend import OnnxInt8Encoder
    real_tokenize = OnnxInt8Encoder.tokenize

    def tokenize(self, texts):
        if any("slow-lease-mark" in t for t in texts):
            with open(os.environ["RUNS_FILE"], "a") as runs:
                runs.write(f"{time.time()}\\n")
            time.sleep(float(os.environ["SLOW_S"]))
        return real_tokenize(self, texts)

    OnnxInt8Encoder.tokenize = tokenize
    from embedq.cli import main
    sys.argv = ["embedq", "worker", "--queue", "cpu"]
    main()
    """
)

SEND = textwrap.dedent(
    """
    import json, sys
    from embedq.tasks import embed_texts
    result = embed_texts.apply_async((["a slow-lease-mark text", "another text"],), queue="cpu")
    print(result.id, flush=True)
    print(json.dumps(list(result.get(timeout=300).shape)), flush=True)
    """
)


def test_a_task_running_past_the_lease_timeout_on_a_live_worker_runs_once(tmp_path, broker_url):
    # The task runs 2.5 lease timeouts: unrenewed, kombu would hand it out again twice.
    restore_s, slow_s = 6, 15
    runs = tmp_path / "runs.txt"
    env = default_env(
        tmp_path,
        broker_url,
        EMBEDQ_DEAD_WORKER_RESTORE_S=str(restore_s),
        RUNS_FILE=str(runs),
        SLOW_S=str(slow_s),
    )
    broker = redis.Redis.from_url(broker_url)
    with logged_worker([sys.executable, "-c", SLOW_WORKER], env, tmp_path / "worker.log"):
        client = subprocess.Popen(
            [sys.executable, "-c", SEND], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        ages = _lease_ages(broker, runs, slow_s)
        out, _ = client.communicate(timeout=300)
    assert client.returncode == 0, out
    task_id, shape = out.strip().splitlines()[-2:]
    deliveries = int(broker.get(f"{DELIVERY_PREFIX}:{task_id}:0") or 0)
    print(
        f"\nFIGURES slow task: {len(runs.read_text().splitlines())} run(s) of {slow_s} s "
        f"with a {restore_s} s lease timeout; lease ages seen {ages}"
    )
    assert json.loads(shape) == [2, 384]
    # Without renewals kombu hands the running task out again every ~6 s (3 deliveries).
    assert deliveries == 1, "the running task was not delivered again"
    assert broker.get(REDELIVERED_KEY) is None
    assert len(runs.read_text().splitlines()) == 1, "nor run again"
    assert ages and max(ages) < broker_transport_options(restore_s)["visibility_timeout"]


def _lease_ages(broker: redis.Redis, runs: Path, slow_s: float) -> list[float]:
    """While the slow task runs: seconds since each sample's oldest lease renewal."""
    deadline = time.monotonic() + 240
    while not runs.exists():
        assert time.monotonic() < deadline, "the slow task never started"
        time.sleep(0.2)
    ages, started = [], time.monotonic()
    while time.monotonic() - started < slow_s - 2:
        scores = [s for _, s in broker.zrange("unacked_index", 0, -1, withscores=True)]
        if scores:
            ages.append(round(time.time() - min(scores), 1))
        time.sleep(1)
    return ages


class _Consumer:
    """What TaskLeases reads of Celery's consumer: task_consumer.channel (pure logic)."""

    def __init__(self, tags: list[str], dirty: set[str]) -> None:
        qos = type("QoS", (), {"_delivered": dict.fromkeys(tags), "_dirty": dirty})()
        channel = type("Channel", (), {"qos": qos, "unacked_index_key": "unacked_index"})()
        channel.global_keyprefix = "pfx:"
        self.task_consumer = type("TaskConsumer", (), {"channel": channel})()


def test_renewal_touches_only_tags_still_unacked(broker_url):
    client = redis.Redis.from_url(broker_url)
    consumer = _Consumer(["held", "acked-meanwhile", "dirty"], dirty={"dirty"})
    key = index_key(consumer)
    assert key == "pfx:unacked_index"
    assert held_tags(consumer) == ["held", "acked-meanwhile"]
    client.zadd(key, {"held": 1.0, "dirty": 1.0})
    renew(client, key, held_tags(consumer), 1000.0)
    assert dict(client.zrange(key, 0, -1, withscores=True)) == {b"held": 1000.0, b"dirty": 1.0}


def test_a_dead_workers_landing_list_goes_back_to_its_queue_and_a_live_ones_stays(broker_url):
    client = redis.Redis.from_url(broker_url)
    dead, live = landing_key("cpu", "dead"), landing_key("gpu:big", "live")
    assert queue_of(live) == "gpu:big"
    client.lpush(dead, b"m1", b"m2")
    client.lpush(live, b"m3")
    register(client, [dead], 1000.0)
    register(client, [live], 2000.0)
    assert restore_expired(client, older_than=1500.0) == 2
    assert sorted(client.lrange("cpu", 0, -1)) == [b"m1", b"m2"]
    assert client.lrange(live, 0, -1) == [b"m3"] and client.llen("gpu:big") == 0
    assert client.zrange(LANDING_PREFIX, 0, -1) == [live.encode()]
    assert restore_expired(client, older_than=1500.0) == 0, "moved once, never twice"


def test_a_renewal_that_cannot_reach_redis_is_logged_and_survived(caplog):
    # The session's in-process Celery worker sets the root logger to ERROR.
    caplog.set_level(logging.WARNING, logger="embedq.worker.leases")
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    leases = TaskLeases(dead, _Consumer(["a"], set()), interval_s=0.05, restore_s=30)
    leases.start()
    time.sleep(0.5)
    leases.stop()
    assert leases.beat() == 0
    assert not leases._thread.is_alive()
    failures = [r for r in caplog.records if "could not renew task leases" in r.message]
    assert len(failures) == 1, "logged once a minute, not once a beat"


def test_the_transport_restores_within_a_minute_by_default():
    from embedq.settings import Settings
    from embedq.worker.leases import lease_interval_s

    restore_s = Settings().dead_worker_restore_s
    options = broker_transport_options(restore_s)
    worst = options["visibility_timeout"] + options["unacked_restore_interval"]
    assert worst <= 60
    assert lease_interval_s(restore_s) * 5 <= options["visibility_timeout"]
    assert options["unacked_mutex_expire"] < 60
