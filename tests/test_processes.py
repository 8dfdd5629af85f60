"""Real processes: both worker commands, Postgres behind a worker, the embedded Redis, the demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from embedq.broker.client import connect
from embedq.ops.heartbeat import read_heartbeats
from embedq.store.factory import create_store
from tests.conftest import ROOT, load_pydoc

BIN = Path(sys.executable).parent

CLIENT = textwrap.dedent(
    """
    import json, sys
    from embedq.tasks import embed_texts
    args = json.loads(sys.argv[1])
    vectors = embed_texts.delay(args["texts"], collection=args.get("collection"),
                                ids=args.get("ids")).get(timeout=120)
    print(json.dumps({"shape": list(vectors.shape), "type": type(vectors).__name__,
                      "norms": [float((v * v).sum()) for v in vectors]}))
    """
)


def _env(**overrides: str | None) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@contextmanager
def worker_process(cmd: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """A worker subprocess, stopped with SIGTERM (warm shutdown) at the end."""
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_client(env: dict[str, str], **args: object) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, json.dumps(args)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _redis_db(url: str, db: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{db}" if url.startswith("redis://") else url


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
def test_worker_commands_embed_and_store(cmd, database, request, tmp_path, redis_client):
    if database == "postgres":
        db_url = request.getfixturevalue("postgres_url")
    else:
        db_url = f"sqlite:///{tmp_path / 'worker.db'}"
    # A Redis database of its own, so the in-process test worker takes none of these tasks.
    redis_url = _redis_db(os.environ["EMBEDQ_REDIS_URL"], 14)
    if not redis_url.startswith("redis://"):
        pytest.skip("needs a TCP Redis to give the subprocess worker its own database")
    env = _env(
        EMBEDQ_REDIS_URL=redis_url, EMBEDQ_DATABASE_URL=db_url, EMBEDQ_WORKER_CONCURRENCY="4"
    )
    collection = f"proc-{uuid.uuid4().hex[:8]}"
    with worker_process(cmd, env) as proc:
        result = run_client(
            env, texts=["alpha", "beta", "gamma"], collection=collection, ids=["a", "b", "c"]
        )
        beats = read_heartbeats(connect(redis_url)).get("cpu", [])
    output = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, output[-3000:]
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
from embedq.ops.heartbeat import read_heartbeats
        from embedq.broker.url import redis_url
        url = redis_url(default="redis://127.0.0.1:1/0")
        print(url, connect(url).ping())
        """
    )
    env = _env(EMBEDQ_REDIS_URL=None, EMBEDQ_DATA_DIR=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    url, pong = out.stdout.split()
    assert url.startswith("redis+socket://") and url.endswith("redis.socket")
    assert pong == "True"


def test_demo_runs_on_the_embedded_redis_and_stops_cleanly(tmp_path):
    env = _env(
        EMBEDQ_REDIS_URL="embedded",
        EMBEDQ_DATA_DIR=str(tmp_path / "state"),
        EMBEDQ_DATABASE_URL=f"sqlite:///{tmp_path / 'demo.db'}",
    )
    out = subprocess.run(
        [sys.executable, "-m", "embedq.tools.demo"],
        env=env,
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
    assert create_store(env["EMBEDQ_DATABASE_URL"]).count("demo") == 5
    # The demo started the embedded server, so it stopped it too (Redis removes its socket).
    socket_path = out.stdout.split("redis+socket://", 1)[1].split()[0]
    assert not Path(socket_path).exists()


def test_pydoc_ingest_and_search_on_postgres_through_the_cli(postgres_url, redis_client):
    redis_url = _redis_db(os.environ["EMBEDQ_REDIS_URL"], 14)
    if not redis_url.startswith("redis://"):
        pytest.skip("needs a TCP Redis to give the subprocess worker its own database")
    env = _env(EMBEDQ_REDIS_URL=redis_url, EMBEDQ_DATABASE_URL=postgres_url)
    collection = f"pydoc-pg-{uuid.uuid4().hex[:6]}"
    cli = str(BIN / "embedq")
    load_pydoc()  # skips, with the reason, where the shared data is absent
    pydoc = str(ROOT.parent / "shared" / "data" / "pydoc.jsonl")
    with worker_process([cli, "worker", "--queue", "cpu"], env):
        ingested = subprocess.run(
            [cli, "ingest", pydoc, "--collection", collection, "--json"],
            env=env,
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
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        assert json.loads(rebuilt.stdout)[collection]["count"] == 3795
        found = subprocess.run(
            [cli, "search", "parse JSON", "--collection", collection, "-k", "5", "--json"],
            env=env,
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
