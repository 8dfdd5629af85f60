"""Bulk ingestion and search with the real model: pydoc, reruns, interrupts, chunks, readers."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import uuid

import pytest

from embedq import lookup, search
from embedq.errors import InvalidInputError
from embedq.keys import VECTOR_PREFIX
from embedq.producer import ingest
from embedq.producer.chunker import chunk_spans
from embedq.producer.reader import BadRecord, Document, count_records, read_documents
from embedq.search.build import build_index
from embedq.settings import get_settings
from embedq.store.factory import create_store
from tests.helpers import ROOT, SHARED_DATA, load_pydoc, wait_until

PYDOC = SHARED_DATA / "pydoc.jsonl"


def _store():
    return create_store(get_settings().database_url)


def _cold_cache(runtime, redis_client) -> None:
    """Forget every cached vector, so what the encoder does can be counted."""
    runtime.cache.lru.clear()
    keys = list(redis_client.scan_iter(f"{VECTOR_PREFIX}:*", count=5000))
    for start in range(0, len(keys), 1000):
        redis_client.delete(*keys[start : start + 1000])


def _json_hits(hits) -> list[str]:
    return [h.id for h in hits if h.id.startswith("json.")]


def _ingest_cmd(collection: str, *extra: str) -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "embedq")
    return [exe, "ingest", str(PYDOC), "--collection", collection, "--max-in-flight", "4", *extra]


def _start_ingest(collection: str, *extra: str) -> subprocess.Popen[str]:
    # A suite started in the background (``nohup make test &``) ignores SIGINT, and a child
    # inherits that; with a handler here the child starts with the default, as from a shell.
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(
            _ingest_cmd(collection, *extra),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


# Exit status of `embedq ingest` stopped with each signal.
STOPPED = {signal.SIGINT: 130, signal.SIGKILL: -9}


def test_interrupted_ingests_resume_with_each_document_once(runtime, redis_client):
    """Two ingests of pydoc side by side, one stopped with SIGINT and one killed with SIGKILL
    at 1,000 stored, then both rerun: each collection ends with every document once, and
    each distinct text went through the encoder exactly once over all four runs."""
    _cold_cache(runtime, redis_client)
    unique_texts = len({d["text"] for d in load_pydoc()})
    encoded = runtime.batcher.stats.texts_encoded
    store, tag = _store(), uuid.uuid4().hex[:6]
    collections = {sig: f"killed-{sig.name.lower()}-{tag}" for sig in STOPPED}
    first = {sig: _start_ingest(collections[sig], "--quiet") for sig in STOPPED}
    for sig, proc in first.items():
        wait_until(
            lambda c=collections[sig]: store.count(c) >= 1000, 300, 0.2, f"1000 stored ({sig})"
        )
        proc.send_signal(sig)
    for sig, proc in first.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == STOPPED[sig], (sig, (out + err)[-2000:])
        assert 1000 <= store.count(collections[sig]) < 3795, sig

    reruns = {sig: _start_ingest(collections[sig], "--json") for sig in STOPPED}
    for sig, rerun in reruns.items():
        out, err = rerun.communicate(timeout=600)
        assert rerun.returncode == 0, (sig, err[-2000:])
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["skipped"] >= 1000 and summary["failed"] == 0, (sig, summary)
        assert store.count(collections[sig]) == 3795, sig
    # Each distinct text went through the encoder exactly once over the four runs.
    assert runtime.batcher.stats.texts_encoded - encoded == unique_texts


# After the interrupted ingests: they leave every pydoc vector in the cache, so this one
# spends no time encoding pydoc again (none of its checks depends on encoding).
def test_pydoc_ingest_search_and_rerun(runtime, redis_client, tmp_path):
    docs = load_pydoc()
    collection = f"pydoc-{uuid.uuid4().hex[:6]}"
    summary = ingest(read_documents(PYDOC), collection, max_in_flight=8)
    assert summary.read == len(docs) == 3795
    assert summary.failed == 0 and summary.stored == 3795
    assert _store().count(collection) == 3795
    assert _json_hits(search("parse JSON", collection, k=5)), (
        "no json docstring in the top 5 (exact)"
    )

    build_index(_store(), collection, get_settings().data_dir)
    assert _json_hits(search("parse JSON", collection, k=5)), (
        "no json docstring in the top 5 (HNSW)"
    )

    encoded = runtime.batcher.stats.texts_encoded
    again = ingest(read_documents(PYDOC), collection)
    assert again.skipped == 3795 and again.stored == 0
    assert runtime.batcher.stats.texts_encoded == encoded
    assert again.wall_s < 30


def test_long_documents_are_chunked_and_searched_by_parent(celery_worker):
    collection = f"chunks-{uuid.uuid4().hex[:6]}"
    long_text = " ".join(
        f"Paragraph {i} talks about subject number {i} in some detail." for i in range(60)
    )
    docs = [Document("long", long_text, {"kind": "long"}), Document("short", "A tiny note.", {})]
    summary = ingest(docs, collection, chunk_tokens=64, overlap=16)
    store = _store()
    chunks = store.count(collection)
    assert summary.stored == chunks > 3
    item = store.get(collection, ["long#1"])[0]
    assert item.parent_id == "long" and item.chunk_index == 1
    hits = search("subject number 30", collection, k=5, parents=True)
    assert [h.parent_id for h in hits].count("long") == 1
    # The document shrinks: its stale chunks go.
    ingest([Document("long", "Now it is short.", {})], collection, chunk_tokens=64, overlap=16)
    assert store.count(collection) == 2


def test_lookup_returns_only_near_identical_items(celery_worker):
    collection = f"faq-{uuid.uuid4().hex[:6]}"
    ingest(
        [{"id": "q1", "text": "How do I reset my password?", "answer": "Use the link."}], collection
    )
    hit = lookup("How can I reset my password?", collection, threshold=0.8)
    assert hit is not None and hit.metadata["answer"] == "Use the link."
    assert lookup("What is the capital of France?", collection, threshold=0.8) is None


def test_search_rejects_bad_k(celery_worker):
    for k in (0, -1, 10**6):
        with pytest.raises(InvalidInputError, match="k must be"):
            search("x", "any", k=k)


def test_readers_stream_jsonl_csv_and_text_and_report_bad_records(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(
        '{"id": 1, "text": "one", "lang": "en"}\nnot json\n[1]\n{"text": "no id"}\n{"id": 2}\n'
    )
    records = list(read_documents(jsonl))
    assert records[0] == Document("1", "one", {"lang": "en"})
    assert [r.line for r in records if isinstance(r, BadRecord)] == [2, 3, 5]
    assert isinstance(records[3], Document) and len(records[3].id) == 64  # content hash
    csv_path = tmp_path / "b.csv"
    csv_path.write_text('doc,body,tag\nx,"hello, world",t1\ny,"multi\nline",t2\n')
    rows = list(read_documents(csv_path, id_field="doc", text_field="body"))
    assert [(r.id, r.text, r.metadata) for r in rows] == [
        ("x", "hello, world", {"tag": "t1"}),
        ("y", "multi\nline", {"tag": "t2"}),
    ]
    with pytest.raises(InvalidInputError, match="no 'text' column"):
        list(read_documents(csv_path))
    txt = tmp_path / "c.txt"
    txt.write_text("first line\n\nsecond line")
    assert [d.text for d in read_documents(txt)] == ["first line", "second line"]
    assert count_records(txt) == 3


def test_chunk_spans_overlap_and_cover_the_text():
    text = " ".join(f"word{i}" for i in range(500))
    spans = chunk_spans(text, 64, 16, get_settings().model)
    assert len(spans) > 3 and spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(b[0] < a[1] for a, b in itertools.pairwise(spans))  # overlapping
    assert chunk_spans("short text", 64, 0, get_settings().model) == [(0, 10)]


def test_cli_delete_removes_items_from_search(celery_worker):
    collection = f"del-{uuid.uuid4().hex[:6]}"
    summary = ingest(
        [{"id": "keep", "text": "a red apple"}, {"id": "gone", "text": "a red apple pie"}],
        collection,
    )
    assert summary.stored == 2, summary
    exe = os.path.join(os.path.dirname(sys.executable), "embedq")
    out = subprocess.run(
        [exe, "delete", "--collection", collection, "--id", "gone", "--id", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "deleted 1 of 2" in out.stdout
    assert [h.id for h in search("red apple pie", collection, k=5)] == ["keep"]
