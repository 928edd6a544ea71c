"""Serving the app: aiohttp's runner, with a request handler that answers malformed HTTP itself.

aiohttp's HTTP parser refuses a malformed request (a request line or header over the limit, a
space or a NUL in the path, an unknown method, bytes that are not HTTP) before any handler runs:
it answers a plain-text 400 and logs the parser's traceback at error level, once per request, so
a scanner on the network would fill the log. Here `MirrorRequestHandler.handle_error` answers
those requests instead, with the fitting status (RFC 9110 section 15.5.15 414 for a request line
over the limit, RFC 6585 section 5 431 for a header, section 15.6.2 501 for a method the server
does not know, else 400) and an OCI error body, and `MalformedRequestLog` writes at most one
warning line for each, a bounded number per minute. A TLS handshake on the plain-HTTP port is
what skopeo and podman send first to an "insecure" registry: answered the same way, logged only
at debug level. Errors of the application itself (500, 504) keep aiohttp's own handling.

The handler class is aiohttp's extension point for this: `MirrorRunner` is an `AppRunner` whose
server makes connections with it, and `serve` runs an app with it as `web.run_app` would.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from ssl import SSLContext
from typing import Any, Final

import uvloop
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy.errors import ErrorCode, RegistryError
from proxy.server import keys
from proxy.server.listener import AcceptingSite
from proxy.server.repeats import Repeats

log = logging.getLogger("registry_proxy.http")

# At most this many warning lines per window for malformed requests; the rest are counted and
# reported in one line when the next window opens.
MALFORMED_LINES_PER_WINDOW: Final = 10
MALFORMED_WINDOW_SECONDS: Final = 60.0
# RFC 9112 section 3.2: the request-target is "/..." (origin-form), "scheme://..." (absolute),
# or "*"; aiohttp's pure-Python parser quotes the whole request line, method first. A header
# field name never contains "/" or a space, so only a header *value* starting with "/" can be
# taken for a request line (and answered 414 rather than 431).
_REQUEST_LINE: Final = re.compile(
    rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+ )?(?:/|\*|[A-Za-z][A-Za-z0-9+.-]*://)"
)


class _Sent(web.StreamResponse):
    """What a request answered at the connection returns to aiohttp's connection loop, which
    reads only whether to keep the connection open. Never prepared: its bytes went out."""

    @property
    def keep_alive(self) -> bool:
        return True


SENT: Final = _Sent()


class MalformedRequestLog:
    """One warning line per malformed request, at most `limit` per `window` seconds.

    Beyond that they are counted, and the count is logged with the first line of a later window,
    so a scan costs a bounded number of lines and is still visible.
    """

    def __init__(
        self,
        limit: int = MALFORMED_LINES_PER_WINDOW,
        window: float = MALFORMED_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._window_start = float("-inf")
        self._logged = 0
        self.suppressed = 0

    def warn(self, remote: str | None, status: int, reason: str) -> None:
        now = self._clock()
        if now - self._window_start >= self.window:
            if self.suppressed:
                log.warning(
                    "%d more malformed requests were answered without a log line",
                    self.suppressed,
                )
            self._window_start, self._logged, self.suppressed = now, 0, 0
        if self._logged >= self.limit:
            self.suppressed += 1
            return
        self._logged += 1
        log.warning("malformed request from %s answered %d: %s", remote, status, reason)


def classify(exc: HttpProcessingError) -> tuple[int, str]:
    """The status and the message for a request aiohttp's parser refused."""
    if isinstance(exc, LineTooLong):
        line = exc.args[0] if exc.args else b""
        start = bytes(line) if isinstance(line, bytes | bytearray) else str(line).encode()
        if _REQUEST_LINE.match(start):
            return HTTPStatus.REQUEST_URI_TOO_LONG, "request line too long"
        return HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request header too large"
    if isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message:
        return HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many request headers"
    if isinstance(exc, BadHttpMethod):
        if _is_tls_handshake(exc):
            return HTTPStatus.BAD_REQUEST, "TLS handshake on a plain-HTTP port"
        return HTTPStatus.NOT_IMPLEMENTED, "request method not implemented"
    return HTTPStatus.BAD_REQUEST, "malformed HTTP request"


