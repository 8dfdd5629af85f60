"""Documents over HTTP: ``POST /collections/{collection}/documents`` (the idempotent upsert
of ``embedq ingest``: metadata, chunking, unchanged documents skipped, the bulk traffic
class, one bulk job per API key), ``GET`` and ``DELETE``
``/collections/{collection}/documents/{document_id}``.

The ingest's own pieces do the work: :func:`embedq.producer.bulk.refusal` says why a
document cannot be stored, :func:`embedq.producer.bulk.batches` cuts chunks and packs
``ingest_documents`` tasks, and the worker skips what is stored already. A collection
outside the key's scope is answered 404, as a missing one (:mod:`embedq.web.keys`).
"""

from __future__ import annotations

import asyncio
import functools
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol
from uuid import uuid4

from celery.exceptions import TimeoutError as CeleryTimeout
from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor

from embedq.broker.client import describe, is_redis_full, wait_while_full
from embedq.broker.results import ResultListener, waited_by_listener
from embedq.encode.models import tokenizer_name
from embedq.inputs import COLLECTION_RE, INT64_MIN, MAX_ID_CHARS, UINT64_MAX
from embedq.ops.registry import listed_models
from embedq.producer.bulk import IngestSummary, batches, refusal
from embedq.producer.reader import Document
from embedq.settings import Settings
from embedq.store.base import Item, Store, now_version
from embedq.web.bodies import JsonInt
from embedq.web.errors import ApiError, documented
from embedq.web.keys import Authorized, job_of

# Items (documents, or their chunks) per ingest_documents task, as `embedq ingest` sends.
TASK_ITEMS = 64
NO_NUL = "^[^\\u0000]*$"


class DocumentIdConvertor(Convertor[str]):
    """A path's document id: everything after ``/documents/``, slashes and line breaks
    included (Starlette's ``path`` stops at a line break: ``.`` skips it)."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        """As it came, percent-decoded."""
        return value

    def to_string(self, value: str) -> str:
        """As it is."""
        return value


register_url_convertor("document_id", DocumentIdConvertor())

CollectionName = Annotated[str, Path(pattern=COLLECTION_RE.pattern, description="Collection.")]
DocumentId = Annotated[
    str,
    Path(
        min_length=1,
        max_length=MAX_ID_CHARS,
        pattern=NO_NUL,
        description="The document's id (percent-encoded; it may hold '/').",
    ),
]


class DocumentIn(BaseModel):
    """One document to store: its id (unique in the collection), text and metadata."""

    model_config = ConfigDict(strict=True)

    id: str = Field(..., min_length=1, max_length=MAX_ID_CHARS, pattern=NO_NUL)
    text: str = Field(..., pattern=NO_NUL)
    metadata: dict[str, Any] | None = Field(None, description="A JSON object (Metadata).")


class DocumentsBody(BaseModel):
    """``POST /collections/{collection}/documents``."""

    model_config = ConfigDict(strict=True)

    documents: list[DocumentIn] = Field(
        ..., description="Upserted by id; a repeated id keeps its last document."
    )
    chunk_tokens: Annotated[JsonInt, Field(ge=8)] | None = Field(
        None,
        description="Store texts as overlapping windows of this many tokens (items "
        "'<id>#<i>'), as `embedq ingest --chunk-tokens`; default: one item, cut at the "
        "model's max tokens.",
    )
    overlap: JsonInt = Field(0, ge=0, description="Tokens windows share (< chunk_tokens).")
    model: str | None = Field(
        None, description="Model by name or id; default: the collection's, else the default."
    )


class IngestCounts(BaseModel):
    """What the upsert did: items are documents, or their chunks."""

    documents: int
    items: int
    stored: int = Field(..., description="Items written (embedded or from the cache).")
    embedded: int
    cached: int
    skipped: int = Field(..., description="Items stored already just so (unchanged).")
    truncated: int


class ChunkOut(BaseModel):
    """One chunk of a document stored in chunks."""

    id: str
    chunk_index: int
    text: str
    truncated: bool
    vector: list[float] | None = None


class DocumentOut(BaseModel):
    """A stored document: ``text`` (null when it is stored in ``chunks``), metadata, the
    model that embedded it; its vector only when asked for (``?vector=true``)."""

    id: str
    collection: str
    text: str | None
    metadata: dict[str, Any]
    model: str
    truncated: bool
    updated_at: datetime | None
    chunks: list[ChunkOut] | None = None
    vector: list[float] | None = None


class Deleted(BaseModel):
    """Items removed: the document, or all of its chunks."""

    deleted: int


class Backend(Protocol):
    """What these routes need of the API's service (:class:`embedq.api.Service`)."""

    settings: Settings
    listener: ResultListener

    def check_texts(self, texts: list[str]) -> None:
        """413 for too many texts or one too long."""

    def require_worker(self) -> list[dict[str, Any]]:
        """Live workers' heartbeats, or 503."""


