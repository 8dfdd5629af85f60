"""The HTTP API (FastAPI): ``embedq api``. It enqueues through Celery and waits for the result.

Endpoints: ``POST /embed``, ``POST /v1/embeddings`` (OpenAI request/response shape),
``POST /search``, ``GET /health``, ``GET /metadata``; the schema at ``/openapi.json``.
"""

from __future__ import annotations

import base64
import functools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from uuid import uuid4

import numpy as np
import orjson
import redis
from celery.exceptions import TimeoutError as CeleryTimeout
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from starlette.concurrency import run_in_threadpool

from embedq.broker.client import (
    MemoryWatch,
    describe,
    incr_with_ttl,
    is_redis_full,
    shared_client,
    wait_while_full,
)
from embedq.broker.results import ResultListener, waited_by_listener
from embedq.broker.url import redis_url
from embedq.encode.models import declared_dim, load_tokenizer, model_specs, tokenizer_name
from embedq.errors import ConfigurationError, ModelLoadError
from embedq.keys import rate_key
from embedq.ops.cost import cost_report
from embedq.ops.metrics import ApiMetrics, RequestMetrics
from embedq.ops.probe import ServerState, server_states
from embedq.ops.registry import listed_models
from embedq.ops.status import read_workers
from embedq.producer.router import router as router_state
from embedq.producer.serving import empty_result
from embedq.settings import QUEUES, Settings, get_settings
from embedq.store.filters import json_schemas, parse_where
from embedq.web import documents
from embedq.web.bodies import (
    EmbedBody,
    EmbedResponse,
    Health,
    OpenAIBody,
    OpenAIResponse,
    SearchBody,
    SearchResponse,
)
from embedq.web.collections import router as collections_router
from embedq.web.errors import (
    ApiError,
    documented,
    documented_json,
    error_response,
    install_errors,
)
from embedq.web.keys import ANONYMOUS, Caller, KeyRing, authorized, identified, job_of
from embedq.web.limits import RequestLimits

log = logging.getLogger(__name__)

# /health probes the servers at most this often (a load balancer may ask many times a second).
HEALTH_PROBE_EVERY_S = 1.0


@dataclass(frozen=True)
class Job:
    """One embedding request as the service sends it (``tokens``: count them too)."""

    texts: list[str]
    model: str | None = None
    normalize: bool = True
    queue: str | None = None
    tokens: bool = False
    #: Traffic class named by the caller (None: by size); the API key's bulk is one job.
    traffic: str | None = None


