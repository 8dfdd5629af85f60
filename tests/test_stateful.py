"""Hypothesis drives ingest, update, delete, rebuild and search across several collections of a
real store (SQLite and Postgres) and compares every search with an exact model of what is
stored: never an item of another collection, never a deleted one, updated items with their
new text and vector, and the same scores exact search over the model gives."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from embedq.search.build import rebuild_changed
from embedq.search.searcher import Searcher
from embedq.settings import Settings
from embedq.store.base import Item
from embedq.store.factory import create_store

DIM = 4
COLLECTIONS = ("red", "green", "blue")
IDS = tuple(f"doc-{n}" for n in range(5))
TAGS = (0, 1)
K = 4

vectors = st.lists(
    st.floats(-1.0, 1.0, allow_nan=False, width=32), min_size=DIM, max_size=DIM
).filter(lambda v: float(np.linalg.norm(v)) > 0.2)


class StoreModel(RuleBasedStateMachine):
    """One store, one searching host and one building host; the model is a dict per
    collection of id -> (text, vector, tag)."""

    url: str = ""
    folder: Path = Path()

    def __init__(self) -> None:
        super().__init__()
        self.run = uuid.uuid4().hex[:8]  # fresh collections for each example
        self.store = create_store(self.url)
        self.searcher = Searcher(self.store, Settings(data_dir=self.folder / self.run))
        self.searcher.indexes.check_interval_s = 0.0
        self.model: dict[str, dict[str, tuple[str, np.ndarray, int]]] = {c: {} for c in COLLECTIONS}
        self.writes = 0
        self.last: dict[str, np.ndarray] = {}

    def _name(self, collection: str) -> str:
        return f"{collection}-{self.run}"

    def _write(self, collection: str, doc: str, vector: list[float], tag: int) -> None:
        self.writes += 1
        text = f"{collection}/{doc} #{self.writes}"  # says whose it is and which version
        array = np.asarray(vector, dtype=np.float32)
        self.store.upsert(
            [Item(self._name(collection), doc, text, array, "m@1", f"h{self.writes}", {"tag": tag})]
        )
        self.model[collection][doc] = (text, array, tag)
        self.last[collection] = array

    @rule(collection=st.sampled_from(COLLECTIONS), doc=st.sampled_from(IDS), vector=vectors,
          tag=st.sampled_from(TAGS))  # fmt: skip
    def ingest(self, collection: str, doc: str, vector: list[float], tag: int) -> None:
        self._write(collection, doc, vector, tag)

    @rule(collection=st.sampled_from(COLLECTIONS), pick=st.integers(0, 100), vector=vectors,
          tag=st.sampled_from(TAGS))  # fmt: skip
    def update(self, collection: str, pick: int, vector: list[float], tag: int) -> None:
        present = sorted(self.model[collection])
        if present:
            self._write(collection, present[pick % len(present)], vector, tag)

    @rule(collection=st.sampled_from(COLLECTIONS), pick=st.integers(0, 100))
    def delete(self, collection: str, pick: int) -> None:
        present = sorted(self.model[collection])
        if present:
            doc = present[pick % len(present)]
            assert self.store.delete(self._name(collection), [doc]) == 1
            del self.model[collection][doc]

    @rule(collection=st.sampled_from(COLLECTIONS))
    def rebuild(self, collection: str) -> None:
        report = rebuild_changed(self.store, self.folder / f"builder-{self.run}",
                                 only=self._name(collection))  # fmt: skip
        for outcome in report.values():
            assert isinstance(outcome, dict) or outcome == "unchanged", outcome

    @rule(collection=st.sampled_from(COLLECTIONS), query=vectors,
          tag=st.none() | st.sampled_from(TAGS))  # fmt: skip
    def search(self, collection: str, query: list[float], tag: int | None) -> None:
        self._check(collection, np.asarray(query, np.float32), tag)

    @invariant()
    def every_collection_answers_exactly(self) -> None:
        """After every step, each collection is searched near its latest write (the item
        most likely to be stale in an index or a delta), with and without a filter."""
        for collection in COLLECTIONS:
            query = self.last.get(collection, np.eye(DIM, dtype=np.float32)[0])
            self._check(collection, query, None)
            self._check(collection, query, TAGS[0])

    def _check(self, collection: str, query: np.ndarray, tag: int | None) -> None:
        where = {"tag": tag} if tag is not None else None
        hits = self.searcher.search(query, self._name(collection), k=K, where=where)
        stored = {
            doc: row for doc, row in self.model[collection].items() if tag is None or row[2] == tag
        }
        assert len({h.id for h in hits}) == len(hits), "an item returned twice"
        for hit in hits:
            assert hit.id in stored, f"{hit.id} ({hit.text}) is not stored in {collection}"
            text, vector, _ = stored[hit.id]
            assert hit.text == text, f"{hit.id}: {hit.text!r}, stored {text!r}"
            assert hit.score == pytest.approx(_cosine(query, vector), abs=1e-4), hit
        expected = sorted((_cosine(query, v) for _, v, _ in stored.values()), reverse=True)
        assert [h.score for h in hits] == pytest.approx(expected[:K], abs=1e-4)

    def teardown(self) -> None:
        self.store.close()


def _cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.usefixtures("redis_client")
def test_searches_match_an_exact_model_through_any_sequence(db_url, tmp_path):
    machine = type("Machine", (StoreModel,), {"url": db_url, "folder": tmp_path})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=12,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