def _is_tls_handshake(exc: BadHttpMethod) -> bool:
    # aiohttp recognises the TLS record header (0x16 0x03) and says so in its message.
    return "HTTPS traffic" in exc.message or exc.line.startswith("\x16\x03")


class MirrorRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering requests its parser refused (see module doc) and
    repeated manifest hits (`proxy.server.repeats`) itself."""

    __slots__ = ("_malformed", "_repeats")

    def __init__(
        self,
        manager: web.Server,
        malformed: MalformedRequestLog,
        repeats: Repeats | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._malformed = malformed
        self._repeats = repeats

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if isinstance(transport.get_extra_info("sockname"), str):
            # A worker's Unix socket carries relays from the other workers: the worker a client
            # talks to has counted and logged it (proxy.workers.sharding).
            self._repeats = None

    async def _handle_request(
        self,
        request: BaseRequest,
        start_time: float | None,
        request_handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
    ) -> tuple[web.StreamResponse, bool]:
        # aiohttp's per-request step, called with the parsed request before any routing (a
        # private method: tests/unit/test_repeats.py fails if it is no longer called).
        repeats, transport = self._repeats, self.transport
        if repeats is not None and transport is not None and repeats.answer(request, transport):
            return SENT, False
        return await super()._handle_request(request, start_time, request_handler)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:  # as aiohttp: too late for another response
            raise ConnectionError("response already sent, cannot send an error response")
        answer, reason = classify(exc)
        if isinstance(exc, BadHttpMethod) and _is_tls_handshake(exc):
            log.debug("TLS handshake from %s on a plain-HTTP port", request.remote)
        else:
            self._malformed.warn(request.remote, answer, reason)
        error = RegistryError(ErrorCode.UNSUPPORTED, reason, status=answer)
        response = web.Response(status=answer, body=error.body(), content_type="application/json")
        response.force_close()
        return response


class MirrorServer(web.Server):
    """The low-level server an app runner makes, making connections with `MirrorRequestHandler`."""

    def __init__(
        self, made: web.Server, malformed: MalformedRequestLog, repeats: Repeats | None
    ) -> None:
        super().__init__(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )
        self.malformed = malformed
        self.repeats = repeats

    def __call__(self) -> RequestHandler:
        return MirrorRequestHandler(
            self, self.malformed, self.repeats, loop=self._loop, **self._kwargs
        )


class MirrorRunner(web.AppRunner):
    """`web.AppRunner` serving with `MirrorRequestHandler`; one malformed-request log per runner."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.malformed = MalformedRequestLog()

    async def _make_server(self) -> web.Server:
        # The app's own server (startup run, handler arguments resolved), as a MirrorServer.
        made = await super()._make_server()
        repeats = Repeats(self.app) if keys.PREPARED in self.app else None
        return MirrorServer(made, self.malformed, repeats)


def serve(
    app: web.Application,
    sockets: Sequence[socket.socket],
    *,
    ssl_context: SSLContext | None = None,
    shutdown_timeout: float = 30.0,
    **handler_args: Any,
) -> None:
    """Serve `app` until SIGTERM or SIGINT, then stop gracefully, as `web.run_app` does.

    On listening `sockets` (`listener.bind`'s; for a worker, the supervisor's and its own Unix
    socket for relays). `handler_args` go to aiohttp's request handler (its parser limits).
    """
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(app, sockets, ssl_context, shutdown_timeout, handler_args))


async def _serve(
    app: web.Application,
    sockets: Sequence[socket.socket],
    ssl_context: SSLContext | None,
    shutdown_timeout: float,
    handler_args: dict[str, Any],
) -> None:
    # web.run_app's keep-alive timeout, which aiohttp's handler would otherwise make an hour.
    runner = MirrorRunner(
        app,
        access_log=None,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=75.0,
        **handler_args,
    )
    await runner.setup()
    try:
        for sock in sockets:
            await AcceptingSite(runner, sock, ssl_context=ssl_context).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
