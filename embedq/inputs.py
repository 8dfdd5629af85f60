"""Parsing of what callers send: every malformed input becomes a named error here."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from embedq.errors import InvalidInputError, TooManyTextsError
from embedq.settings import Settings, get_settings

COLLECTION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
MAX_ID_CHARS = 512
MAX_METADATA_BYTES = 64 * 1024
MAX_METADATA_DEPTH = 32
INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1


@dataclass(frozen=True)
class EmbedRequest:
    """One validated ``embed_texts`` call."""

    texts: list[str]
    model: str | None = None
    normalize: bool = True
    collection: str | None = None
    ids: list[str] | None = None
    metadata: list[dict[str, Any]] | None = None
    # Chunks of long documents: the document's id and the chunk's index in it.
    parent_ids: list[str | None] | None = None
    chunk_indexes: list[int | None] | None = None
    # Positions whose text was cut to ``max_text_chars`` before tokenizing.
    clipped: tuple[int, ...] = ()
    # When the producer made the request (microseconds since the epoch): a stored item
    # written by a newer request is never replaced by this one. None: when it is stored.
    version: int | None = None


def task_items(args: Any, kwargs: Any) -> Sequence[Any] | None:
    """The texts (or documents) of an ``embed_texts`` / ``ingest_documents`` call, found in
    its Celery args by name or as the first list; None when there is none."""
    named = [v for k, v in (kwargs or {}).items() if k in ("texts", "documents")]
    found = named or [a for a in (*(args or ()), *(kwargs or {}).values())]
    return next((a for a in found if isinstance(a, list | tuple)), None)


def _text(i: int, item: Any) -> str:
    if isinstance(item, bytes | bytearray):
        try:
            item = bytes(item).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"texts[{i}] is bytes that are not valid UTF-8") from exc
    if item is None:
        raise InvalidInputError(f"texts[{i}] is None; send a string (empty strings are allowed)")
    if not isinstance(item, str):
        raise InvalidInputError(f"texts[{i}] is {type(item).__name__}; expected str")
    if not item.isascii() and not _encodable(item):
        raise InvalidInputError(
            f"texts[{i}] holds a lone surrogate (not valid Unicode); fix its decoding"
        )
    return item


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_texts(texts: Any, settings: Settings) -> tuple[list[str], tuple[int, ...]]:
    """Validate ``texts``; return them as strings and the positions clipped to max chars."""
    if isinstance(texts, str | bytes):
        raise InvalidInputError("texts must be a list of strings, not one string: wrap it in [...]")
    if not isinstance(texts, list | tuple):
        raise InvalidInputError(f"texts must be a list of strings, got {type(texts).__name__}")
    if len(texts) > settings.max_texts_per_task:
        raise TooManyTextsError(
            f"{len(texts)} texts in one call; EMBEDQ_MAX_TEXTS_PER_TASK allows "
            f"{settings.max_texts_per_task} (split the call, or use embedq ingest)"
        )
    out = [_text(i, item) for i, item in enumerate(texts)]
    limit = settings.max_text_chars
    clipped = tuple(i for i, text in enumerate(out) if len(text) > limit)
    return [text[:limit] for text in out], clipped


def parse_ids(ids: Any, n: int) -> list[str] | None:
    """Validate external ids: one per text, str or int, unique within the call."""
    if ids is None:
        return None
    if not isinstance(ids, list | tuple) or len(ids) != n:
        raise InvalidInputError(f"ids must be a list of {n} ids, one per text")
    out: list[str] = []
    for i, item in enumerate(ids):
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise InvalidInputError(f"ids[{i}] is {type(item).__name__}; expected str or int")
        text = str(item)
        if not text or len(text) > MAX_ID_CHARS or "\x00" in text or not _encodable(text):
            raise InvalidInputError(
                f"ids[{i}] must be 1-{MAX_ID_CHARS} characters, valid Unicode, without NUL"
            )
        out.append(text)
    if len(set(out)) != len(out):
        raise InvalidInputError("ids repeat within one call; each id may appear once")
    return out


def parse_metadata(metadata: Any, n: int) -> list[dict[str, Any]] | None:
    """Validate metadata: one JSON object (dict) per text, each at most 64 KiB as JSON."""
    if metadata is None:
        return None
    if not isinstance(metadata, list | tuple) or len(metadata) != n:
        raise InvalidInputError(f"metadata must be a list of {n} dicts, one per text")
    for i, item in enumerate(metadata):
        if not isinstance(item, dict):
            raise InvalidInputError(f"metadata[{i}] is {type(item).__name__}; expected dict")
        depth, problem = _shape(item)
        if depth > MAX_METADATA_DEPTH:
            raise InvalidInputError(f"metadata[{i}] nests deeper than {MAX_METADATA_DEPTH} levels")
        if problem:
            raise InvalidInputError(f"metadata[{i}] holds {problem}")
        try:
            size = len(json.dumps(item, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"metadata[{i}] is not JSON-serializable: {exc}") from exc
        if size > MAX_METADATA_BYTES:
            raise InvalidInputError(f"metadata[{i}] is {size} bytes as JSON; at most 65536")
    return [dict(item) for item in metadata]


def _shape(value: Any) -> tuple[int, str | None]:
    """Nesting depth of dicts and lists, and the first value no store or wire keeps (a NUL,
    a lone surrogate, an integer beyond 64 bits), described.

    Iterative, so deeply nested input cannot blow the stack."""
    deepest, problem, stack = 0, None, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, str) and ("\x00" in node or not (node.isascii() or _encodable(node))):
            problem = problem or "a NUL character or a lone surrogate, which no store keeps"
        elif isinstance(node, int) and not INT64_MIN <= node <= UINT64_MAX:
            # msgpack (the wire) and Postgres JSONB readers stop at 64-bit integers.
            problem = problem or "an integer beyond 64 bits; send it as a string"
        elif isinstance(node, dict | list | tuple):
            deepest = max(deepest, level)
            children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
            stack.extend((child, level + 1) for child in children)
    return deepest, problem


def check_storable(texts: list[str]) -> None:
    """Texts kept in the store: Postgres cannot hold NUL characters, so no store takes them."""
    for i, text in enumerate(texts):
        if "\x00" in text:
            raise InvalidInputError(
                f"texts[{i}] holds a NUL character, which the store cannot keep; remove it "
                "(embedding without a collection accepts it)"
            )


def parse_model(model: Any) -> str | None:
    """A model name, or None for the worker's own."""
    if model is not None and not isinstance(model, str):
        raise InvalidInputError(f"model must be a string, got {type(model).__name__}")
    if model is not None and not _encodable(model):
        raise InvalidInputError("model holds a lone surrogate (not valid Unicode)")
    return model


