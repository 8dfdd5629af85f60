"""The HTTP API against the real in-process worker: shapes, auth, rate limit, limits, errors."""

from __future__ import annotations

import base64
import uuid

import numpy as np
import pytest
from fastapi.testclient import TestClient

from embedq.api import create_app
from embedq.errors import ConfigurationError, StoreError
from embedq.settings import get_settings
from tests.helpers import unique_texts

KEY = "test-key-" + uuid.uuid4().hex


def _app(**overrides: object):
    return create_app(get_settings().model_copy(update={"api_keys": KEY, **overrides}))


AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def client(celery_worker):
    return TestClient(_app(api_max_texts=5, api_max_text_chars=2000, api_max_body_mb=0.05))


def test_without_keys_the_api_refuses_to_start():
    with pytest.raises(ConfigurationError, match="EMBEDQ_API_KEYS"):
        create_app(get_settings().model_copy(update={"api_keys": None}))


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}])
def test_missing_or_wrong_key_is_401(client, headers):
    response = client.post("/embed", json={"texts": ["x"]}, headers=headers)
    assert response.status_code == 401
    assert "API key" in response.json()["error"]["message"]


def test_embed_matches_raw_encode(client, raw_model):
    texts = ["The cat sits on the mat.", "Ein Hund läuft im Park."]
    response = client.post("/embed", json={"texts": texts}, headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dim"] == 384 and body["truncated"] == []
    got = np.asarray(body["vectors"], dtype=np.float32)
    want = raw_model.encode(texts, normalize_embeddings=True)
    assert (got * want).sum(axis=1).min() >= 0.9999


def test_openai_shape_float_and_base64(client):
    texts = unique_texts(3, "openai")
    floats = client.post("/v1/embeddings", json={"input": texts}, headers=AUTH).json()
    assert floats["object"] == "list" and floats["model"] == "all-MiniLM-L6-v2"
    assert [d["index"] for d in floats["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 384 for d in floats["data"])
    assert floats["usage"]["prompt_tokens"] == floats["usage"]["total_tokens"] > 3
    b64 = client.post(
        "/v1/embeddings", json={"input": texts, "encoding_format": "base64"}, headers=AUTH
    ).json()
    decoded = np.frombuffer(base64.b64decode(b64["data"][1]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, floats["data"][1]["embedding"], atol=1e-6)
    single = client.post("/v1/embeddings", json={"input": "one"}, headers=AUTH).json()
    assert len(single["data"]) == 1


@pytest.mark.parametrize(
    ("body", "status", "names"),
    [
        ({"texts": ["a"] * 6}, 413, "EMBEDQ_API_MAX_TEXTS"),
        ({"texts": ["a" * 2001]}, 413, "EMBEDQ_API_MAX_TEXT_CHARS"),
        ({"texts": ["a" * 1000] * 60}, 413, "EMBEDQ_API_MAX_BODY_MB"),
        ({"texts": "not a list"}, 422, "texts"),
        ({"texts": [1, None]}, 422, "texts"),
        ({}, 422, "texts"),
        ({"texts": ["x"], "queue": "tpu"}, 422, "queue"),
        ({"texts": ["x"], "model": "no-such-model"}, 404, "no-such-model"),
    ],
)
def test_limits_and_bad_input_name_the_problem(client, body, status, names):
    response = client.post("/embed", json=body, headers=AUTH)
    assert response.status_code == status, response.text
    assert names in response.json()["error"]["message"]


def test_openai_rejects_other_dimensions(client):
    response = client.post("/v1/embeddings", json={"input": "x", "dimensions": 12}, headers=AUTH)
    assert response.status_code == 422 and "384" in response.json()["error"]["message"]


def test_rate_limit_per_key(celery_worker):
    key = "rate-" + uuid.uuid4().hex
    limited = TestClient(
        create_app(
            get_settings().model_copy(
                update={"api_keys": f"{key},{KEY}", "api_rate_limit_per_min": 3}
            )
        )
    )
    headers = {"Authorization": f"Bearer {key}"}
    codes = [
        limited.post("/embed", json={"texts": ["r"]}, headers=headers).status_code for _ in range(4)
    ]
    assert codes[:3] == [200, 200, 200] and codes[3] == 429
    last = limited.post("/embed", json={"texts": ["r"]}, headers=headers)
    assert "EMBEDQ_API_RATE_LIMIT_PER_MIN" in last.json()["error"]["message"]
    assert 1 <= int(last.headers["Retry-After"]) <= 61


def test_timeout_is_504(celery_worker):
    slow = TestClient(_app(api_timeout_s=0.0001))
    # Full-length texts (256 tokens each): seconds of work, well past Celery's ~1 s wait
    # granularity, so no machine answers in time.
    texts = [" ".join([text] * 40) for text in unique_texts(60, "timeout")]
    response = slow.post("/embed", json={"texts": texts}, headers=AUTH)
    assert response.status_code == 504
    assert "EMBEDQ_API_TIMEOUT_S" in response.json()["error"]["message"]


def test_health_metadata_and_search(client):
    assert client.get("/health").json()["status"] == "ready"
    meta = client.get("/metadata", headers=AUTH).json()
    assert meta["dim"] == 384 and set(meta["queues"]) == {"cpu", "gpu"} and "cpu" in meta["devices"]
    assert set(meta["cost"]) == {"queues", "workers"}  # priced workers only (none here)
    collection = "api-" + uuid.uuid4().hex[:8]
    from embedq.tasks import embed_texts

    texts = ["how to parse JSON", "a recipe for bread", "sorting a list"]
    embed_texts.delay(texts, collection=collection, ids=["j", "b", "s"]).get(timeout=60)
    hits = client.post(
        "/search",
        json={"query": "decode json text", "collection": collection, "k": 2},
        headers=AUTH,
    ).json()["hits"]
    assert hits[0]["id"] == "j" and len(hits) == 2
    for bad in ({"query": "x", "collection": collection, "k": 0}, {"query": "x"}):
        assert client.post("/search", json=bad, headers=AUTH).status_code == 422
    missing = client.post(
        "/search", json={"query": "x", "collection": "nope-" + collection}, headers=AUTH
    )
    # Documented: a collection nothing was stored in has no hits.
    assert missing.status_code == 200 and missing.json()["hits"] == []


def test_a_store_failure_or_a_bug_says_nothing_of_the_database():
    app = _app()

    def store_down() -> None:
        raise StoreError("could not read items: OperationalError: unable to open database file")

    def bug() -> None:
        raise KeyError("embedq_items.metadata")

    app.add_api_route("/store-down", store_down)
    app.add_api_route("/bug", bug)
    client = TestClient(app, raise_server_exceptions=False)
    down = client.get("/store-down")
    assert down.status_code == 502 and down.json()["error"]["type"] == "StoreError"
    assert "OperationalError" not in down.text and "database file" not in down.text
    broken = client.get("/bug")
    assert broken.status_code == 500 and broken.json()["error"]["code"] == 500
    assert "embedq_items" not in broken.text
