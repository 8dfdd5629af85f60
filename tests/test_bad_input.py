"""Bad input through every door: the task API, the HTTP API and the CLI.

Each kind gets a named error or a documented result (docs/reliability.md lists them); the
tasks sent beside it finish with correct vectors, and nothing of a refused call is stored.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from embedq import codec, search
from embedq.api import create_app
from embedq.app import app
from embedq.errors import (
    InvalidFilterError,
    InvalidInputError,
    TooManyTextsError,
    UnknownModelError,
)
from embedq.inputs import parse_embed_request
from embedq.settings import get_settings
from embedq.store.factory import create_store
from embedq.tasks import embed_texts
from tests.helpers import unique_texts

TIMEOUT_S = 120
SQL = "'; DROP TABLE embedq_items; --"


def _nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {}
    root = node
    for _ in range(depth):
        node["n"] = {}
        node = node["n"]
    return root


def _shape(n: int) -> Callable[[Any], None]:
    def check(vectors: Any) -> None:
        assert vectors.shape == (n, 384)

    return check


def _one_truncated(vectors: Any) -> None:
    assert vectors.shape == (1, 384) and vectors.truncated == (0,)


def refused(error: type[Exception], message: str) -> tuple[type[Exception], str]:
    return error, message


# (id, args, kwargs, expected): expected is (error class, message) or a check of the result.
TASK_KINDS: list[tuple[str, tuple[Any, ...], dict[str, Any], Any]] = [
    ("none-list", (None,), {}, refused(InvalidInputError, "list of strings")),
    ("none-text", ([None],), {}, refused(InvalidInputError, r"texts\[0\] is None")),
    ("number", ([1.5],), {}, refused(InvalidInputError, "is float")),
    ("nested-list", (["ok", ["x"]],), {}, refused(InvalidInputError, r"texts\[1\] is list")),
    ("bare-string", ("one string",), {}, refused(InvalidInputError, "wrap it")),
    ("dict", ({"a": "b"},), {}, refused(InvalidInputError, "got dict")),
    ("utf8-bytes", (["café".encode()],), {}, _shape(1)),
    ("invalid-utf8", ([b"\xff\xfeok"],), {}, refused(InvalidInputError, "not valid UTF-8")),
    ("nul-char", (["a\x00b"],), {}, _shape(1)),
    ("nul-stored", (["a\x00b"],), {"collection": "bad"}, refused(InvalidInputError, "NUL")),
    ("lone-surrogate", (["ok\ud800"],), {}, refused(InvalidInputError, "lone surrogate")),
    ("emoji-rtl", (["🎉 مرحبا بالعالم שלום 👋🏽"],), {}, _shape(1)),
    ("one-mb-string", (["word " * 200_000],), {}, _one_truncated),
    ("100k-texts", (["x"] * 100_000,), {}, refused(TooManyTextsError, "100000 texts")),
    ("empty-list", ([],), {}, _shape(0)),
    ("empty-string", ([""],), {}, _shape(1)),
    (
        "duplicated-ids",
        (["x", "y"],),
        {"collection": "bad", "ids": ["a", "a"]},
        refused(InvalidInputError, "repeat"),
    ),
    (
        "ids-bool",
        (["x"],),
        {"collection": "bad", "ids": [True]},
        refused(InvalidInputError, "bool"),
    ),
    (
        "id-too-long",
        (["x"],),
        {"collection": "bad", "ids": ["i" * 600]},
        refused(InvalidInputError, "1-512"),
    ),
    ("ids-no-coll", (["x"],), {"ids": ["a"]}, refused(InvalidInputError, "collection")),
    ("bad-collection", (["x"],), {"collection": "../etc"}, refused(InvalidInputError, "valid")),
    (
        "deep-metadata",
        (["x"],),
        {"collection": "bad", "metadata": [_nested(100)]},
        refused(InvalidInputError, "nests deeper"),
    ),
    (
        "huge-metadata",
        (["x"],),
        {"collection": "bad", "metadata": [{"k": "v" * 70_000}]},
        refused(InvalidInputError, "bytes as JSON"),
    ),
    (
        "nan-metadata",
        (["x"],),
        {"collection": "bad", "metadata": [{"k": math.nan}]},
        refused(InvalidInputError, "JSON"),
    ),
    (
        "nul-metadata",
        (["x"],),
        {"collection": "bad", "metadata": [{"k\x00": 1}]},
        refused(InvalidInputError, "NUL"),
    ),
    (
        "huge-int-metadata",
        (["x"],),
        {"collection": "bad", "metadata": [{"n": 2**64}]},
        refused(InvalidInputError, "beyond 64 bits"),
    ),
    ("normalize-str", (["x"],), {"normalize": "yes"}, refused(InvalidInputError, "true or false")),
    ("unknown-arg", (["x"],), {"colour": "red"}, refused(InvalidInputError, "colour")),
    ("unknown-model", (["x"],), {"model": "no-such"}, refused(UnknownModelError, "not served")),
]


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"), [k[1:] for k in TASK_KINDS], ids=[k[0] for k in TASK_KINDS]
)
def test_task_api(celery_worker, args, kwargs, expected):
    neighbours = unique_texts(3, "neighbour")
    before = [embed_texts.delay([t]) for t in neighbours]
    if isinstance(expected, tuple):
        error, message = expected
        if error is not UnknownModelError:  # only the worker knows its model
            with pytest.raises(error, match=message):
                embed_texts.apply_async(args, kwargs)
        # The same message sent past the caller's check (another client, JSON unless it
        # carries bytes) meets the worker's.
        texts = args[0] if isinstance(args[0], list) else []
        wire = codec.SERIALIZER if any(isinstance(t, bytes) for t in texts) else "json"
        with pytest.raises(error, match=message):
            sent = app.send_task(embed_texts.name, args, kwargs, serializer=wire)
            sent.get(timeout=TIMEOUT_S)
    else:
        expected(embed_texts.apply_async(args, kwargs).get(timeout=TIMEOUT_S))
    alone = embed_texts.delay(neighbours).get(timeout=TIMEOUT_S)
    for result, vector in zip(before, alone, strict=True):
        np.testing.assert_allclose(result.get(timeout=TIMEOUT_S)[0], vector, atol=1e-5)
    if kwargs.get("collection") == "bad":
        assert create_store(get_settings().database_url).count("bad") == 0, "nothing written"


def test_sql_looking_ids_and_metadata_are_stored_verbatim(celery_worker):
    collection = f"sql-{uuid.uuid4().hex[:6]}"
    ids = [SQL, "1 OR 1=1", "Robert'); --"]
    metadata = [{"q": SQL, "nested": {"x": ["a", SQL]}}, {SQL: 1}, {}]
    embed_texts.delay(["a", "b", "c"], collection=collection, ids=ids, metadata=metadata).get(
        timeout=TIMEOUT_S
    )
    store = create_store(get_settings().database_url)
    stored = {item.id: item.metadata for item in store.get(collection, ids)}
    assert stored == dict(zip(ids, metadata, strict=True))
    assert [h.id for h in search("a", collection, k=3, where={"q": SQL})] == [SQL]


@pytest.mark.parametrize(
    ("k", "collection", "outcome"),
    [(0, "c", "k must be"), (10**9, "c", "k must be"), (-1, "c", "k must be"), (3, "none-x", [])],
    ids=["k-zero", "k-huge", "k-negative", "unknown-collection"],
)
def test_search_arguments(celery_worker, k, collection, outcome):
    if isinstance(outcome, str):
        with pytest.raises(InvalidInputError, match=outcome):
            search("anything", collection, k=k)
    else:  # documented: a collection nothing was stored in has no hits
        assert search("anything", collection, k=k) == outcome


@pytest.mark.parametrize(
    ("where", "says"),
    [({"n": 2**70}, "outside the numbers"), ({"$where": "1"}, "unknown operator")],
    ids=["int-2^70", "unknown-op"],
)
def test_search_filters_are_checked_before_the_query_is_embedded(where, says):
    # No worker fixture: a bad filter is refused before any task or database.
    with pytest.raises(InvalidFilterError, match=says):
        search("anything", "c", where=where)


KEY = "bad-input-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {KEY}"}

Q = {"query": "x", "collection": "c"}
# (id, path, JSON body or raw bytes, expected status, text the answer must contain)
HTTP_KINDS: list[tuple[str, str, Any, int, str]] = [
    ("none-list", "/embed", {"texts": None}, 422, "texts"),
    ("none-text", "/embed", {"texts": [None]}, 422, "texts"),
    ("number", "/embed", {"texts": [1.5]}, 422, "texts"),
    ("nested-list", "/embed", {"texts": [["a"]]}, 422, "texts"),
    ("bare-string", "/embed", {"texts": "one"}, 422, "texts"),
    ("dict", "/embed", {"texts": {"a": "b"}}, 422, "texts"),
    ("not-json", "/embed", b"{texts: [", 422, "JSON"),
    ("invalid-utf8", "/embed", b'{"texts": ["\xff\xfe"]}', 400, "UTF-8"),
    ("nul-char", "/embed", {"texts": ["a\u0000b"]}, 200, ""),
    ("lone-surrogate", "/embed", b'{"texts": ["ok\\ud800"]}', 422, "surrogate"),
    ("emoji-rtl", "/embed", {"texts": ["🎉 مرحبا שלום"]}, 200, ""),
    ("too-long-text", "/embed", {"texts": ["a" * 2001]}, 413, "EMBEDQ_API_MAX_TEXT_CHARS"),
    ("too-many-texts", "/embed", {"texts": ["x"] * 100_000}, 413, "EMBEDQ_API_MAX_BODY_MB"),
    ("many-texts", "/embed", {"texts": ["x"] * 6}, 413, "EMBEDQ_API_MAX_TEXTS"),
    ("empty-list", "/embed", {"texts": []}, 200, ""),
    ("unknown-model", "/embed", {"texts": ["x"], "model": "no-such"}, 404, "no-such"),
    ("bad-queue", "/embed", {"texts": ["x"], "queue": "tpu"}, 422, "queue"),
    ("normalize-str", "/embed", {"texts": ["x"], "normalize": "maybe"}, 422, "normalize"),
    ("token-arrays", "/v1/embeddings", {"input": [[1, 2, 3]]}, 422, "input"),
    ("k-zero", "/search", {"query": "x", "collection": "c", "k": 0}, 422, "k"),
    ("k-huge", "/search", {"query": "x", "collection": "c", "k": 10**9}, 422, "k"),
    ("no-collection", "/search", {"query": "x"}, 422, "collection"),
    ("sql-collection", "/search", {"query": "x", "collection": SQL}, 422, "collection"),
    ("unknown-collection", "/search", {"query": "x", "collection": "nope-zz"}, 200, "hits"),
    ("where-not-dict", "/search", {"query": "x", "collection": "c", "where": [1]}, 422, "where"),
    ("where-int-2^70", "/search", {**Q, "where": {"n": 2**70}}, 422, "outside the numbers"),
    ("where-below-int64", "/search", {**Q, "where": {"n": -(2**63) - 1}}, 422, "outside"),
    ("where-nul-key", "/search", {**Q, "where": {"a\u0000": 1}}, 422, "NUL"),
    ("where-2000-keys", "/search", {**Q, "where": {f"k{i}": i for i in range(2000)}}, 422, "64"),
    ("where-unknown-op", "/search", {**Q, "where": {"k": {"$like": "a%"}}}, 422, "operator"),
    ("k-string", "/search", {**Q, "k": "5"}, 422, "k"),
    ("k-true", "/search", {**Q, "k": True}, 422, "k"),
    ("empty-query", "/search", {"query": "", "collection": "c"}, 422, "query"),
    ("normalize-1", "/embed", {"texts": ["x"], "normalize": 1}, 422, "normalize"),
]


@pytest.fixture(scope="module")
def client(celery_worker):
    settings_ = get_settings().model_copy(
        update={
            "api_keys": KEY,
            "api_max_texts": 5,
            "api_max_text_chars": 2000,
            "api_max_body_mb": 0.05,
            "api_rate_limit_per_min": 10**6,
        }
    )
    return TestClient(create_app(settings_))


@pytest.mark.parametrize(
    ("path", "body", "status", "names"), [k[1:] for k in HTTP_KINDS], ids=[k[0] for k in HTTP_KINDS]
)
def test_http_api(client, path, body, status, names):
    if isinstance(body, bytes):
        headers = AUTH | {"Content-Type": "application/json"}
        response = client.post(path, content=body, headers=headers)
    else:
        response = client.post(path, json=body, headers=AUTH)
    assert response.status_code == status, response.text
    if status >= 400:
        error = response.json()["error"]
        assert error["code"] == status and names in error["message"], error
    else:
        assert names in response.text


BIN = os.path.dirname(sys.executable)


def _cli(*args: str | bytes, cwd: Any = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [os.path.join(BIN, "embedq"), *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (("embed", b"caf\xff"), 2, "lone surrogate"),  # argv that is not UTF-8
        (("embed", ""), 0, '"dim": 384'),
        (("embed", "🎉 مرحبا", "word " * 20_000), 0, '"truncated": true'),
        (("search", "x", "--collection", "c", "-k", "0"), 2, "k must be"),
        (("search", "x", "--collection", "c", "-k", "100000000"), 2, "k must be"),
        (("search", "x", "--collection", "bad name!"), 2, "not a valid name"),
        (("search", "x", "--collection", "nope-unknown"), 0, ""),
        (("search", "", "--collection", "c"), 2, "non-empty"),
        (("search", "x", "--collection", "c", "--where", "novalue"), 2, "key=value"),
        (("search", "x", "--collection", "c", "--where", f"n={2**70}"), 2, "outside the numbers"),
        (("ingest", "-", "--collection", "c", "--format", "xml"), 2, "unknown format"),
    ],
    ids=[
        "argv-not-utf8",
        "empty",
        "emoji-and-100k",
        "k-zero",
        "k-huge",
        "bad-collection",
        "unknown-collection",
        "empty-query",
        "bad-where",
        "where-int-2^70",
        "bad-format",
    ],
)
def test_cli(celery_worker, args, code, says):
    out = _cli(*args)
    assert out.returncode == code, out.stdout[-2000:] + out.stderr[-2000:]
    assert says in out.stdout + out.stderr
    assert "Traceback" not in out.stderr


def test_cli_ingest_of_a_messy_file_stores_the_good_lines_and_names_the_bad(
    celery_worker, tmp_path
):
    good = [{"id": f"g{i}", "text": f"good line {i} {uuid.uuid4().hex}"} for i in range(5)]
    lines = [json.dumps(d) for d in good] + [
        "{not json",
        json.dumps({"id": "n", "text": None}),
        json.dumps({"id": "l", "text": ["nested"]}),
        json.dumps({"id": {"x": 1}, "text": "id is an object"}),
        json.dumps([1, 2]),
        json.dumps({"id": "z", "text": "nul \u0000 inside"}),
        json.dumps({"id": "g0", "text": "a repeated id: the last one wins"}),
    ]
    path = tmp_path / "messy.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"id": "b", "text": "\xff"}\n')
    collection = f"messy-{uuid.uuid4().hex[:6]}"
    out = _cli("ingest", str(path), "--collection", collection, "--json")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    reasons = " | ".join(f["reason"] for f in summary["failures"])
    assert out.returncode == 1, "documents not stored make the exit status 1"
    assert summary["read"] == 13 and summary["failed"] == 6, summary
    for why in ("not valid JSON", "'text' is missing", "'id' is not", "not a JSON object", "NUL"):
        assert why in reasons, reasons
    store = create_store(get_settings().database_url)
    # g0..g4 and the U+FFFD-replaced bad-bytes line; the NUL line was refused with its task.
    stored = {item.id: item.text for item in store.get(collection, [*(d["id"] for d in good), "b"])}
    assert set(stored) >= {"g1", "g2", "g3", "g4"}


def test_cli_ingest_of_a_csv_without_the_text_column_stops_at_once(tmp_path):
    path = tmp_path / "no_text.csv"
    path.write_text("id,body\n1,hello\n")
    out = _cli("ingest", str(path), "--collection", "c")
    assert out.returncode == 2 and "no 'text' column" in out.stderr, out.stderr
    assert "--text-field" in out.stderr and "Traceback" not in out.stderr


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    texts=st.lists(
        st.text(max_size=200) | st.binary(max_size=40) | st.none() | st.integers(), max_size=8
    ),
    metadata=st.lists(st.dictionaries(st.text(max_size=10), json_values, max_size=4), max_size=8),
)
# Found by this test in CI: an integer beyond 64 bits passed parsing and broke msgpack.
@example(texts=["a"], metadata=[{"n": 2**64}])
@example(texts=["a"], metadata=[{"n": [-(2**63) - 1]}])
def test_any_texts_and_metadata_are_parsed_or_refused_by_name(texts, metadata):
    meta = metadata[: len(texts)] + [{}] * max(0, len(texts) - len(metadata))
    try:
        request = parse_embed_request(texts, collection="h", metadata=meta)
    except InvalidInputError:
        return
    # What is accepted crosses the wire intact and can be stored as JSON.
    assert codec.loads(codec.dumps(request.texts)) == request.texts
    assert codec.loads(codec.dumps(request.metadata)) == request.metadata
    assert all(isinstance(t, str) and "\x00" not in t for t in request.texts)
    json.dumps(request.metadata, allow_nan=False)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(texts=st.lists(st.text(min_size=1, max_size=60), min_size=1, max_size=4, unique=True))
def test_any_accepted_texts_are_embedded_and_stored_whole(celery_worker, texts):
    collection = f"hyp-{uuid.uuid4().hex[:6]}"
    try:
        parse_embed_request(texts, collection=collection)
    except InvalidInputError:
        return
    ids = [f"i{n}" for n in range(len(texts))]
    vectors = embed_texts.delay(texts, collection=collection, ids=ids).get(timeout=TIMEOUT_S)
    assert vectors.shape == (len(texts), 384) and np.isfinite(vectors).all()
    stored = {i.id: i.text for i in create_store(get_settings().database_url).get(collection, ids)}
    assert stored == dict(zip(ids, texts, strict=True))