router = APIRouter(tags=["documents"])
WRITE_ERRORS = documented(400, 401, 404, 408, 409, 413, 422, 429, 502, 503, 504)
READ_ERRORS = documented(401, 404, 422, 429, 502, 503)


def backend(request: Request) -> Backend:
    """The app's service."""
    return request.app.state.service  # type: ignore[no-any-return]


def store() -> Store:
    """This process's store (the searcher's: one pool per process)."""
    from embedq.search.searcher import get_searcher

    return get_searcher().store


@router.post(
    "/collections/{collection}/documents", response_model=IngestCounts, responses=WRITE_ERRORS
)
async def upsert_documents(
    collection: CollectionName, body: DocumentsBody, request: Request, who: Authorized
) -> IngestCounts:
    """Store ``documents`` in ``collection`` as `embedq ingest` does: upserted by id,
    documents stored already with the same text, model and metadata skipped, bulk traffic
    (one job per key). Answers once every item is stored; a 504 means some still are
    being stored: the same request again finishes them (what is stored is skipped)."""
    who.require(collection)
    service = backend(request)
    docs = _documents(body.documents, service)
    if not docs:
        return IngestCounts(
            documents=0, items=0, stored=0, embedded=0, cached=0, skipped=0, truncated=0
        )
    tasks, model = await run_in_threadpool(_prepare, service, collection, docs, body)
    version = now_version()  # one request, one version: its items are written as one
    job = job_of(who.id)
    waits = [
        _run(service, (collection, batch, parents, model, version), job) for batch, parents in tasks
    ]
    counts = await asyncio.gather(*waits, return_exceptions=True)
    if failed := next((c for c in counts if isinstance(c, BaseException)), None):
        raise failed
    total = {name: sum(int(c.get(name, 0)) for c in counts) for name in IngestCounts.model_fields}
    return IngestCounts(**total | {"documents": len(docs), "items": sum(len(b) for b, _ in tasks)})


def _documents(given: list[DocumentIn], service: Backend) -> list[Document]:
    """The documents to store (a repeated id: its last), or 413/422 naming the one refused."""
    service.check_texts([d.text for d in given])
    latest = {d.id: Document(d.id, d.text, d.metadata or {}) for d in given}
    docs = list(latest.values())
    for doc in docs:
        if reason := refusal(doc):
            raise ApiError(422, f"documents (id {doc.id[:64]!r}): {reason}", "InvalidInputError")
    return docs


def _prepare(
    service: Backend, collection: str, docs: list[Document], body: DocumentsBody
) -> tuple[list[tuple[list[dict[str, Any]], dict[str, int]]], str | None]:
    """In a worker thread: the live workers (503 without), the model (the body's, else the
    collection's), and the tasks, chunks cut with that model's tokenizer."""
    beats = service.require_worker()
    if body.chunk_tokens is not None and not 0 <= body.overlap < body.chunk_tokens:
        raise ApiError(422, "overlap must be below chunk_tokens", "InvalidInputError")
    model = body.model or store().collection_model(collection)
    served = [m for beat in beats for m in listed_models(beat)]
    cutter = tokenizer_name(model, service.settings, served)
    made = batches(docs, IngestSummary(), TASK_ITEMS, body.chunk_tokens, body.overlap, cutter)
    tasks = [(batch, parents) for batch, parents, _ in made]
    items = sum(len(batch) for batch, _ in tasks)
    if items > service.settings.api_max_texts:
        raise ApiError(
            413,
            f"{items} items after chunking; at most {service.settings.api_max_texts} "
            "(EMBEDQ_API_MAX_TEXTS): send fewer documents per request",
            "TooManyTexts",
        )
    return tasks, model


async def _run(service: Backend, args: tuple[Any, ...], job: str) -> dict[str, int]:
    """One ``ingest_documents`` task: subscribed to, sent from a worker thread, awaited."""
    task_id = str(uuid4())
    timeout_s = service.settings.api_timeout_s

    async def send() -> None:
        await run_in_threadpool(_send, args, task_id, job, timeout_s)

    try:
        return await service.listener.wait(task_id, timeout_s, send)  # type: ignore[no-any-return]
    except CeleryTimeout as exc:
        message = (
            f"not every item stored within {timeout_s:g} s (EMBEDQ_API_TIMEOUT_S); they still "
            "are being stored: send the same request again to finish (stored ones are skipped)"
        )
        raise ApiError(504, message, "Timeout") from exc


