"""The mirror's middleware, outermost first: `observe` (request metrics and the access log) and
`render_errors` (every failure as an OCI error body, a traceback only ever in the log).

Handlers note what a request was on it (`keys.ROUTE`, `keys.CACHE_RESULT`, ...); `observe`
reads those values, never the response's headers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Middleware

from proxy.errors import ErrorCode, RegistryError
from proxy.oci import CacheResult
from proxy.ops.logging import direct_lines
from proxy.server import keys

log = logging.getLogger(__name__)
access_log = logging.getLogger("registry_proxy.access")

OPERATOR_ROUTES: Final = frozenset({"metrics", "healthz", "readyz"})
# The `method` label: RFC 9110 section 9 methods, anything else (a client may send any token)
# is `other`, so clients cannot add series at will.
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

__all__ = ["Handler", "Middleware", "error_response", "observe", "render_errors"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CACHE_RESULTS: Final = frozenset(CacheResult)
_STATUS_CLASSES: Final = {n: f"{n}xx" for n in range(1, 6)}


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Time every request, count it, and write one access log line, errors included."""
    started = time.monotonic()
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        return response
    finally:
        duration = time.monotonic() - started
        status = response.status if response is not None else 499
        cache = _cache_label(request, status)
        route = request.get(keys.ROUTE, "other")
        metrics = request.app[keys.METRICS]
        method = request.method if request.method in METHODS else "other"
        kind = request.get(keys.CACHE_KIND) if cache in CACHE_RESULTS else None
        histogram, counter = metrics.request_series(
            route, method, _status_class(status), cache, kind
        )
        histogram.observe(duration)
        if counter is not None:
            counter.inc()
        sent = _bytes_sent(request, response)
        if (traffic := request.app.get(keys.TRAFFIC)) is not None and status < 400:
            traffic.record(request, sent)  # the admin API's top repositories
        # The status went out before the body broke: only this tells it from a success.
        aborted = request.get(keys.ABORTED)
        if aborted is not None:
            metrics.aborted_responses.labels(aborted).inc()
        _log_access(request, route, status, cache, sent, aborted, duration)


def _log_access(
    request: web.Request,
    route: str,
    status: int,
    cache: str,
    sent: int,
    aborted: str | None,
    duration: float,
) -> None:
    # Probes and scrapes arrive every few seconds: worth a line only when debugging.
    level = logging.DEBUG if route in OPERATOR_ROUTES else logging.INFO
    if not access_log.isEnabledFor(level):
        return
    cut_short = "" if aborted is None else f" aborted ({aborted}) after {sent} bytes"
    fields: dict[str, Any] = {
        "remote": request.remote,
        "method": request.method,
        "path": request.path_qs,
        "route": route,
        "status": status,
        "bytes": sent,
        "aborted": aborted is not None,
        "duration_ms": round(duration * 1000, 3),
        "cache": cache,
        "upstream": request.get(keys.UPSTREAM, None),
        "identity": request.get(keys.IDENTITY, None),
        "user_agent": request.headers.get("User-Agent"),
    }
    if aborted is not None:
        fields["abort_cause"] = aborted
    if (direct := direct_lines(access_log)) is not None:
        direct.write(level, access_log.name, fields)
        return
    # Logger.log less its caller lookup (a walk up the stack), once per request.
    args = (request.method, request.path_qs, status, cut_short)
    record = access_log.makeRecord(
        access_log.name, level, __file__, 0, "%s %s %s%s", args, None, extra={"access": fields}
    )
    access_log.handle(record)


def _status_class(status: int) -> str:
    return _STATUS_CLASSES.get(status // 100) or f"{status // 100}xx"


def _cache_label(request: web.Request, status: int) -> str:
    if status >= 400:
        return "error"
    return str(request.get(keys.CACHE_RESULT, "pass"))


def _bytes_sent(request: web.Request, response: web.StreamResponse | None) -> int:
    sent: int | None = request.get(keys.BYTES_SENT)
    if sent is not None:
        return sent
    if isinstance(response, web.Response) and isinstance(body := response.body, bytes):
        return len(body)
    return 0


def error_response(error: RegistryError) -> web.Response:
    return web.Response(
        status=error.status,
        body=error.body(),
        content_type="application/json",
        headers=error.headers,
    )


@web.middleware
async def render_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every failure as an OCI error body; a traceback only ever reaches the log."""
    try:
        return await handler(request)
    except RegistryError as error:
        if error.status >= 500:
            log.warning("%s %s: %s", request.method, request.path, error.message)
        return error_response(error)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = ErrorCode.UNSUPPORTED if exc.status == 405 else ErrorCode.NAME_UNKNOWN
        return error_response(RegistryError(code, exc.reason, status=exc.status))
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(RegistryError(ErrorCode.UNKNOWN, "internal error"))