class Service:
    """What the endpoints share: settings, auth, rate limit, the Celery round trip."""

    def __init__(self, settings: Settings, allow_anonymous: bool) -> None:
        self.keys = KeyRing(settings.api_keys, settings.api_keys_file)
        if not self.keys.configured and not allow_anonymous:
            raise ConfigurationError(
                "the API needs keys: set EMBEDQ_API_KEYS or EMBEDQ_API_KEYS_FILE (or pass "
                "--insecure-no-auth)"
            )
        self.settings = settings
        self._states: list[ServerState] = []
        self._states_at = -HEALTH_PROBE_EVERY_S
        self._states_lock = threading.Lock()

    def server_states(self) -> list[ServerState]:
        """Each server's state (the broker first), probed within a few seconds at most, and
        at most every ``HEALTH_PROBE_EVERY_S`` (``/health``)."""
        with self._states_lock:
            if time.monotonic() - self._states_at >= HEALTH_PROBE_EVERY_S:
                self._states = server_states(self.settings)
                self._states_at = time.monotonic()
            return self._states

    def authenticate(self, credentials: HTTPAuthorizationCredentials | None) -> Caller:
        """The caller (its key id, a hash: keys are never logged, and its scope), or 401."""
        if not self.keys.configured:
            return Caller(ANONYMOUS)
        found = self.keys.identify(credentials.credentials if credentials else "")
        if found is None:
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)", "Auth")
        return found

    def limit_rate(self, key_id: str) -> None:
        """Count this request against the key's per-minute budget; 429 when spent."""
        now = time.time()
        try:
            count = incr_with_ttl(shared_client(), rate_key(key_id, int(now // 60)), 120, 0)
        except redis.ResponseError as exc:
            if not is_redis_full(exc):
                raise
            return  # a full Redis cannot count; the request itself will say it is full
        if count > self.settings.api_rate_limit_per_min:
            retry = str(int(60 - now % 60) + 1)
            message = (
                f"rate limit of {self.settings.api_rate_limit_per_min} requests per minute "
                "(EMBEDQ_API_RATE_LIMIT_PER_MIN) reached"
            )
            raise ApiError(429, message, "RateLimited", {"Retry-After": retry})

    def check_texts(self, texts: list[str]) -> None:
        """413 naming the limit when there are too many texts or one is too long."""
        if len(texts) > self.settings.api_max_texts:
            raise ApiError(
                413,
                f"{len(texts)} texts in one request; at most {self.settings.api_max_texts} "
                "(EMBEDQ_API_MAX_TEXTS)",
                "TooManyTexts",
            )
        longest = max((len(t) for t in texts), default=0)
        if longest > self.settings.api_max_text_chars:
            raise ApiError(
                413,
                f"a text of {longest} characters; at most {self.settings.api_max_text_chars} "
                "(EMBEDQ_API_MAX_TEXT_CHARS)",
                "TextTooLong",
            )

    @functools.cached_property
    def memory(self) -> MemoryWatch:
        """The broker's Redis memory, read at most every few seconds (``/health``)."""
        return MemoryWatch(shared_client())

    @functools.cached_property
    def metrics(self) -> ApiMetrics:
        """This API's Prometheus metrics (``/metrics``)."""
        return ApiMetrics(shared_client(), self.settings)

    def require_worker(self) -> list[dict[str, Any]]:
        """Live workers, or 503 (a task would only wait in the queue)."""
        workers = self._live_workers()
        if not workers:
            raise ApiError(503, "no embedq worker is alive; start `embedq worker`", "NoWorker")
        return workers

    def _live_workers(self) -> list[dict[str, Any]]:
        # The router's heartbeats (read at most once a second for routing too); none alive:
        # read again, a worker may just have started.
        beats = router_state.heartbeats()
        if not any(beats.values()):
            beats = router_state.heartbeats(fresh=True)
        return [w for workers in beats.values() for w in workers]

    def send(self, job: Job, task_id: str, key_id: str = "anonymous") -> Any:
        """Check that a worker lives, then enqueue ``job`` as ``task_id``; its AsyncResult."""
        from embedq.tasks import embed_texts

        self.require_worker()
        options: dict[str, Any] = {"queue": job.queue} if job.queue else {}
        # Nobody waits past the API's timeout: a worker drops the task unencoded then.
        options |= {"traffic": job.traffic, "deadline_s": self.settings.api_timeout_s}
        options["job"] = job_of(key_id)
        args = (job.texts, job.model, job.normalize)
        send = functools.partial(embed_texts.apply_async, args, task_id=task_id, **options)
        try:
            return wait_while_full(send, "the API", time.monotonic() + self.settings.api_timeout_s)
        except Exception as exc:
            if is_redis_full(exc):
                raise ApiError(503, f"{describe(exc)}: try again later", "RedisFull") from exc
            raise

    def _admit(self, key_id: str, job: Job, task_id: str) -> int | None:
        """In a worker thread: the rate limit, the enqueue as ``task_id``, and
        (``job.tokens``) the token count, in one hop off the event loop, not one each."""
        self.limit_rate(key_id)
        with waited_by_listener():
            self.send(job, task_id, key_id)
        return self.count_tokens(job.texts, job.model) if job.tokens else None

    async def embed_async(self, key_id: str, job: Job) -> tuple[Any, int | None]:
        """``job``'s vectors and token count: subscribed to on the shared result listener,
        enqueued from a worker thread (see :meth:`_admit`), then waited for (no thread held
        while the task runs, no read of the stored result)."""
        # No I/O: a request refused for its size costs no subscription.
        self.check_texts(job.texts)
        if not job.texts:
            return await run_in_threadpool(self._empty, key_id, job), 0
        task_id, tokens = str(uuid4()), None

        async def send() -> None:
            nonlocal tokens
            tokens = await run_in_threadpool(self._admit, key_id, job, task_id)

        try:
            return await self.listener.wait(task_id, self.settings.api_timeout_s, send), tokens
        except CeleryTimeout as exc:
            raise self._timeout() from exc

    def _empty(self, key_id: str, job: Job) -> Any:
        """An empty request, answered from live workers' heartbeats: shape (0, dim), no task."""
        self.limit_rate(key_id)
        self.require_worker()
        answer = empty_result(router_state, job.queue, job.model)
        if answer is None:
            raise ApiError(503, "no live worker says its model's dimension", "NoWorker")
        return answer.get()

    def _timeout(self) -> ApiError:
        message = f"no result within {self.settings.api_timeout_s:g} s (EMBEDQ_API_TIMEOUT_S)"
        return ApiError(504, message, "Timeout")

    @functools.cached_property
    def listener(self) -> ResultListener:
        """The one pub/sub listener every waiting request of this process shares."""
        from embedq.app import app

        return ResultListener(app.backend, redis_url())

    def count_tokens(self, texts: list[str], model: str | None = None) -> int:
        """Tokens the model sees (special tokens included, cut at its max)."""
        if not texts:
            return 0
        tokenizer = self.tokenizer(model)
        ids = tokenizer(texts, truncation=True, add_special_tokens=True)["input_ids"]
        return sum(len(x) for x in ids)

    def tokenizer(self, model: str | None) -> Any:
        """The tokenizer of the model a request names (by name, alias or id; see
        :func:`tokenizer_name`), else the default model's."""
        served = [m for beat in self._live_workers() for m in listed_models(beat)]
        try:
            return load_tokenizer(tokenizer_name(model, self.settings, served))
        except ModelLoadError:  # a worker's model whose files this host lacks
            return load_tokenizer(self.settings.model)


async def get_service(request: Request) -> Service:
    """The app's :class:`Service` (a dependency of every route; async, so FastAPI calls it
    in the event loop rather than through a worker thread)."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


router = APIRouter()
Authorized = Depends(authorized)
# Not "| None": a header has no null, and the schema must not offer one (absent: by size).
TrafficHeader = Annotated[
    Literal["interactive", "bulk"],
    Header(
        alias="X-Embedq-Traffic",
        description="Traffic class: interactive (served first) or bulk (default: by size).",
    ),
]
# Authenticated without I/O (on the event loop): the embedding routes count the request
# against the rate limit in the same worker-thread hop that enqueues the task.
KeyId = Annotated[Caller, Depends(identified)]


# What each kind of route may answer besides 200 (the schema says it; the tests hold it).
EMBED_ERRORS = documented(400, 401, 404, 408, 413, 422, 429, 502, 503, 504)


@router.post("/embed", response_model=EmbedResponse, responses=EMBED_ERRORS)
async def embed(
    body: EmbedBody,
    service: ServiceDep,
    who: KeyId,
    traffic: TrafficHeader = None,  # type: ignore[assignment]
) -> Response:
    """Embed ``texts``; vectors in input order."""
    job = Job(body.texts, body.model, body.normalize, body.queue, traffic=body.traffic or traffic)
    vectors, _ = await service.embed_async(who.id, job)
    return _json(
        {
            "model": body.model or service.settings.model,
            "dim": int(vectors.shape[1]),
            "vectors": np.asarray(vectors, np.float32),
            "truncated": list(vectors.truncated),
        }
    )


@router.post("/v1/embeddings", response_model=OpenAIResponse, responses=EMBED_ERRORS)
async def openai_embeddings(
    body: OpenAIBody,
    service: ServiceDep,
    who: KeyId,
    traffic: TrafficHeader = None,  # type: ignore[assignment]
) -> Response:
    """OpenAI-compatible embeddings (``encoding_format`` float or base64)."""
    texts = [body.input] if isinstance(body.input, str) else body.input
    job = Job(texts, body.model, tokens=True, traffic=traffic)
    found, tokens = await service.embed_async(who.id, job)
    vectors = np.asarray(found, np.float32)
    if body.dimensions is not None and body.dimensions != vectors.shape[1]:
        raise ApiError(
            422,
            f"dimensions={body.dimensions}: this model only gives {vectors.shape[1]}",
            "InvalidInputError",
        )
    return _json(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                for i, v in enumerate(vectors)
            ],
            "model": body.model or service.settings.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


@router.post(
    "/search",
    response_model=SearchResponse,
    responses=documented(400, 401, 404, 408, 409, 413, 422, 429, 502, 503, 504),
)
def search(
    body: SearchBody, service: ServiceDep, who: Annotated[Caller, Authorized]
) -> dict[str, Any]:
    """The ``k`` items of ``collection`` nearest to ``query``, among those whose metadata
    passes ``where``. A collection outside the key's scope: 404, as for a missing one."""
    from embedq.search.searcher import search as run_search

    who.require(body.collection)  # first: nothing else is said of a collection out of scope
    where = parse_where(body.where)  # checked before any work: a bad filter costs nothing
    service.check_texts([body.query])
    service.require_worker()
    hits = run_search(body.query, body.collection, k=body.k, where=where, parents=body.parents)
    return {"hits": [hit.__dict__ for hit in hits]}


HEALTH_503 = {
    "description": "No worker alive (an error body), or Redis full (status redis_full).",
    "content": {
        "application/json": {
            "schema": {
                "anyOf": [
                    {"$ref": "#/components/schemas/ErrorBody"},
                    {"$ref": "#/components/schemas/Health"},
                ]
            }
        }
    },
}


@router.get("/health", response_model=Health, responses={503: HEALTH_503})
def health(service: ServiceDep) -> JSONResponse:
    """200 when Redis answers, a worker is alive and Redis takes writes (ready; "degraded"
    when the store or the cache does not answer: embedding works without them), else 503
    saying why. ``servers`` gives each server's state, ``redis`` the broker's memory (used,
    maxmemory, policy, full). Answers within a few seconds whatever is down."""
    servers = service.server_states()
    if not servers[0].reachable:
        body = {"status": "redis_unreachable", "message": servers[0].error}
        return JSONResponse(body | {"servers": [s.as_dict() for s in servers]}, status_code=503)
    try:
        workers = service.require_worker()
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.kind)
    state = service.memory.state()
    body: dict[str, Any] = {"status": "ready", "workers": len(workers)}
    body["servers"] = [s.as_dict() for s in servers]
    if down := [s.error or s.name for s in servers if not s.reachable]:
        body |= {"status": "degraded", "message": " | ".join(down)}
    body["redis"] = state.as_dict() if state else None
    if state is not None and state.full:
        body["status"] = "redis_full"
        body["message"] = (
            "Redis is full (maxmemory, noeviction): requests wait for room; see `embedq status`"
        )
        return JSONResponse(body, status_code=503)
    return JSONResponse(body)


@router.get("/metadata", dependencies=[Authorized], responses=documented(401, 429, 503))
def metadata(service: ServiceDep) -> dict[str, Any]:
    """Model, dimension, queues and the devices of live workers."""
    workers = read_workers(shared_client())
    beats = [w for ws in workers.values() for w in ws]
    settings = service.settings
    return {
        "model": settings.model,
        "model_ids": sorted({w.get("model_id") for w in beats if w.get("model_id")}),
        "models": served_models(beats),
        "dim": next((w["dim"] for w in beats if w.get("dim")), None),
        "queues": {q: len(workers.get(q, [])) for q in QUEUES},
        "devices": sorted({w["device"] for w in beats}),
        "cost": cost_report(workers),
        "limits": {
            "max_texts": settings.api_max_texts,
            "max_text_chars": settings.api_max_text_chars,
            "max_body_mb": settings.api_max_body_mb,
            "rate_limit_per_min": settings.api_rate_limit_per_min,
        },
    }


# Authenticated, never rate-limited: monitoring is not throttled.
@router.get(
    "/metrics",
    dependencies=[Depends(identified)],
    response_class=PlainTextResponse,
    responses={200: {"description": "Prometheus text format 0.0.4."}, **documented_json(401, 503)},
)
def prometheus_metrics(service: ServiceDep) -> Response:
    """Prometheus metrics: the API's requests and the cluster's queues, router and SLOs."""
    body, content_type = service.metrics.render()
    return Response(body, media_type=content_type)


def served_models(beats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every model live workers serve (name, model id, dimension), from their heartbeats."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for beat in beats:
        for model in listed_models(beat):
            entry = {k: model.get(k) for k in ("name", "model_id", "dim")}
            found.setdefault((str(entry["name"]), str(entry["model_id"])), entry)
    return [found[key] for key in sorted(found)]


def create_app(settings: Settings | None = None, allow_anonymous: bool = False) -> FastAPI:
    """The FastAPI application; refuses to build without API keys unless told."""
    service = Service(settings or get_settings(), allow_anonymous)
    api = FastAPI(title="embedq", version="0.1.0", description=__doc__)
    api.state.service = service
    install_errors(api)
    api.include_router(router)
    api.include_router(documents.router)
    api.include_router(collections_router)
    api.openapi = functools.partial(_openapi, api, service.settings)  # type: ignore[method-assign]
    limits = service.settings
    api.add_middleware(
        RequestLimits,
        max_bytes=int(limits.api_max_body_mb * 2**20),
        body_timeout_s=limits.api_body_timeout_s,
    )
    api.add_middleware(RequestMetrics, metrics=service.metrics)  # outermost: counts 413s too
    return api


def _openapi(api: FastAPI, settings: Settings) -> dict[str, Any]:
    """FastAPI's schema plus what its models cannot know: this API's limits, the filter
    language and the dimensions the configured models give."""
    if api.openapi_schema is None:
        schema = get_openapi(
            title=api.title, version=api.version, description=api.description, routes=api.routes
        )
        schemas = schema["components"]["schemas"]
        _state_limits(schemas, settings)
        schemas.update(json_schemas(SCHEMAS))
        schemas["SearchBody"]["properties"]["where"] = {
            "anyOf": [{"$ref": f"{SCHEMAS}Where"}, {"type": "null"}]
        }
        _state_dimensions(schemas, settings)
        documents.state_schemas(schemas, settings, SCHEMAS)
        api.openapi_schema = schema
    return api.openapi_schema


SCHEMAS = "#/components/schemas/"


def _state_limits(schemas: dict[str, Any], settings: Settings) -> None:
    """The texts per request and characters per text the API takes (more: 413)."""
    text = {"type": "string", "maxLength": settings.api_max_text_chars}
    texts = {"type": "array", "maxItems": settings.api_max_texts, "items": text}
    schemas["EmbedBody"]["properties"]["texts"].update(texts)
    schemas["OpenAIBody"]["properties"]["input"]["anyOf"] = [text, texts]
    schemas["SearchBody"]["properties"]["query"]["maxLength"] = settings.api_max_text_chars


def _state_dimensions(schemas: dict[str, Any], settings: Settings) -> None:
    """``dimensions`` may only name what the configured models give (their files say)."""
    dims = sorted({declared_dim(spec.name) for spec in model_specs(settings)} - {None})
    if dims:
        dimensions = schemas["OpenAIBody"]["properties"]["dimensions"]
        dimensions["anyOf"] = [{"type": "integer", "enum": dims}, {"type": "null"}]


def _encode(vector: np.ndarray, encoding_format: str) -> np.ndarray | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector


def _json(content: dict[str, Any]) -> Response:
    """``content`` as JSON, numpy vectors included, written by orjson directly: FastAPI's
    response validation, jsonable_encoder and json.dumps would cost ~0.5 ms per 384-float
    vector. Floats are float32's shortest exact digits (they read back bit for bit)."""
    body = orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, media_type="application/json")
