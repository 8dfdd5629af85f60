"""Several models in one worker (EMBEDQ_MODELS): selected by name through tasks, ingest and
the API; one batcher and cache space per model; a collection keeps to one model.

The second model is real: all-MiniLM-L6-v2 cut to 3 layers (``second_model_dir``). The
worker is the session's in-process one, whose runtime is swapped for a two-model runtime
built from ``EMBEDQ_MODELS`` for this module, then put back.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from embedq.errors import CollectionModelError, ConfigurationError, UnknownModelError
from embedq.keys import vector_key
from embedq.settings import Settings, get_settings
from embedq.store.base import Item
from embedq.tasks import embed_texts
from embedq.worker import runtime as runtime_module
from embedq.worker.cache import unpack_vector
from tests.helpers import unique_texts

L3 = "l3"


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


@pytest.fixture(scope="module")
def raw_l3(second_model_dir: Path) -> Any:
    """The second model as users load it with sentence-transformers."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(second_model_dir), device="cpu", local_files_only=True)


@pytest.fixture(scope="module")
def two_models(celery_worker: Any, second_model_dir: Path) -> Iterator[Any]:
    """The worker's runtime, for this module: the default model and ``l3``, from
    EMBEDQ_MODELS; its heartbeat lists both before any test runs."""
    from embedq.producer import router
    from embedq.worker import signals

    settings = get_settings().model_copy(
        update={"models": f"all-MiniLM-L6-v2,{L3}={second_model_dir}", "max_memory_mb": 512}
    )
    original = runtime_module.get_runtime()
    swapped = runtime_module.Runtime(settings)
    runtime_module._runtime = swapped
    for beat in signals._heartbeats:
        beat.beat()
    router.router._read_at = -router.CACHE_S
    yield swapped
    runtime_module._runtime = original
    for beat in signals._heartbeats:
        beat.beat()
    router.router._read_at = -router.CACHE_S
    swapped.close()


def test_models_setting_lists_the_default_first():
    from embedq.encode.models import ModelSpec, model_specs

    settings = Settings(models=" all-MiniLM-L6-v2 , l3=/models/minilm-l3,/models/e5 ")
    assert settings.model == "all-MiniLM-L6-v2"
    assert model_specs(settings) == [
        ModelSpec("all-MiniLM-L6-v2", "all-MiniLM-L6-v2"),
        ModelSpec("l3", "/models/minilm-l3"),
        ModelSpec("/models/e5", "/models/e5"),
    ]
    assert model_specs(Settings(model="/models/one")) == [ModelSpec("/models/one", "/models/one")]
    with pytest.raises(ConfigurationError, match="unique"):
        model_specs(Settings(models="a=/x,a=/y"))


def test_each_model_has_its_batcher_id_and_share_of_the_memory_cap(two_models):
    default, l3 = two_models.encoders
    assert (default.name, l3.name) == ("all-MiniLM-L6-v2", L3)
    assert default.model_id != l3.model_id and l3.model_id.startswith("minilm-l3@")
    assert default.memory_cap == l3.memory_cap == 256 * 2**20
    assert set(two_models.batchers) == {default.model_id, l3.model_id}
    assert two_models.batchers[l3.model_id].encoder is l3
    assert [m["name"] for m in two_models.models()] == ["all-MiniLM-L6-v2", L3]


def test_each_model_s_vectors_match_its_raw_encode(two_models, raw_model, raw_l3, unseen_texts):
    l3_batcher = two_models.batchers[two_models.encoders[1].model_id]
    before = l3_batcher.stats.texts_encoded
    l3_result = embed_texts.delay(unseen_texts, model=L3)
    default_result = embed_texts.delay(unseen_texts)
    l3_vectors = l3_result.get(timeout=120)
    default_vectors = default_result.get(timeout=120)
    l3_expected = raw_l3.encode(unseen_texts, normalize_embeddings=True)
    assert cosines(l3_vectors, l3_expected).min() >= 0.9999
    assert cosines(default_vectors, raw_model.encode(unseen_texts)).min() >= 0.9999
    # Really two models: the same texts get different vectors.
    assert cosines(l3_vectors, default_vectors).mean() < 0.98
    assert l3_batcher.stats.texts_encoded > before
    # The default is selected by its name too.
    named = embed_texts.delay(unseen_texts[:3], model="all-MiniLM-L6-v2").get(timeout=60)
    np.testing.assert_allclose(named, default_vectors[:3], atol=1e-5)


def test_the_same_text_under_two_models_never_shares_a_cache_entry(two_models, redis_client):
    text = unique_texts(1, "cache-per-model")
    l3_first = embed_texts.delay(text, model=L3).get(timeout=60)
    default_after = embed_texts.delay(text).get(timeout=60)
    assert cosines(l3_first, default_after)[0] < 0.99
    keys = [vector_key(e.model_id, True, text[0]) for e in two_models.encoders]
    assert len(set(keys)) == 2
    cached = [unpack_vector(redis_client.get(key))[0] for key in keys]
    np.testing.assert_allclose(cached[0], default_after[0], atol=1e-6)
    np.testing.assert_allclose(cached[1], l3_first[0], atol=1e-6)


