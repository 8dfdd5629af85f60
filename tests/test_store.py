"""The durable store, against a real SQLite file and the machine's real Postgres."""

from __future__ import annotations

import uuid
from dataclasses import replace

import numpy as np
import pytest

from embedq.errors import CollectionModelError
from embedq.keys import content_hash
from embedq.store.base import Item
from embedq.store.factory import create_store


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'sub' / 'items.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    s = create_store(url)
    yield s
    s.close()


def _items(collection: str, n: int, text: str = "text") -> list[Item]:
    rng = np.random.default_rng(n)
    return [
        Item(
            collection=collection,
            id=f"id-{i}",
            text=f"{text} {i}",
            vector=rng.random(384, dtype=np.float32),
            model="m@1",
            content_hash=content_hash(f"{text} {i}"),
            metadata={"i": i, "tags": ["a", "b"], "nested": {"ok": True}},
        )
        for i in range(n)
    ]


def test_upsert_twice_leaves_one_row_per_id(store):
    collection = f"c-{uuid.uuid4().hex[:8]}"
    items = _items(collection, 50)
    assert store.upsert(items) == 50
    store.upsert(items)
    assert store.count(collection) == 50


def test_round_trip_keeps_vector_text_and_metadata(store):
    collection = f"c-{uuid.uuid4().hex[:8]}"
    items = _items(collection, 3)
    store.upsert(items)
    got = {item.id: item for item in store.get(collection, ["id-1", "missing"])}
    assert list(got) == ["id-1"]
    np.testing.assert_array_equal(got["id-1"].vector, items[1].vector)
    assert got["id-1"].metadata == items[1].metadata
    assert got["id-1"].text == "text 1"
    assert got["id-1"].created_at is not None


def test_update_replaces_content_but_keeps_created_at(store):
    collection = f"c-{uuid.uuid4().hex[:8]}"
    store.upsert(_items(collection, 2))
    created = store.get(collection, ["id-0"])[0].created_at
    store.upsert(_items(collection, 2, text="changed"))
    item = store.get(collection, ["id-0"])[0]
    assert item.text == "changed 0"
    assert item.content_hash == content_hash("changed 0")
    assert item.created_at == created
    assert item.updated_at >= created


def test_batches_larger_than_one_statement(store):
    collection = f"c-{uuid.uuid4().hex[:8]}"
    assert store.upsert(_items(collection, 2500)) == 2500
    assert store.count(collection) == 2500


def test_delete_and_collections_are_separate(store):
    a, b = f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    store.upsert(_items(a, 3))
    store.upsert(_items(b, 3))
    assert store.delete(a, ["id-0", "id-9"]) == 1
    assert store.count(a) == 2
    assert store.count(b) == 3


def test_sql_looking_ids_are_just_ids(store):
    collection = f"c-{uuid.uuid4().hex[:8]}"
    item = _items(collection, 1)[0]
    item.id = "x'); DROP TABLE embedq_items; --"
    store.upsert([item])
    assert store.get(collection, [item.id])[0].id == item.id
    assert store.count(collection) == 1


def test_a_collection_keeps_to_the_model_that_first_filled_it(store):
    collection = f"c-{uuid.uuid4().hex[:8]}"
    assert store.collection_model(collection) is None
    store.upsert(_items(collection, 3))
    assert store.collection_model(collection) == "m@1"
    # The same model on another backend (int8) writes on; another model is refused by name.
    store.upsert([replace(_items(collection, 1)[0], id="int8", model="m@1+int8")])
    other = replace(_items(collection, 1)[0], id="other", model="n@2")
    with pytest.raises(CollectionModelError, match=r"bound to model 'm@1'.*'n@2'"):
        store.upsert([other])
    assert store.count(collection) == 4
    # A refused first write binds nothing: the collection is free for the next model.
    fresh = f"c-{uuid.uuid4().hex[:8]}"
    mixed = [replace(item, collection=fresh) for item in [*_items(fresh, 1), other]]
    with pytest.raises(CollectionModelError):
        store.upsert(mixed)
    assert store.collection_model(fresh) is None and store.count(fresh) == 0
    store.upsert([replace(other, collection=fresh)])
    assert store.collection_model(fresh) == "n@2"
