"""Collections over HTTP for many tenants: keys scoped to collections (EMBEDQ_API_KEYS and a
key file re-read on change), the documents API, and the listing; against the real
in-process worker, Redis and store."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from embedq.api import create_app
from embedq.errors import ConfigurationError
from embedq.settings import get_settings
from embedq.web.keys import Caller, KeyRing, key_id, parse_entry, parse_keys

RUN = uuid.uuid4().hex[:8]
ADMIN, ALICE, BOB = f"adm-key-{RUN}", f"alice-key-{RUN}", f"bob-key-{RUN}"
# Globs of this run only: the README walkthrough owns alice-* and bob-* in the session.
KEYS = f"{ADMIN},{ALICE}:t{RUN}-alice-*,{BOB}:t{RUN}-bob-*"
A_DOCS, B_DOCS = f"t{RUN}-alice-docs", f"t{RUN}-bob-docs"
ALICE_TEXT = f"Alice's secret plan {RUN}: sell the lemonade stand on Tuesday"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def client(celery_worker: Any) -> TestClient:
    return TestClient(create_app(get_settings().model_copy(update={"api_keys": KEYS})))


@pytest.fixture(scope="module")
def alice_docs(client: TestClient) -> dict[str, Any]:
    docs = [
        {"id": "plan", "text": ALICE_TEXT, "metadata": {"owner": "alice"}},
        {"id": "note", "text": "Buy more lemons and sugar.", "metadata": {}},
    ]
    body = {"documents": docs}
    response = client.post(f"/collections/{A_DOCS}/documents", json=body, headers=auth(ALICE))
    assert response.status_code == 200, response.text
    return response.json()


def test_entries_scope_keys_to_globs_and_keep_only_digests():
    ring = KeyRing(KEYS, None)
    alice = ring.identify(ALICE)
    assert alice == Caller(key_id(ALICE), (f"t{RUN}-alice-*",))
    assert alice.may(A_DOCS) and not alice.may(B_DOCS) and not alice.may(A_DOCS.upper())
    assert ring.identify(ADMIN) == Caller(key_id(ADMIN), None)
    assert ring.identify("alice") is None and ring.identify("") is None
    assert parse_entry("k:bob-*|shared").patterns == ("bob-*", "shared")
    # Nothing the ring holds is a key in clear.
    held = repr(vars(ring))
    assert not any(key in held for key in (ADMIN, ALICE, BOB))


@pytest.mark.parametrize(
    "bad", ["zq7secret:", "zq7secret:bad name", "zq7 secret", "zq7secret:b c", ":x-*"]
)
def test_a_bad_entry_is_refused_by_position_never_by_its_key(bad):
    with pytest.raises(ConfigurationError, match="entry 2") as caught:
        parse_keys(f"good,{bad}")
    assert "zq7" not in str(caught.value)


def test_bob_reaches_nothing_of_alice_s_and_learns_nothing(client, alice_docs):
    assert alice_docs["stored"] == 2 and alice_docs["documents"] == 2
    bob, never = auth(BOB), f"t{RUN}-alice-never-made"
    answers = {
        "read": client.get(f"/collections/{A_DOCS}/documents/plan", headers=bob),
        "write": client.post(
            f"/collections/{A_DOCS}/documents",
            json={"documents": [{"id": "plan", "text": "overwritten by bob"}]},
            headers=bob,
        ),
        "delete": client.delete(f"/collections/{A_DOCS}/documents/plan", headers=bob),
        "search": client.post(
            "/search", json={"query": "lemonade plan", "collection": A_DOCS}, headers=bob
        ),
    }
    missing = client.get(f"/collections/{never}/documents/plan", headers=bob).json()
    for what, response in answers.items():
        assert response.status_code == 404, (what, response.text)
        # The same answer as for a collection that never existed, but for its name.
        assert response.json() == _renamed(missing, never, A_DOCS), what
        assert "lemonade" not in response.text and "plan'" not in response.text
    listed = client.get("/collections", headers=bob).json()["collections"]
    assert not [c for c in listed if "-alice-" in c["name"]]
    # Alice's document is as she wrote it.
    kept = client.get(f"/collections/{A_DOCS}/documents/plan", headers=auth(ALICE)).json()
    assert kept["text"] == ALICE_TEXT and kept["metadata"] == {"owner": "alice"}


def _renamed(body: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    error = dict(body["error"])
    error["message"] = error["message"].replace(old, new)
    return {"error": error}


def test_alice_and_the_unscoped_key_reach_alice_s_collection(client, alice_docs):
    for key in (ALICE, ADMIN):
        hits = client.post(
            "/search",
            json={"query": "when is the lemonade stand sold", "collection": A_DOCS, "k": 1},
            headers=auth(key),
        ).json()["hits"]
        assert hits[0]["id"] == "plan"
        names = [
            c["name"] for c in client.get("/collections", headers=auth(key)).json()["collections"]
        ]
        assert A_DOCS in names
    listed = client.get("/collections", headers=auth(ALICE)).json()["collections"]
    mine = next(c for c in listed if c["name"] == A_DOCS)
    assert mine["items"] == 2 and mine["model"].startswith("all-MiniLM-L6-v2@")
    assert all(c["name"].startswith(f"t{RUN}-alice-") for c in listed)


def test_a_document_bob_writes_is_found_by_his_search_then_deleted(client):
    bob = auth(BOB)
    docs = [
        {"id": "q1", "text": "How do I reset my password?", "metadata": {"lang": "en"}},
        {"id": "q2", "text": "Where is the train station?", "metadata": {"lang": "en"}},
    ]
    url = f"/collections/{B_DOCS}/documents"
    first = client.post(url, json={"documents": docs}, headers=bob).json()
    assert (first["stored"], first["skipped"]) == (2, 0)
    again = client.post(url, json={"documents": docs}, headers=bob).json()
    assert (again["stored"], again["skipped"]) == (0, 2)  # idempotent: nothing re-embedded
    body = {"query": "I forgot my password", "collection": B_DOCS, "k": 1}
    assert client.post("/search", json=body, headers=bob).json()["hits"][0]["id"] == "q1"
    got = client.get(f"{url}/q1?vector=true", headers=bob).json()
    assert got["metadata"] == {"lang": "en"} and len(got["vector"]) == 384
    assert client.get(f"{url}/q2", headers=bob).json()["vector"] is None
    assert client.delete(f"{url}/q1", headers=bob).json() == {"deleted": 1}
    assert client.get(f"{url}/q1", headers=bob).status_code == 404
    assert client.delete(f"{url}/q1", headers=bob).status_code == 404
    assert client.post("/search", json=body, headers=bob).json()["hits"][0]["id"] == "q2"


def test_chunked_documents_read_and_delete_as_one(client):
    url = f"/collections/t{RUN}-bob-chunks/documents"
    text = " ".join(f"word{i}" for i in range(120))
    body = {"documents": [{"id": "long/one", "text": text}], "chunk_tokens": 32, "overlap": 4}
    counts = client.post(url, json=body, headers=auth(BOB)).json()
    assert counts["documents"] == 1 and counts["items"] == counts["stored"] > 3
    got = client.get(f"{url}/long%2Fone", headers=auth(BOB)).json()
    assert got["id"] == "long/one" and got["text"] is None
    assert [c["chunk_index"] for c in got["chunks"]] == list(range(counts["items"]))
    assert got["chunks"][0]["text"].startswith("word0 word1")
    deleted = client.delete(f"{url}/long%2Fone", headers=auth(BOB)).json()
    assert deleted == {"deleted": counts["items"]}


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"documents": [{"id": "a", "text": "x\u0000y"}]}, 422, "text"),
        ({"documents": [{"id": "", "text": "x"}]}, 422, "id"),
        ({"documents": [{"id": "a", "text": "x", "metadata": {"n": 2**70}}]}, 422, "64 bits"),
        (
            {"documents": [{"id": "a", "text": "x"}], "chunk_tokens": 8, "overlap": 8},
            422,
            "overlap",
        ),
        (
            {"documents": [{"id": str(i), "text": "x"} for i in range(3000)]},
            413,
            "EMBEDQ_API_MAX_TEXTS",
        ),
    ],
    ids=["nul-text", "empty-id", "big-int", "overlap", "too-many"],
)
def test_bad_documents_get_a_4xx_naming_the_problem(client, body, status, says):
    response = client.post(f"/collections/t{RUN}-bob-bad/documents", json=body, headers=auth(BOB))
    assert response.status_code == status, response.text
    assert says in response.json()["error"]["message"]


def test_the_key_file_is_reread_on_change_without_a_restart(celery_worker, tmp_path: Path):
    path = tmp_path / "keys"
    first, second = f"first-{RUN}", f"second-{RUN}"
    path.write_text(f"# tenants\n{first}:bob-*\n\n")
    settings = get_settings().model_copy(update={"api_keys": None, "api_keys_file": path})
    app = create_app(settings)
    files = TestClient(app)
    assert files.get("/collections", headers=auth(first)).status_code == 200
    assert files.get("/collections", headers=auth(second)).status_code == 401
    reads = _count_reads(
        app, path, lambda: [files.get("/metadata", headers=auth(first)) for _ in range(20)]
    )
    assert reads <= 1  # looked at once a second at most, read only when it changed
    path.write_text(f"{second}\n")  # first revoked, second added
    time.sleep(1.1)
    assert files.get("/collections", headers=auth(first)).status_code == 401
    assert files.get("/collections", headers=auth(second)).status_code == 200


def _count_reads(app: Any, path: Path, run: Any) -> int:
    ring = app.state.service.keys
    reads = 0
    original = ring._reload

    def counting(strict: bool) -> None:
        nonlocal reads
        before = ring._seen
        original(strict)
        reads += ring._seen != before

    ring._reload = counting
    run()
    return reads


def test_any_id_is_addressable_and_a_wrong_method_names_both_right_ones(client):
    url = f"/collections/t{RUN}-bob-ids/documents"
    docs = [{"id": "\n", "text": "a line break"}, {"id": "a/b c", "text": "a slash"}]
    assert client.post(url, json={"documents": docs}, headers=auth(BOB)).json()["stored"] == 2
    assert client.get(f"{url}/%0A", headers=auth(BOB)).json()["text"] == "a line break"
    assert client.get(f"{url}/a%2Fb%20c", headers=auth(BOB)).json()["text"] == "a slash"
    wrong = client.put(f"{url}/x", headers=auth(BOB))
    assert wrong.status_code == 405 and wrong.headers["allow"] == "DELETE, GET"