def test_one_worker_serves_both_side_by_side(two_models, raw_model, raw_l3):
    texts = unique_texts(40, "side-by-side")
    sent = [
        (embed_texts.delay(texts[i : i + 4], model=L3 if i % 8 else None), i)
        for i in range(0, len(texts), 4)
    ]
    for result, i in sent:
        raw = raw_l3 if i % 8 else raw_model
        expected = raw.encode(texts[i : i + 4], normalize_embeddings=True)
        assert cosines(result.get(timeout=120), expected).min() >= 0.9999


def test_an_unserved_model_is_refused_by_name(two_models):
    with pytest.raises(UnknownModelError, match="model 'nope' is not served by any live worker"):
        embed_texts.delay(["x"], model="nope")
    with pytest.raises(UnknownModelError, match="not served here"):
        two_models.select("nope")


def test_ingest_selects_the_model_and_binds_the_collection(two_models, raw_l3, tmp_path):
    from embedq.cli import cli
    from embedq.search.searcher import search

    collection = f"l3-{uuid.uuid4().hex[:8]}"
    docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(unique_texts(12, "ingest-l3"))]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    args = ["ingest", str(path), "--collection", collection, "--model", L3, "--json", "--quiet"]
    run = CliRunner().invoke(cli, args)
    assert run.exit_code == 0, run.output
    assert json.loads(run.output.strip().splitlines()[-1])["stored"] == 12
    l3 = two_models.encoders[1]
    stored = two_models.store.get(collection, [d["id"] for d in docs])
    assert {item.model for item in stored} == {l3.model_id}
    by_id = {item.id: item.vector for item in stored}
    expected = raw_l3.encode([d["text"] for d in docs], normalize_embeddings=True)
    assert cosines(np.stack([by_id[d["id"]] for d in docs]), expected).min() >= 0.9999
    assert two_models.store.collection_model(collection) == l3.model_id
    # Search embeds the query with the collection's model: a document finds itself.
    assert search(docs[5]["text"], collection, k=1)[0].id == "d5"
    # The default model's vectors are refused by name, through a task and the store.
    with pytest.raises(CollectionModelError, match="bound to model 'minilm-l3@"):
        embed_texts.delay(["another"], collection=collection).get(timeout=60)
    other = Item(collection, "x", "x", np.ones(384, np.float32), "all-MiniLM-L6-v2@0", "h")
    with pytest.raises(CollectionModelError):
        two_models.store.upsert([other])
    assert two_models.store.count(collection) == 12


def test_the_api_selects_by_model_and_lists_every_model(two_models, raw_l3):
    from embedq.api import create_app

    client = TestClient(create_app(get_settings().model_copy(update={"api_keys": "k"})))
    headers = {"Authorization": "Bearer k"}
    texts = unique_texts(3, "api-l3")
    reply = client.post("/embed", json={"texts": texts, "model": L3}, headers=headers)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == L3
    expected = raw_l3.encode(texts, normalize_embeddings=True)
    assert cosines(np.array(reply.json()["vectors"]), expected).min() >= 0.9999
    listed = client.get("/metadata", headers=headers).json()["models"]
    assert {(m["name"], m["dim"]) for m in listed} >= {("all-MiniLM-L6-v2", 384), (L3, 384)}
    unknown = client.post("/embed", json={"texts": ["x"], "model": "nope"}, headers=headers)
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "UnknownModelError"


def test_usage_tokens_are_counted_by_the_tokenizer_of_the_model_named(two_models, second_model_dir):
    from embedq.api import create_app
    from embedq.encode.models import base_model_id, tokenizer_name
    from embedq.ops.registry import listed_models
    from embedq.producer.router import router

    served = [
        m
        for beats in router.heartbeats(fresh=True).values()
        for b in beats
        for m in listed_models(b)
    ]
    l3_id = next(str(m["model_id"]) for m in served if m["name"] == L3)
    settings = get_settings().model_copy(
        update={"models": f"all-MiniLM-L6-v2,{L3}={second_model_dir}"}
    )
    # By its id (with or without the backend suffix) or its alias: the model's own tokenizer.
    for named in (l3_id, base_model_id(l3_id), L3):
        assert tokenizer_name(named, settings, served) == L3, named
    assert tokenizer_name("nope", settings, served) == tokenizer_name(None, settings, served)
    assert tokenizer_name(None, settings, served) == "all-MiniLM-L6-v2"
    client = TestClient(create_app(settings.model_copy(update={"api_keys": "k"})))
    body = {"input": ["one two three"], "model": l3_id}
    reply = client.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer k"})
    assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] == 5, reply.text


def test_the_router_sends_a_model_only_where_it_is_served():
    from embedq.producer.router import serving_queues, task_model

    beats = {
        "cpu": [
            {"models": [{"name": "a", "model_id": "a@1+int8"}, {"name": "b", "model_id": "b@2"}]}
        ],
        "gpu": [{"model": "a", "model_id": "a@1"}],
    }
    assert serving_queues(beats, "a") == {"cpu", "gpu"}
    assert serving_queues(beats, "a@1") == {"cpu", "gpu"}
    assert serving_queues(beats, "b") == {"cpu"}
    assert serving_queues(beats, "c") == set()
    assert task_model("embedq.embed_texts", (["t"], "b"), {}) == "b"
    assert task_model("embedq.ingest_documents", ("c", [], None), {"model": "a"}) == "a"
    assert task_model("embedq.embed_texts", (["t"],), {}) is None