def parse_collection(collection: Any) -> str | None:
    """Validate a collection name (letters, digits, ``_.:-``; at most 128 characters)."""
    if collection is None:
        return None
    if not isinstance(collection, str) or not COLLECTION_RE.match(collection):
        raise InvalidInputError(
            f"collection {collection!r} is not a valid name: use 1-128 letters, digits, _ . : -"
        )
    return collection


def parse_embed_request(
    texts: Any,
    model: Any = None,
    normalize: Any = True,
    collection: Any = None,
    ids: Any = None,
    metadata: Any = None,
    settings: Settings | None = None,
) -> EmbedRequest:
    """Validate the arguments of ``embed_texts``; raise :class:`InvalidInputError` on any flaw."""
    settings = settings or get_settings()
    parsed, clipped = parse_texts(texts, settings)
    parse_model(model)
    if not isinstance(normalize, bool):
        raise InvalidInputError(f"normalize must be true or false, got {normalize!r}")
    name = parse_collection(collection)
    if name is None and (ids is not None or metadata is not None):
        raise InvalidInputError("ids and metadata are stored with a collection: pass collection=")
    if name is not None:
        check_storable(parsed)
    return EmbedRequest(
        texts=parsed,
        model=model,
        normalize=normalize,
        collection=name,
        ids=parse_ids(ids, len(parsed)),
        metadata=parse_metadata(metadata, len(parsed)),
        clipped=clipped,
    )


def parse_version(version: Any) -> int | None:
    """A request version: a non-negative integer (microseconds since the epoch), or None."""
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or not 0 <= version < 2**63
    ):
        raise InvalidInputError(f"version must be a non-negative 64-bit integer, got {version!r}")
    return version


def parse_documents(
    collection: Any,
    documents: Any,
    model: Any = None,
    settings: Settings | None = None,
    version: Any = None,
) -> EmbedRequest:
    """Validate an ingestion chunk: dicts with ``id``, ``text``, optional ``metadata``,
    ``parent`` and ``chunk``. A repeated id keeps its last document (as a rerun would)."""
    settings = settings or get_settings()
    name = parse_collection(collection)
    if name is None:
        raise InvalidInputError("ingestion needs a collection")
    if not isinstance(documents, list | tuple):
        raise InvalidInputError(
            f"documents must be a list of dicts, got {type(documents).__name__}"
        )
    latest: dict[str, dict[str, Any]] = {}
    for i, doc in enumerate(documents):
        if not isinstance(doc, dict):
            raise InvalidInputError(f"documents[{i}] is {type(doc).__name__}; expected dict")
        latest[str(doc.get("id"))] = doc
    docs = list(latest.values())
    texts, clipped = parse_texts([d.get("text") for d in docs], settings)
    check_storable(texts)
    parent_ids = [d.get("parent") for d in docs]
    chunk_indexes = [d.get("chunk") for d in docs]
    if any(p is not None and not isinstance(p, str) for p in parent_ids) or any(
        c is not None and (isinstance(c, bool) or not isinstance(c, int)) for c in chunk_indexes
    ):
        raise InvalidInputError("parent must be a string and chunk an integer")
    return EmbedRequest(
        texts=texts,
        model=parse_model(model),
        collection=name,
        ids=parse_ids([d.get("id") for d in docs], len(docs)),
        metadata=parse_metadata([d.get("metadata") or {} for d in docs], len(docs)),
        parent_ids=parent_ids if any(p is not None for p in parent_ids) else None,
        chunk_indexes=chunk_indexes if any(c is not None for c in chunk_indexes) else None,
        clipped=clipped,
        version=parse_version(version),
    )
