"""Faults with real processes: kill -9 a worker, restart Redis, four workers on one SQLite
file, an encoder that always crashes on one text, a worker that dies on one task.

Each test ingests through the real CLI into a real store and then counts rows: every id
stored exactly once, none lost. Figures are printed (``pytest -s``) for docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
import redis
from sqlalchemy import event

from embedq import codec
from embedq.broker.client import connect
from embedq.errors import StoreError
from embedq.keys import DELIVERY_PREFIX, content_hash
from embedq.search.build import blob_name as index_blob
from embedq.search.build import build_index, index_dir, rebuild_changed
from embedq.search.loader import IndexCache
from embedq.store.base import Item
from embedq.store.factory import create_store
from tests.helpers import (
    audit,
    corpus,
    finish,
    finish_callers,
    isolated_env,
    redis_server,
    run_client,
    start_callers,
    start_ingest,
    wait_rows,
    wait_until,
    worker,
    workers,
)

pytestmark = pytest.mark.slow

# Short limits make Redis hand a dead worker's tasks to another within ~30 s
# (the visibility timeout is twice the hard limit).
FAST_REDELIVERY = {
    "EMBEDQ_TASK_TIME_LIMIT_S": "15",
    "EMBEDQ_TASK_SOFT_TIME_LIMIT_S": "12",
    "EMBEDQ_DEAD_WORKER_RESTORE_S": "10",
}


PASSWORD = "pw-" + uuid.uuid4().hex[:12]


def redelivered(url: str) -> int:
    """Task attempts handed to a worker more than once (the delivery counters)."""
    client = connect(url)
    return sum(int(client.get(k) or 0) > 1 for k in client.scan_iter(f"{DELIVERY_PREFIX}:*"))


# The kill -9 mid-ingest test lives in tests/test_recovery.py: default settings, every
# assertion this file made (redelivered, none failed, each document stored once) and the
# 90 s bound of the dead-worker issue.


# make test stops Redis once; make soak (marker soak) stops it early, midway and late, for
# half a second and for eight, as docs/reliability.md reports.
RESTARTS = [
    pytest.param(800, 3.0, id="down-3s-at-800"),
    *(
        pytest.param(at, down_s, id=f"down-{down_s:g}s-at-{at}", marks=pytest.mark.soak)
        for at in (50, 1500, 2600)
        for down_s in (0.5, 8.0)
    ),
]


@pytest.mark.parametrize(("at", "down_s"), RESTARTS)
def test_redis_restart_mid_ingest_loses_nothing(tmp_path, at, down_s):
    # With a password, as production Redis has: it must never show in a log.
    with redis_server(tmp_path / "redis", password=PASSWORD, durable=True) as server:
        url = server.url(0)
        # A task whose ack the outage lost comes back after the visibility timeout: keep it short.
        environ = isolated_env(tmp_path, url, **FAST_REDELIVERY)
        docs = corpus(tmp_path / "docs.jsonl", 3000)
        store = create_store(environ["EMBEDQ_DATABASE_URL"])
        log = tmp_path / "worker.log"
        with worker(environ, log, ready=False):
            ingest = start_ingest(tmp_path / "docs.jsonl", "restart", environ)
            # Both classes in flight: an application's one-text calls beside the ingest.
            calls = start_callers(environ, "calls", 40)
            at_stop = wait_rows(store, "restart", at)
            # Saves the append-only file, as a restart would (a client that does not retry).
            redis.Redis.from_url(url).shutdown()
            time.sleep(down_s)  # the outage itself
            server.restart()
            try:
                summary = finish(ingest, timeout_s=240)
                called = finish_callers(calls)
            finally:
                ingest.kill()
                calls.kill()
        again = redelivered(url)
    figures = audit(environ["EMBEDQ_DATABASE_URL"], "restart", docs)
    print(f"Redis down {down_s:g} s at {at_stop} stored; {again} tasks redelivered")
    assert "Connection to broker lost" in log.read_text(), "the worker saw the outage"
    assert "Unrecoverable error" not in log.read_text(), "the worker survived it"
    assert PASSWORD not in log.read_text() + json.dumps(summary)
    assert summary["failed"] == 0, summary["failures"]
    assert figures == {"attempted": 3000, "stored": 3000, "lost": 0, "duplicated": 0, "wrong": 0}
    assert called["ok"] == 40 and not called["failed"], called
    assert store.count("calls") == 40, "every interactive call stored once"


def test_four_workers_on_one_sqlite_file_lose_nothing_to_locks(tmp_path, side_redis):
    environ = isolated_env(tmp_path, side_redis(11))
    docs = corpus(tmp_path / "docs.jsonl", 2000)
    logs = [tmp_path / f"worker{i}.log" for i in range(4)]
    with workers(environ, logs, hostnames=[f"w{i}@%h" for i in range(4)]):
        summary = finish(
            start_ingest(
                tmp_path / "docs.jsonl",
                "sqlite4",
                environ,
                "--chunk-size",
                "8",
                "--max-in-flight",
                "64",
            )
        )
    output = "".join(log.read_text() for log in logs)
    served = [log.read_text().count("succeeded in") for log in logs]
    print(
        f"\ntasks per worker: {served}; 'database is locked' lines: "
        f"{output.count('database is locked')}"
    )
    figures = audit(environ["EMBEDQ_DATABASE_URL"], "sqlite4", docs)
    assert summary["failed"] == 0, summary["failures"]
    assert all(served), f"every worker took tasks: {served}"
    assert figures == {"attempted": 2000, "stored": 2000, "lost": 0, "duplicated": 0, "wrong": 0}


# Runs the real worker, with one fault planted in the real encoder (or the process).
FAULTY_WORKER = textwrap.dedent(
    """
    import os, sys
    from embedq.encode import torch_backend as torch_encoder
    MARK = "zyzzyva-poison"
    Encoder = torch_encoder.TorchEncoder
    # Every forward pass starts in launch (embed_ids goes through it too).
    real_tokenize, real_launch = Encoder.tokenize, Encoder.launch
    poisoned = set()

    def tokenize(self, texts):
        tok = real_tokenize(self, texts)
        poisoned.update(tuple(ids) for ids, t in zip(tok.ids, texts) if MARK in t)
        return tok

    def launch(self, ids, normalize):
        if any(tuple(i) in poisoned for i in ids):
            if os.environ.get("FAULT") == "die":
                os._exit(137)  # as the kernel's OOM killer would
            if os.environ.get("FAULT") == "fatal":  # the device, not the text: stop the worker
                raise RuntimeError("CUDA error: an illegal memory access was encountered (planted)")
            raise RuntimeError("index out of range in self (planted)")
        return real_launch(self, ids, normalize)

    Encoder.tokenize, Encoder.launch = tokenize, launch
    from embedq.cli import main
    sys.argv = ["embedq", "worker", "--queue", "cpu"]
    main()
    """
)
FAULTY = [sys.executable, "-c", FAULTY_WORKER]


def test_a_task_that_always_crashes_the_encoder_fails_after_bounded_retries(tmp_path, side_redis):
    url = side_redis(11)
    environ = isolated_env(
        tmp_path, url, EMBEDQ_TASK_MAX_RETRIES="2", EMBEDQ_TASK_RETRY_BACKOFF_S="1"
    )
    code = textwrap.dedent(
        """
        import json, sys, time
        from embedq.tasks import embed_texts
        bad = embed_texts.delay(["fine text", "a zyzzyva-poison text"])
        good = [embed_texts.delay([f"good text {i}"]) for i in range(10)]
        shapes = [list(r.get(timeout=120).shape) for r in good]
        try:
            bad.get(timeout=120)
            outcome = "succeeded"
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        print(json.dumps({"id": bad.id, "state": bad.state, "outcome": outcome, "shapes": shapes}))
        """
    )
    with worker(environ, tmp_path / "worker.log", FAULTY, ready=False):
        result = json.loads(run_client(environ, code, timeout_s=300))
    attempts = len(list(connect(url).scan_iter(f"{DELIVERY_PREFIX}:{result['id']}:*")))
    print(f"\npoison task: {attempts} attempts, {result['outcome']}")
    assert result["state"] == "FAILURE"
    assert result["outcome"].startswith("EncoderError: 1 of 2 texts could not be encoded")
    assert "index out of range" in result["outcome"]
    assert attempts == 3, "the first try and two retries, then it stops"
    assert result["shapes"] == [[1, 384]] * 10, "the other tasks finish"


def test_a_task_that_kills_its_worker_is_stopped_as_poison(tmp_path, side_redis):
    url = side_redis(11)
    # A dead worker's task comes back after 8 s here (30 s by default): the test is about
    # counting deliveries, not about how soon they come.
    limits = {
        "EMBEDQ_TASK_TIME_LIMIT_S": "5",
        "EMBEDQ_TASK_SOFT_TIME_LIMIT_S": "4",
        "EMBEDQ_DEAD_WORKER_RESTORE_S": "8",
    }
    environ = isolated_env(tmp_path, url, FAULT="die", EMBEDQ_TASK_MAX_DELIVERIES="2", **limits)
    bad = send(environ, ["zyzzyva-poison"])
    backend, deaths, log = connect(url), 0, tmp_path / "worker.log"

    def failed() -> bool:
        return task_meta(backend, bad).get("status") == "FAILURE"

    with ExitStack() as stack:
        for _ in range(4):  # two deaths and the refused delivery, and one spare
            proc = stack.enter_context(worker(environ, log, FAULTY, ready=False))
            wait_until(
                lambda p=proc: p.poll() is not None or failed(), 120, 0.5, "a death or the failure"
            )
            if proc.poll() is None:
                break  # this worker refused the task and lives on
            deaths += proc.poll() == 137
        meta = task_meta(backend, bad)
        print(f"\nworker deaths: {deaths}; final: {meta.get('result')}")
        assert meta.get("status") == "FAILURE"
        assert meta["result"]["exc_type"] == "PoisonTaskError"
        assert deaths == 2, "two deliveries were allowed, the third was refused"
        # The queue is clean again: the next task on that worker (faulty as before) succeeds.
        good = send(environ, ["a healthy text"])
        wait_until(lambda: task_meta(backend, good).get("status"), 120, 0.5, "the healthy task")
    assert task_meta(backend, good).get("status") == "SUCCESS"


@pytest.mark.soak
def test_a_failed_device_stops_its_worker_and_the_task_finishes_on_the_next(tmp_path, side_redis):
    # Soak: two worker starts (~30 s); the logic is tested in test_gpu.py without processes.
    url = side_redis(11)
    environ = isolated_env(tmp_path, url, FAULT="fatal", EMBEDQ_TASK_RETRY_BACKOFF_S="1")
    bad = send(environ, ["a zyzzyva-poison text"])
    backend, log = connect(url), tmp_path / "faulty.log"
    began = time.monotonic()
    with worker(environ, log, FAULTY, ready=False) as proc:
        wait_until(lambda: proc.poll() is not None, 180, 0.5, "the faulty worker to stop")
    print(f"\nfaulty worker stopped with {proc.returncode} after {time.monotonic() - began:.1f} s")
    assert proc.returncode == 70, log.read_text()[-3000:]
    assert "stopping this worker so it is restarted" in log.read_text()
    # What its supervisor does: start it again (healthy now); the retried task finishes there.
    with worker(environ, tmp_path / "healthy.log", ready=False):
        wait_until(
            lambda: task_meta(backend, bad).get("status") == "SUCCESS", 180, 0.5, "the retry"
        )


def send(environ: dict[str, str], texts: list[str]) -> str:
    """Queue one embed task from a client process of ``environ``; its id."""
    code = (
        "import sys, json; from embedq.tasks import embed_texts; "
        "print(embed_texts.apply_async((json.loads(sys.argv[1]),), queue='cpu').id)"
    )
    return run_client(environ, code, json.dumps(texts), timeout_s=120)


def task_meta(client, task_id: str) -> dict:
    """The stored result of a task (our msgpack codec), or {} while it has none."""
    raw = client.get(f"celery-task-meta-{task_id}")
    return codec.loads(raw) if raw else {}


def _items(collection: str, texts: list[str], vectors, start: int = 0) -> list[Item]:
    return [
        Item(collection, f"i{start + n}", t, v, "m", content_hash(t), {"n": start + n})
        for n, (t, v) in enumerate(zip(texts, vectors, strict=True))
    ]


@pytest.mark.usefixtures("redis_client")
@contextlib.contextmanager
def _file_size_limit(max_bytes: int) -> Iterator[None]:
    """Writes beyond ``max_bytes`` fail in this process (SIGXFSZ ignored: EFBIG instead)."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def test_a_full_disk_fails_clearly_writes_nothing_half_and_keeps_the_old_index(tmp_path, raw_model):
    store = create_store(f"sqlite:///{tmp_path / 'full.db'}")
    texts = [
        f"note {i}: the weather in city {i % 37} is {('sunny', 'rainy')[i % 2]}" for i in range(600)
    ]
    vectors = raw_model.encode(texts, normalize_embeddings=True)
    store.upsert(_items("c", texts[:300], vectors[:300]))
    assert build_index(store, "c", tmp_path / "builder")[0] == 1
    cache = IndexCache(store, tmp_path / "searcher", check_interval_s=0)
    assert cache.get("c").version == 1

    # Disk full: SQLite may not grow the file by one page more (its own ENOSPC path).
    with store.engine.connect() as conn:
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar_one()
    cap = lambda dbapi, _: dbapi.execute(f"PRAGMA max_page_count={pages}")  # noqa: E731
    event.listen(store.engine, "connect", cap)
    store.engine.dispose()
    with pytest.raises(StoreError, match=r"could not write 300 items: .*full"):
        store.upsert(_items("c", texts[300:], vectors[300:], start=300))
    assert store.count("c") == 300, "no partial rows"
    with pytest.raises(StoreError, match=r"could not publish an index: .*full"):
        build_index(store, "c", tmp_path / "builder")
    assert store.blob_version(index_blob("c"))[0] == 1
    assert rebuild_changed(store, tmp_path / "builder") == {"c": "unchanged"}
    labels, _ = cache.get("c").index.query(vectors[:1], 1)
    assert cache.get("c").version == 1 and len(labels[0]) == 1, "the old index still serves"

    # Space again: v2 is published; the searcher's own disk is full when it fetches it.
    event.remove(store.engine, "connect", cap)
    store.engine.dispose()
    store.upsert(_items("c", texts[300:], vectors[300:], start=300))
    assert rebuild_changed(store, tmp_path / "builder")["c"]["count"] == 600
    folder = index_dir(tmp_path / "searcher", "c")
    with _file_size_limit(64 * 1024):  # every write past 64 KiB fails (EFBIG), as on a full disk
        assert cache.get("c").version == 1, "v2 could not be stored locally: v1 kept"
    leftovers = [p.name for p in folder.iterdir() if not p.name.startswith("v1.")]
    assert not leftovers, f"no half-written file: {leftovers}"
    assert cache.get("c").version == 2, "with space back, the next check loads v2"
    store.close()