def _send(args: tuple[Any, ...], task_id: str, job: str, timeout_s: float) -> None:
    from embedq.tasks import ingest_documents

    publish = functools.partial(ingest_documents.apply_async, args, task_id=task_id, job=job)
    try:
        with waited_by_listener():
            wait_while_full(publish, "the API", time.monotonic() + timeout_s)
    except Exception as exc:
        if is_redis_full(exc):
            raise ApiError(503, f"{describe(exc)}: try again later", "RedisFull") from exc
        raise


@router.get(
    "/collections/{collection}/documents/{document_id:document_id}",
    response_model=DocumentOut,
    responses=READ_ERRORS,
)
def read_document(
    collection: CollectionName,
    document_id: DocumentId,
    who: Authorized,
    vector: Annotated[bool, Query(description="Include the vector(s).")] = False,
) -> DocumentOut:
    """One stored document: its text, metadata and model; a document stored in chunks
    gives its chunks instead of one text."""
    who.require(collection)
    found = store().get(collection, [document_id])
    if found:
        return _document(found[0], None, vector)
    parts = store().chunks(collection, document_id)
    if not parts:
        raise _no_document(collection, document_id)
    return _document(parts[0], parts, vector)


def _document(item: Item, parts: list[Item] | None, vector: bool) -> DocumentOut:
    chunks = None
    if parts is not None:
        chunks = [
            ChunkOut(
                id=p.id,
                chunk_index=p.chunk_index or 0,
                text=p.text,
                truncated=p.truncated,
                vector=p.vector.tolist() if vector else None,
            )
            for p in parts
        ]
    return DocumentOut(
        id=item.parent_id if parts is not None and item.parent_id else item.id,
        collection=item.collection,
        text=None if parts is not None else item.text,
        metadata=item.metadata,
        model=item.model,
        truncated=any(p.truncated for p in parts) if parts else item.truncated,
        updated_at=_utc(max(p.updated_at for p in parts) if parts else item.updated_at),  # type: ignore[type-var]
        chunks=chunks,
        vector=item.vector.tolist() if vector and parts is None else None,
    )


@router.delete(
    "/collections/{collection}/documents/{document_id:document_id}",
    response_model=Deleted,
    responses=READ_ERRORS,
)
def delete_document(
    collection: CollectionName, document_id: DocumentId, who: Authorized
) -> Deleted:
    """Remove a document (with its chunks); searches never return it again."""
    who.require(collection)
    deleted = store().delete(collection, [document_id])
    deleted += store().delete_chunks(collection, document_id, 0)
    if not deleted:
        raise _no_document(collection, document_id)
    return Deleted(deleted=deleted)


def _utc(stamp: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes for what was written as UTC.
    return stamp.replace(tzinfo=UTC) if stamp is not None and stamp.tzinfo is None else stamp


def _no_document(collection: str, document_id: str) -> ApiError:
    return ApiError(404, f"no document {document_id[:64]!r} in {collection!r}", "NotFound")


def state_schemas(schemas: dict[str, Any], settings: Settings, ref: str) -> None:
    """What the models cannot say: documents per request and characters per text (more:
    413), and what metadata may hold (no NUL, integers within 64 bits; a metadata object
    is also at most 64 KiB as JSON and 32 levels deep)."""
    body = schemas["DocumentsBody"]["properties"]
    body["documents"]["maxItems"] = settings.api_max_texts
    # pydantic writes a bound of an optional JsonInt as "ge", which JSON Schema ignores.
    body["chunk_tokens"]["anyOf"][0] = {"type": "integer", "minimum": 8}
    document = schemas["DocumentIn"]["properties"]
    document["text"]["maxLength"] = settings.api_max_text_chars
    document["metadata"]["anyOf"] = [{"$ref": f"{ref}Metadata"}, {"type": "null"}]
    value = {"$ref": f"{ref}MetadataValue"}
    text = {"type": "string", "pattern": NO_NUL}
    whole = {"type": "integer", "minimum": INT64_MIN, "maximum": UINT64_MAX}
    fraction = {"type": "number", "not": {"type": "integer"}}
    mapping = {"type": "object", "propertyNames": text, "additionalProperties": value}
    schemas["Metadata"] = mapping | {
        "description": "Any JSON object: at most 64 KiB as JSON, 32 levels deep, no NUL."
    }
    schemas["MetadataValue"] = {
        "anyOf": [
            {"type": "null"},
            {"type": "boolean"},
            whole,
            fraction,
            text,
            {"type": "array", "items": value},
            mapping,
        ]
    }
