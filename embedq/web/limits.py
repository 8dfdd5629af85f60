"""What bounds one HTTP request before the API sees it: the body's size (413, declared or
streamed, chunked included) and the time its headers and body may take (slow clients),
and the uvicorn server ``embedq api`` runs with those bounds.

uvicorn alone waits for a request's headers and body without limit (its keep-alive timeout
only runs between requests, and any byte received stops it), and FastAPI turns an error
raised while it reads the body into a 400: so the body is read here, whole, before the
application runs, and the headers' deadline is kept by the protocol.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from embedq.settings import Settings
from embedq.web.errors import error_response

log = logging.getLogger(__name__)

CLOSE = {"Connection": "close"}


class _TooLarge(Exception):
    pass


class RequestLimits:
    """ASGI middleware: reads each request's body (at most ``max_bytes``, within
    ``body_timeout_s``) before the application runs, which then gets it whole. Over the
    size: 413; too slow, or a Content-Length the body never reaches: 408."""

    def __init__(self, app: ASGIApp, max_bytes: int, body_timeout_s: float) -> None:
        self.app, self.max_bytes, self.body_timeout_s = app, max_bytes, body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        try:
            async with asyncio.timeout(self.body_timeout_s):
                body = await self._read(receive)
        except _TooLarge:
            return await self._too_large(scope, receive, send)
        except TimeoutError:
            return await self._too_slow(scope, receive, send)
        if body is not None:  # None: the client went away
            await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | None:
        parts: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            parts.append(message.get("body", b""))
            seen += len(parts[-1])
            if seen > self.max_bytes:
                raise _TooLarge
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        mb = self.max_bytes / 2**20
        message = f"request body over {mb:g} MB (EMBEDQ_API_MAX_BODY_MB)"
        # The rest of the body is read and dropped by the server (up to the header timeout),
        # so the client gets to read this answer rather than a reset connection.
        await error_response(413, message, "RequestTooLarge")(scope, receive, send)

    async def _too_slow(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = (
            f"request body not received within {self.body_timeout_s:g} s "
            "(EMBEDQ_API_BODY_TIMEOUT_S)"
        )
        await error_response(408, message, "RequestTimeout", CLOSE)(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands over ``body`` once, then waits on the connection (for the
    disconnect an application may watch for)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers: counted from the
    connection's start, or the end of the previous response, it closes a connection whose
    next request's headers have not arrived (a slow or idle client), answering 408 if part
    of a request came."""

    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._partial = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the first request's deadline."""
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the deadline."""
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Note that a request started, then let h11 parse."""
        self._partial = self._timer is not None
        super().data_received(data)

    def handle_events(self) -> None:
        """A new request's headers arrived when h11 made a new cycle: stop the deadline."""
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:
            self._disarm()

    def on_response_complete(self) -> None:
        """The next request's deadline starts (unless a pipelined one already came)."""
        cycle = self.cycle
        super().on_response_complete()
        if self.cycle is cycle and not self.transport.is_closing():
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._partial = False
        self._timer = self.loop.call_later(self.header_timeout_s, self._late)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _late(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._partial and self.conn.their_state is h11.IDLE:
            # Part of a request came, and h11 cannot answer one it has not parsed: a
            # minimal 408 by hand (a connection still sending a refused body just closes).
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
        log.debug(
            "closing a connection whose request headers took over %s s", self.header_timeout_s
        )
        self.transport.close()


def serve(app: ASGIApp, host: str, port: int, settings: Settings) -> None:
    """Run ``app`` in uvicorn (h11) with the header deadline of ``settings``."""
    protocol = type(
        "EmbedqHttpProtocol",
        (HeaderTimeoutProtocol,),
        {"header_timeout_s": settings.api_header_timeout_s},
    )
    uvicorn.run(app, host=host, port=port, log_level="info", http=protocol)
