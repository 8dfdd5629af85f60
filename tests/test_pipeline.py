"""End to end through Redis and a real worker: order, parity, batching, cache, store, errors."""

from __future__ import annotations

import random

import numpy as np
from celery import group

from embedq.codec import Embeddings
from embedq.keys import content_hash, vector_key
from embedq.store.factory import create_store
from embedq.tasks import embed_texts
from tests.helpers import unique_texts

TIMEOUT_S = 120


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12)


def test_vectors_match_raw_sentence_transformers(celery_worker, raw_model, unseen_texts):
    vectors = embed_texts.delay(unseen_texts).get(timeout=TIMEOUT_S)
    expected = raw_model.encode(unseen_texts, normalize_embeddings=True)
    assert isinstance(vectors, Embeddings)
    assert vectors.dtype == np.float32
    assert vectors.shape == (len(unseen_texts), 384)
    assert cosines(vectors, expected).min() >= 0.9999


def test_unnormalized_vectors_match_raw_encode(celery_worker, raw_model):
    texts = unique_texts(5, "raw")
    vectors = embed_texts.delay(texts, normalize=False).get(timeout=TIMEOUT_S)
    expected = raw_model.encode(texts, normalize_embeddings=False)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


def test_results_keep_input_order(celery_worker, raw_model):
    texts = unique_texts(30, "order")
    random.shuffle(texts)
    vectors = embed_texts.delay(texts).get(timeout=TIMEOUT_S)
    expected = raw_model.encode(texts, normalize_embeddings=True)
    # Each row must be closest to its own text's reference vector.
    assert (np.argmax(np.asarray(vectors) @ expected.T, axis=1) == np.arange(len(texts))).all()


def test_concurrent_single_text_tasks_share_batches(runtime, raw_model):
    texts = unique_texts(20, "concurrent")
    before_batches = runtime.batcher.stats.batches
    before_encoded = runtime.batcher.stats.texts_encoded
    results = group(embed_texts.s([t]) for t in texts).apply_async().get(timeout=TIMEOUT_S)
    batches = runtime.batcher.stats.batches - before_batches
    assert runtime.batcher.stats.texts_encoded - before_encoded == 20
    print(f"20 single-text tasks -> {batches} batches")
    assert batches < 20, f"20 single-text tasks took {batches} batches"
    expected = raw_model.encode(texts, normalize_embeddings=True)
    got = np.vstack([r[0] for r in results])
    assert cosines(got, expected).min() >= 0.9999


def test_cache_encodes_exactly_the_unique_misses(runtime, redis_client):
    unique = unique_texts(500, "cache")
    texts = unique + random.choices(unique, k=500)
    random.shuffle(texts)
    encoded_before = runtime.batcher.stats.texts_encoded
    first = embed_texts.delay(texts).get(timeout=TIMEOUT_S)
    assert runtime.batcher.stats.texts_encoded - encoded_before == 500

    second = embed_texts.delay(texts).get(timeout=TIMEOUT_S)
    assert runtime.batcher.stats.texts_encoded - encoded_before == 500
    np.testing.assert_array_equal(first, second)

    # Without the in-process tier, Redis answers all of them: still nothing encoded.
    runtime.cache.lru.clear()
    redis_hits = runtime.cache.stats.redis_hits
    third = embed_texts.delay(texts[:100]).get(timeout=TIMEOUT_S)
    assert runtime.batcher.stats.texts_encoded - encoded_before == 500
    assert runtime.cache.stats.redis_hits - redis_hits == len(set(texts[:100]))
    np.testing.assert_array_equal(third, first[:100])

    key = vector_key(runtime.encoder.model_id, True, unique[0])
    assert len(redis_client.get(key)) == 384 * 4 + 1
    assert 0 < redis_client.ttl(key) <= runtime.settings.cache_ttl_s


def test_normalize_flag_is_part_of_the_cache_key(runtime):
    text = unique_texts(1, "flag")
    normalized = embed_texts.delay(text, normalize=True).get(timeout=TIMEOUT_S)
    encoded_before = runtime.batcher.stats.texts_encoded
    embed_texts.delay(text, normalize=False).get(timeout=TIMEOUT_S)
    assert runtime.batcher.stats.texts_encoded - encoded_before == 1
    assert np.isclose(np.linalg.norm(normalized[0]), 1.0, atol=1e-5)


def test_empty_strings_and_empty_lists(celery_worker, raw_model):
    vectors = embed_texts.delay(["", "not empty"]).get(timeout=TIMEOUT_S)
    expected = raw_model.encode(["", "not empty"], normalize_embeddings=True)
    assert cosines(vectors, expected).min() >= 0.9999
    empty = embed_texts.delay([]).get(timeout=TIMEOUT_S)
    assert empty.shape == (0, 384)


def test_long_texts_are_truncated_and_reported(celery_worker, raw_model):
    long_text = "tokens " * 2000 + "tail words never reached"
    texts = ["short", long_text, "also short"]
    vectors = embed_texts.delay(texts).get(timeout=TIMEOUT_S)
    assert vectors.truncated == (1,)
    expected = raw_model.encode(texts, normalize_embeddings=True)
    assert cosines(vectors, expected).min() >= 0.9999


def test_truncation_is_reported_from_the_cache_too(runtime):
    long_text = unique_texts(1, "long")[0] + " word" * 1000
    first = embed_texts.delay([long_text]).get(timeout=TIMEOUT_S)
    runtime.cache.lru.clear()
    again = embed_texts.delay(["x", long_text]).get(timeout=TIMEOUT_S)
    assert first.truncated == (0,)
    assert again.truncated == (1,)


def test_utf8_bytes_are_decoded(celery_worker):
    as_str = embed_texts.delay(["café au lait"]).get(timeout=TIMEOUT_S)
    as_bytes = embed_texts.delay(["café au lait".encode()]).get(timeout=TIMEOUT_S)
    np.testing.assert_array_equal(as_str, as_bytes)


def test_collection_upsert_is_idempotent(celery_worker):
    store = create_store(_db_url())
    collection = f"docs-{unique_texts(1)[0].split()[-1]}"
    texts = unique_texts(3, "stored")
    ids = ["a", "b", "c"]
    metadata = [{"lang": "en", "n": i} for i in range(3)]
    vectors = embed_texts.delay(texts, collection=collection, ids=ids, metadata=metadata).get(
        timeout=TIMEOUT_S
    )
    # The same task delivered again leaves one row per id.
    embed_texts.delay(texts, collection=collection, ids=ids, metadata=metadata).get(timeout=60)
    assert store.count(collection) == 3
    items = {item.id: item for item in store.get(collection, ids)}
    assert items["b"].text == texts[1]
    assert items["b"].metadata == {"lang": "en", "n": 1}
    assert items["b"].content_hash == content_hash(texts[1])
    np.testing.assert_array_equal(items["b"].vector, vectors[1])

    changed = [texts[0], "a new text for b", texts[2]]
    embed_texts.delay(changed, collection=collection, ids=ids).get(timeout=TIMEOUT_S)
    assert store.count(collection) == 3
    assert store.get(collection, ["b"])[0].text == "a new text for b"


def test_ids_default_to_content_hashes(celery_worker):
    store = create_store(_db_url())
    collection = f"hashed-{unique_texts(1)[0].split()[-1]}"
    texts = ["same text", "same text", "other text"]
    embed_texts.delay(texts, collection=collection).get(timeout=TIMEOUT_S)
    assert store.count(collection) == 2
    assert store.get(collection, [content_hash("other text")])[0].text == "other text"


def _db_url() -> str:
    from embedq.settings import get_settings

    return get_settings().database_url
