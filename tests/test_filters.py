"""The metadata filter language: one table of filters run on real SQLite and Postgres
stores, each row with one answer (the one JSON equality gives, which the Python reference
gives too); generated filters agree on both stores and with the reference; bad filters are
refused by name before any database sees them."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedq.errors import InvalidFilterError
from embedq.store.base import Item
from embedq.store.factory import create_store
from embedq.store.filters import MAX_CONDITIONS, MAX_DEPTH, MAX_LIST_VALUES, parse_where
from tests.helpers import postgres_database

WEIRD_KEY = 'we"ird key'
DOCS: dict[str, dict[str, Any]] = {
    "d1": {"tag": {"a": 1}, "n": 1, "lang": "en"},
    "d2": {"tags": ["x", "y"], "n": 2.5, "lang": "de", "city": "Köln"},
    "d3": {"flag": True, "n": 3, "lang": "en", "note": None},
    "d4": {"flag": 1, "n": 3.0, "lang": "fr"},
    "d5": {"tag": {"a": 1, "b": [1, 2]}, "tags": ["y", "x"], "n": "3", "lang": "en"},
    "d6": {"n": -7, "flag": False, "nested": {"k": [1, {"z": None}]}, "note": "x", WEIRD_KEY: 1},
}

# (filter, the documents it matches): the issue's four rows first.
TABLE: list[tuple[dict[str, Any], set[str]]] = [
    ({"tag": {"a": 1}}, {"d1"}),
    ({"tags": ["x", "y"]}, {"d2"}),
    ({"flag": 1}, {"d4"}),
    ({"missing": None}, set()),
    ({"flag": True}, {"d3"}),
    ({"flag": 1.0}, {"d4"}),
    ({"flag": False}, {"d6"}),
    ({"n": 3}, {"d3", "d4"}),
    ({"n": "3"}, {"d5"}),
    ({"tag": {"b": [1, 2.0], "a": 1.0}}, {"d5"}),
    ({"tag": {"$eq": {"a": 1}}}, {"d1"}),
    ({"nested": {"k": [1, {"z": None}]}}, {"d6"}),
    ({"note": None}, {"d3"}),
    ({"note": {"$exists": True}}, {"d3", "d6"}),
    ({"note": {"$exists": False}}, {"d1", "d2", "d4", "d5"}),
    ({"note": {"$ne": None}}, {"d1", "d2", "d4", "d5", "d6"}),
    ({"n": {"$gt": 2}}, {"d2", "d3", "d4"}),
    ({"n": {"$gte": 1, "$lt": 3}}, {"d1", "d2"}),
    ({"n": {"$lte": -7}}, {"d6"}),
    ({"lang": {"$in": ["en", "fr"]}}, {"d1", "d3", "d4", "d5"}),
    ({"lang": {"$nin": ["en"]}}, {"d2", "d4", "d6"}),
    ({"flag": {"$in": [True, 1]}}, {"d3", "d4"}),
    ({"tags": {"$in": [["y", "x"], "z"]}}, {"d5"}),
    ({"lang": {"$in": []}}, set()),
    ({"$or": [{"lang": "de"}, {"flag": False}]}, {"d2", "d6"}),
    ({"$and": [{"lang": "en"}, {"n": {"$gt": 1}}]}, {"d3"}),
    ({"lang": "en", "flag": True}, {"d3"}),
    ({"$or": [{"n": {"$gt": 100}}]}, set()),
    ({"lang": "EN"}, set()),
    ({"city": "Köln"}, {"d2"}),
    ({WEIRD_KEY: 1}, {"d6"}),
    ({"$and": [{}]}, set(DOCS)),
    ({}, set(DOCS)),
]


def _store_docs(store: Any, collection: str, docs: dict[str, dict[str, Any]]) -> dict[int, str]:
    vectors = np.random.default_rng(0).normal(size=(len(docs), 4)).astype(np.float32)
    items = [
        Item(collection, name, name, vector, "m@1", name, meta)
        for (name, meta), vector in zip(docs.items(), vectors, strict=True)
    ]
    store.upsert(items)
    return {item.pk: item.id for item in store.get(collection, list(docs))}


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[dict]:
    """A SQLite store and a Postgres store (a database of its own), each holding ``DOCS``
    and ``POOL`` in collections of their own, and a neighbour collection that holds the
    same metadata (every read must stay in its collection)."""
    folder: Path = tmp_path_factory.mktemp("filters")
    with postgres_database(postgres_url) as pg_url:
        made = {}
        for kind, url in (("sqlite", f"sqlite:///{folder / 'f.db'}"), ("postgres", pg_url)):
            store = create_store(url)
            names = _store_docs(store, "table", DOCS)
            _store_docs(store, "neighbour", DOCS)
            pool = _store_docs(store, "pool", dict(enumerate_pool()))
            made[kind] = {"store": store, "names": names, "pool": pool}
        yield made
        for entry in made.values():
            entry["store"].close()


def _matching(entry: dict, collection: str, where: Any) -> set[str]:
    names = entry["names"] if collection == "table" else entry["pool"]
    return {names[int(pk)] for pk in entry["store"].filter_pks(collection, where)}


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
@pytest.mark.parametrize(("where", "expected"), TABLE, ids=[str(w) for w, _ in TABLE])
def test_one_answer_per_filter_on_both_stores(stores, kind, where, expected):
    parsed = parse_where(where)
    reference = {n for n, meta in DOCS.items() if parsed is None or parsed.matches(meta)}
    assert reference == expected, "the Python reference disagrees with the table"
    assert _matching(stores[kind], "table", where) == expected


def test_exact_scans_and_keys_among_candidates_apply_the_same_filter(stores):
    where = {"n": {"$gt": 2}}
    for entry in stores.values():
        store, names = entry["store"], entry["names"]
        streamed = [pk for pks, _ in store.vectors("table", 4, where) for pk in pks.tolist()]
        assert {names[pk] for pk in streamed} == {"d2", "d3", "d4"}
        some = [pk for pk, name in names.items() if name in ("d1", "d2", "d3")]
        assert {names[int(p)] for p in store.filter_pks("table", where, among=some)} == {
            "d2",
            "d3",
        }
        assert len(store.filter_pks("table", {}, limit=2)) == 2


# --- Generated filters: both stores and the reference agree --------------------------------

KEYS = ["a", "b", "c", "$d", WEIRD_KEY]
SCALARS = [None, True, False, 0, 1, 1.0, 2, 2.5, -1, "1", "a", "", "é"]


def enumerate_pool() -> Iterator[tuple[str, dict[str, Any]]]:
    """80 documents drawn (seed 0) from a small vocabulary, so generated filters match some."""
    rng = random.Random(0)

    def value(depth: int = 0) -> Any:
        roll = rng.random()
        if depth < 2 and roll < 0.15:
            return [value(depth + 1) for _ in range(rng.randint(0, 2))]
        if depth < 2 and roll < 0.25:
            return {k: value(depth + 1) for k in rng.sample(KEYS[:2], rng.randint(0, 2))}
        return rng.choice(SCALARS)

    for i in range(80):
        yield f"p{i}", {k: value() for k in rng.sample(KEYS, rng.randint(0, 4))}


scalars = st.sampled_from(SCALARS)
# Mostly scalars, so that equality often matches some of the pool.
json_values = (
    scalars
    | scalars
    | st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=2) | st.dictionaries(st.sampled_from(KEYS[:2]), inner)
        ),
        max_leaves=4,
    )
)
numbers = st.sampled_from([-1, 0, 1, 1.0, 1.5, 2, 3])
operators = st.one_of(
    st.builds(lambda v: {"$eq": v}, json_values),
    st.builds(lambda v: {"$ne": v}, json_values),
    st.builds(lambda v: {"$in": v}, st.lists(json_values, max_size=3)),
    st.builds(lambda v: {"$nin": v}, st.lists(json_values, max_size=3)),
    st.builds(lambda op, n: {op: n}, st.sampled_from(["$gt", "$gte", "$lt", "$lte"]), numbers),
    st.builds(lambda v: {"$exists": v}, st.booleans()),
)
plain_keys = st.sampled_from([k for k in KEYS if not k.startswith("$")])
leaf_filters = st.dictionaries(plain_keys, json_values | operators, max_size=2)
filters = st.recursive(
    leaf_filters,
    lambda inner: st.builds(
        lambda op, parts, rest: {op: parts, **rest},
        st.sampled_from(["$and", "$or"]),
        st.lists(inner, min_size=1, max_size=3),
        leaf_filters,
    ),
    max_leaves=3,
)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(where=filters)
def test_generated_filters_agree_on_both_stores_and_with_the_reference(stores, where):
    parsed = parse_where(where)
    pool = dict(enumerate_pool())
    reference = {n for n, meta in pool.items() if parsed is None or parsed.matches(meta)}
    for kind, entry in stores.items():
        assert _matching(entry, "pool", where) == reference, kind


# --- Refused before the database ------------------------------------------------------------


def _deep(levels: int) -> dict[str, Any]:
    node: Any = 1
    for _ in range(levels):
        node = {"k": node}
    return node


BAD: list[tuple[str, Any, str]] = [
    ("not-object", [1], "JSON object"),
    ("huge-int", {"n": 1180591620717411303424}, "outside the numbers"),
    ("huge-negative", {"n": {"$gt": -(2**63) - 1}}, "outside the numbers"),
    ("nan", {"n": math.nan}, "not a JSON number"),
    ("nul-key", {"a\x00b": 1}, "NUL"),
    ("nul-value", {"a": "x\x00"}, "NUL"),
    ("surrogate", {"a": "\ud800"}, "lone surrogate"),
    ("long-key", {"k" * 300: 1}, "at most 256"),
    ("many-keys", {f"k{i}": i for i in range(2000)}, f"at most {MAX_CONDITIONS}"),
    ("long-list", {"k": {"$in": list(range(MAX_LIST_VALUES + 1))}}, "at most 1000"),
    ("deep", _deep(MAX_DEPTH + 1), "nested deeper"),
    ("big", {"k": "x" * 70_000}, "bytes as JSON"),
    ("unknown-op", {"k": {"$regex": "a"}}, "unknown operator"),
    ("top-dollar", {"$where": "1"}, "unknown operator"),
    ("mixed", {"k": {"$eq": 1, "a": 2}}, "mixes operators"),
    ("gt-string", {"k": {"$gt": "a"}}, "compares numbers"),
    ("gt-bool", {"k": {"$gt": True}}, "compares numbers"),
    ("in-not-list", {"k": {"$in": "a"}}, "takes a list"),
    ("exists-int", {"k": {"$exists": 1}}, "true or false"),
    ("or-empty", {"$or": []}, "list of 1 to 64"),
    ("or-object", {"$or": {"a": 1}}, "list of 1 to 64"),
    ("or-long", {"$or": [{}] * 65}, "list of 1 to 64"),
    ("and-of-ints", {"$and": [1]}, "JSON object"),
    ("int-key", {1: 1}, "keys must be strings"),
    ("set-value", {"k": {1, 2}}, "not a JSON value"),
]


@pytest.mark.parametrize(("where", "says"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_filters_are_refused_by_name_before_the_database(stores, where, says):
    with pytest.raises(InvalidFilterError, match=says):
        parse_where(where)
    for entry in stores.values():  # the store parses too: never a database error
        with pytest.raises(InvalidFilterError, match=says):
            entry["store"].filter_pks("table", where)


def test_every_read_stays_in_its_collection(stores):
    for entry in stores.values():
        everything = entry["store"].filter_pks("table", {"$or": [{}, {"lang": "en"}]})
        # The neighbour collection holds the same metadata: only the collection tells apart.
        assert set(everything.tolist()) == set(entry["names"]), "no neighbour row"
