"""The HTTP API's errors: one JSON shape, ``{"error": {"message", "type", "code"}}``, for
every status the API answers with, each embedq error mapped to its status, and the
OpenAPI description of those responses (so the schema says what the API does)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from celery.exceptions import TimeoutError as CeleryTimeout
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from embedq.errors import (
    BrokerUnavailableError,
    CollectionModelError,
    DeadlineExceededError,
    EmbedqError,
    InvalidInputError,
    NoWorkerError,
    StoreError,
    TooManyTextsError,
    UnknownModelError,
)

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with its HTTP status; rendered as ``{"error": {...}}``."""

    def __init__(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


class ErrorDetail(BaseModel):
    """What went wrong: a message naming the problem (and the setting that limits it), the
    error's type name and the HTTP status."""

    message: str
    type: str
    code: int


class ErrorBody(BaseModel):
    """Every error response of the API."""

    error: ErrorDetail


STATUS_OF: list[tuple[type[Exception], int]] = [
    (TooManyTextsError, 413),
    (InvalidInputError, 422),
    (UnknownModelError, 404),
    (CollectionModelError, 409),
    (NoWorkerError, 503),
    (BrokerUnavailableError, 503),
    (redis.ConnectionError, 503),
    (redis.exceptions.OutOfMemoryError, 503),
    (CeleryTimeout, 504),
    (DeadlineExceededError, 504),
    (EmbedqError, 502),
]

MEANING = {
    400: "The body is not UTF-8 encoded JSON.",
    401: "Missing or wrong API key (Authorization: Bearer <key>).",
    404: "No such collection (or one outside the key's scope: the same answer), no such "
    "document, or a model no live worker serves.",
    408: "The body did not arrive within EMBEDQ_API_BODY_TIMEOUT_S.",
    409: "The collection is bound to another model.",
    413: "Over a limit: body size, texts per request or characters per text (named).",
    422: "Invalid input; the message names the field and the problem.",
    429: "The key's requests per minute are spent; see Retry-After.",
    502: "A worker or the store failed (the message says which).",
    503: "No live worker serves the queue or model, or Redis is unreachable or full.",
    504: "No result within EMBEDQ_API_TIMEOUT_S.",
}


def documented(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for ``codes``, each with the error body's schema."""
    return {code: {"model": ErrorBody, "description": MEANING[code]} for code in codes}


def documented_json(*codes: int) -> dict[int | str, dict[str, Any]]:
    """:func:`documented` for a route whose own responses are not JSON (its errors are)."""
    schema = {"$ref": "#/components/schemas/ErrorBody"}
    content = {"application/json": {"schema": schema}}
    return {code: {"description": MEANING[code], "content": content} for code in codes}


def error_response(
    status: int, message: str, kind: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The API's error body with its status."""
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _public(exc: Exception) -> str:
    """What a response may say of ``exc``: a store failure's driver text stays in the log."""
    if isinstance(exc, StoreError):
        log.warning("store error answered 502: %s", exc)
        return "the store could not answer; the API's log has the reason"
    return str(exc)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route takes at this path (Starlette's 405 names only the first
    route's, and a path such as a document's has one route per method)."""
    methods: set[str] = set()
    for route in _leaves(request.app.router.routes):
        if route.matches(request.scope)[0] != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def _leaves(routes: Iterable[Any]) -> Iterator[Any]:
    """The routes themselves, through the routers included without a prefix."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        yield from _leaves(inner.routes) if inner is not None else (route,)


def install_errors(api: FastAPI) -> None:
    """Render every error the routes raise as :func:`error_response`; an unknown one is a
    500 in the same shape (none is known to happen)."""

    @api.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.kind, exc.headers)

    @api.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid request')}"
        return error_response(422, message, "InvalidInputError")

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 400:  # FastAPI could not even decode the body
            message = "the request body could not be parsed: send UTF-8 encoded JSON"
        headers = exc.headers
        if exc.status_code == 405:
            headers = (headers or {}) | {"Allow": ", ".join(allowed_methods(request))}
        return error_response(exc.status_code, message, "HTTPError", headers)

    async def known(_: Request, exc: Exception) -> JSONResponse:
        status = next(code for kind, code in STATUS_OF if isinstance(exc, kind))
        return error_response(status, _public(exc), type(exc).__name__)

    # One handler per known class (Starlette picks the closest by MRO).
    for kind, _status in STATUS_OF:
        api.add_exception_handler(kind, known)

    @api.exception_handler(Exception)
    async def unknown(_: Request, exc: Exception) -> JSONResponse:
        # A bug: its traceback goes to the log (Starlette re-raises), its words nowhere.
        message = f"internal error ({type(exc).__name__}); the API's log has the reason"
        return error_response(500, message, "InternalError")
