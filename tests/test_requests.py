"""Pure validation of embed_texts arguments."""

from __future__ import annotations

import pytest

from embedq.errors import InvalidInputError, TooManyTextsError
from embedq.inputs import parse_embed_request
from embedq.settings import Settings


@pytest.fixture
def settings() -> Settings:
    return Settings(max_texts_per_task=5, max_text_chars=10)


def test_valid_request_is_parsed(settings):
    req = parse_embed_request(
        ["a", b"b"], collection="docs", ids=[1, "x"], metadata=[{}, {"k": [1]}], settings=settings
    )
    assert req.texts == ["a", "b"]
    assert req.ids == ["1", "x"]
    assert req.metadata == [{}, {"k": [1]}]


def test_texts_over_the_char_limit_are_cut_and_flagged(settings):
    req = parse_embed_request(["short", "x" * 25], settings=settings)
    assert req.texts[1] == "x" * 10
    assert req.clipped == (1,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"texts": ["x"] * 6}, "EMBEDQ_MAX_TEXTS_PER_TASK"),
        ({"texts": {"a": 1}}, "got dict"),
        ({"texts": [1.5]}, "float"),
        ({"texts": ["x"], "model": 3}, "model must be a string"),
        ({"texts": ["x"], "collection": ""}, "not a valid name"),
        ({"texts": ["x"], "collection": "c" * 129}, "not a valid name"),
        ({"texts": ["x"], "collection": "c", "ids": [True]}, "bool"),
        ({"texts": ["x"], "collection": "c", "ids": ["a\x00"]}, "without NUL"),
        ({"texts": ["x"], "collection": "c", "metadata": [{"f": float("nan")}]}, "JSON"),
        ({"texts": ["x"], "collection": "c", "metadata": [{"b": b"x"}]}, "JSON"),
        ({"texts": ["x"], "collection": "c", "metadata": [{"k": "v" * 70000}]}, "65536"),
    ],
)
def test_each_flaw_is_a_named_error(settings, kwargs, message):
    texts = kwargs.pop("texts")
    with pytest.raises(InvalidInputError, match=message):
        parse_embed_request(texts, settings=settings, **kwargs)


def test_too_many_texts_has_its_own_class(settings):
    with pytest.raises(TooManyTextsError):
        parse_embed_request(["x"] * 6, settings=settings)


def test_deeply_nested_metadata_is_refused_not_crashed(settings):
    nested: dict = {}
    node = nested
    for _ in range(5000):
        node["n"] = {}
        node = node["n"]
    with pytest.raises(InvalidInputError, match="nests deeper than 32"):
        parse_embed_request(["x"], collection="c", metadata=[nested], settings=settings)


def test_ingestion_chunks_validate_the_model_too(settings):
    from embedq.inputs import parse_documents

    with pytest.raises(InvalidInputError, match="model must be a string"):
        parse_documents("c", [{"id": "a", "text": "x"}], model=3, settings=settings)
    doc = parse_documents(
        "c", [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], settings=settings
    )
    assert doc.texts == ["y"]  # a repeated id keeps its last document
