"""Real processes: both worker commands, Postgres behind a worker, the embedded Redis, the demo."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from embedq.broker.client import connect
from embedq.ops.heartbeat import read_heartbeats
from embedq.store.factory import create_store
from tests.helpers import BIN, SHARED_DATA, embed_in_client, env, load_pydoc, worker


@pytest.mark.parametrize(
    ("cmd", "database"),
    [
        pytest.param(
            [str(BIN / "embedq"), "worker", "--queue", "cpu"],
            "postgres",
            id="embedq-worker-postgres",
        ),
        pytest.param(
            [str(BIN / "celery"), "-A", "embedq.app", "worker", "-Q", "cpu"],
            "sqlite",
            id="celery-worker-sqlite",
        ),
    ],
)
def test_worker_commands_embed_and_store(cmd, database, request, tmp_path, side_redis):
    if database == "postgres":
        db_url = request.getfixturevalue("postgres_url")
    else:
        db_url = f"sqlite:///{tmp_path / 'worker.db'}"
    # A Redis of its own, so the in-process test worker takes none of these tasks.
    redis_url = side_redis(14)
    environ = env(
        EMBEDQ_REDIS_URL=redis_url, EMBEDQ_DATABASE_URL=db_url, EMBEDQ_WORKER_CONCURRENCY="4"
    )
    collection = f"proc-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "worker.log"
    with worker(environ, log, cmd) as proc:
        result = embed_in_client(
            environ, texts=["alpha", "beta", "gamma"], collection=collection, ids=["a", "b", "c"]
        )
        beats = read_heartbeats(connect(redis_url)).get("cpu", [])
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert len(beats) == 1, "a live worker publishes one heartbeat for its queue"
    assert result["shape"] == [3, 384]
    assert result["type"] == "Embeddings"
    assert all(abs(n - 1.0) < 1e-4 for n in result["norms"])
    store = create_store(db_url)
    assert store.count(collection) == 3
    store.close()


def test_unanswered_default_falls_back_to_embedded_redis(tmp_path):
    code = textwrap.dedent(
        """
        from embedq.broker.client import connect
        from embedq.broker.url import redis_url
        url = redis_url(default="redis://127.0.0.1:1/0")
        print(url, connect(url).ping())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env(EMBEDQ_REDIS_URL=None, EMBEDQ_DATA_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    url, pong = out.stdout.split()
    assert url.startswith("redis+socket://") and url.endswith("redis.socket")
    assert pong == "True"


def test_demo_runs_on_the_embedded_redis_and_stops_cleanly(tmp_path):
    environ = env(
        EMBEDQ_REDIS_URL="embedded",
        EMBEDQ_DATA_DIR=str(tmp_path / "state"),
        EMBEDQ_DATABASE_URL=f"sqlite:///{tmp_path / 'demo.db'}",
    )
    out = subprocess.run(
        [sys.executable, "-m", "embedq.tools.demo"],
        env=environ,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "redis+socket://" in out.stdout
    assert "cosine similarity" in out.stdout
    assert "worker stopped cleanly" in out.stdout
    # The guitar sentences are closer to each other than to the cooking one.
    rows = [line for line in out.stdout.splitlines() if line.startswith("│ [0]")]
    values = [float(x) for x in rows[0].split("│")[2:-1]]
    assert values[1] > 0.5 > values[2]
    assert create_store(environ["EMBEDQ_DATABASE_URL"]).count("demo") == 5
    # The demo started the embedded server, so it stopped it too (Redis removes its socket).
    socket_path = out.stdout.split("redis+socket://", 1)[1].split()[0]
    assert not Path(socket_path).exists()


def test_pydoc_ingest_and_search_on_postgres_through_the_cli(
    postgres_url, side_redis, onnx_data_dir, tmp_path
):
    # The cpu queue's default encoder (int8 ONNX, exported once per session), as deployed;
    # about three times faster here than the fp32 torch the in-process tests compare with.
    environ = env(
        EMBEDQ_REDIS_URL=side_redis(14),
        EMBEDQ_DATABASE_URL=postgres_url,
        EMBEDQ_CPU_BACKEND="onnx-int8",
        EMBEDQ_DATA_DIR=str(onnx_data_dir),
    )
    collection = f"pydoc-pg-{uuid.uuid4().hex[:6]}"
    cli = str(BIN / "embedq")
    load_pydoc()  # skips, with the reason, where the shared data is absent
    pydoc = str(SHARED_DATA / "pydoc.jsonl")
    with worker(environ, tmp_path / "worker.log", ready=False):
        ingested = subprocess.run(
            [cli, "ingest", pydoc, "--collection", collection, "--json"],
            env=environ,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert ingested.returncode == 0, ingested.stderr[-3000:]
        summary = json.loads(ingested.stdout.strip().splitlines()[-1])
        assert summary["stored"] + summary["skipped"] == 3795 and summary["failed"] == 0
        rebuilt = subprocess.run(
            [cli, "index", "rebuild", "--collection", collection],
            env=environ,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        assert json.loads(rebuilt.stdout)[collection]["count"] == 3795
        found = subprocess.run(
            [cli, "search", "parse JSON", "--collection", collection, "-k", "5", "--json"],
            env=environ,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert found.returncode == 0, found.stderr[-3000:]
    ids = [json.loads(line)["id"] for line in found.stdout.strip().splitlines()]
    assert len(ids) == 5 and any(i.startswith("json.") for i in ids), ids
    assert create_store(postgres_url).count(collection) == 3795


def test_ingest_of_a_missing_file_is_a_clear_error(tmp_path):
    out = subprocess.run(
        [str(BIN / "embedq"), "ingest", "nope.jsonl", "--collection", "c"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert "is not a readable file" in out.stderr
    assert "Traceback" not in out.stderr