def test_a_read_only_postgres_store_fails_the_ingest_clearly(tmp_path, postgres_url, side_redis):
    read_only = postgres_url + "?options=-c%20default_transaction_read_only%3Don"
    environ = isolated_env(
        tmp_path, side_redis(11), EMBEDQ_TASK_MAX_RETRIES="1", EMBEDQ_TASK_RETRY_BACKOFF_S="1"
    )
    environ["EMBEDQ_DATABASE_URL"] = read_only
    create_store(postgres_url).close()  # the tables exist; only writes are refused
    corpus(tmp_path / "docs.jsonl", 100)
    collection = f"ro-{uuid.uuid4().hex[:6]}"
    with worker(environ, tmp_path / "worker.log", ready=False):
        proc = start_ingest(tmp_path / "docs.jsonl", collection, environ, "--chunk-size", "50")
        out, _ = proc.communicate(timeout=300)
    summary = json.loads(out.strip().splitlines()[-1])
    print(f"\nread-only store: {summary['failed']} failed; {summary['failures'][0]['reason']}")
    assert proc.returncode == 1, "documents not stored make the exit status 1"
    assert summary["failed"] == 100 and summary["stored"] == 0
    assert "StoreError: could not" in summary["failures"][0]["reason"]
    assert "read-only transaction" in summary["failures"][0]["reason"]
    assert create_store(postgres_url).count(collection) == 0
