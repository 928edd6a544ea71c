"""The mirror's middleware, outermost first: `observe` (request metrics and the access log) and
`render_errors` (every failure as an OCI error body, a traceback only ever in the log).

Handlers note what a request was in its `keys.Notes` (route, cache result, ...); `observe`
reads those values, never the response's headers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from json.encoder import encode_basestring_ascii
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

__all__ = ["Handler", "Middleware", "account", "error_response", "observe", "render_errors"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CACHE_RESULTS: Final = frozenset(CacheResult)
_STATUS_CLASSES: Final = {n: f"{n}xx" for n in range(1, 6)}


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Time every request, count it, and write one access log line, errors included."""
    started = time.monotonic()
    noted = request[keys.NOTES] = keys.Notes()
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        return response
    finally:
        status = response.status if response is not None else 499
        account(request.app, request, noted, status, _bytes_sent(noted, response), started)


def account(
    app: web.Application,
    request: web.BaseRequest,
    noted: keys.Notes,
    status: int,
    sent: int,
    started: float,
) -> None:
    """Count a finished request and write its access log line (for `observe`, and for repeats
    answered before the app: `proxy.server.repeats`)."""
    duration = time.monotonic() - started
    cache = _cache_label(noted, status)
    metrics = app[keys.METRICS]
    method = request.method if request.method in METHODS else "other"
    kind = noted.cache_kind if cache in CACHE_RESULTS else None
    histogram, counter = metrics.request_series(
        noted.route, method, _status_class(status), cache, kind
    )
    histogram.observe(duration)
    if counter is not None:
        counter.inc()
    if (traffic := app.get(keys.TRAFFIC)) is not None and status < 400:
        traffic.record(noted, sent)  # the admin API's top repositories
    # The status went out before the body broke: only this tells it from a success.
    if noted.aborted is not None:
        metrics.aborted_responses.labels(noted.aborted).inc()
    log_access(request, noted, status, cache, sent, duration)


def log_access(
    request: web.BaseRequest,
    noted: keys.Notes,
    status: int,
    cache: str,
    sent: int,
    duration: float,
) -> None:
    # Probes and scrapes arrive every few seconds: worth a line only when debugging.
    route = noted.route
    level = logging.DEBUG if route in OPERATOR_ROUTES else logging.INFO
    if not access_log.isEnabledFor(level):
        return
    if (direct := direct_lines(access_log)) is not None:
        # The JSON text itself, as json.dumps would write these fields (an f-string is a
        # fraction of a dict's encoding). All but the remote address and the duration repeat
        # from request to request (nodes ask for the same things again), so their text is made
        # once, in a bounded table; the line is made with its batch.
        agent = request.headers.get("User-Agent")
        key = (agent, request.method, request.raw_path, route, status, sent,
               noted.aborted, cache, noted.upstream, noted.identity)  # fmt: skip
        if (around := _AROUND.get(key)) is None:
            around = _around(*key)
            if len(key[2]) <= MAX_KEPT_PATH and (agent is None or len(agent) <= MAX_KEPT_PATH):
                if len(_AROUND) >= MAX_KEPT_LINES:
                    _AROUND.clear()
                _AROUND[key] = around
        remote = request.remote
        if (sender := _REMOTES.get(remote)) is None:
            sender = f'"remote": {_json(remote)}, '
            if len(_REMOTES) >= MAX_KEPT_LINES:
                _REMOTES.clear()
            _REMOTES[remote] = sender
        # The duration in ms with three decimals: as round(duration_ms, 3) reads back.
        direct.write(level, access_log.name, sender, around[0], duration * 1000, around[1])
        return
    remote, method, path = request.remote, request.method, request.raw_path
    upstream, identity, aborted = noted.upstream, noted.identity, noted.aborted
    agent = request.headers.get("User-Agent")
    duration_ms = round(duration * 1000, 3)
    fields: dict[str, Any] = {
        "remote": remote,
        "method": method,
        "path": path,
        "route": route,
        "status": status,
        "bytes": sent,
        "aborted": aborted is not None,
        "duration_ms": duration_ms,
        "cache": cache,
        "upstream": upstream,
        "identity": identity,
        "user_agent": agent,
    }
    if aborted is not None:
        fields["abort_cause"] = aborted
    cut_short = "" if aborted is None else f" aborted ({aborted}) after {sent} bytes"
    # Logger.log less its caller lookup (a walk up the stack), once per request.
    record = access_log.makeRecord(
        access_log.name,
        level,
        __file__,
        0,
        "%s %s %s%s",
        (method, path, status, cut_short),
        None,
        extra={"access": fields},
    )
    access_log.handle(record)


# What an access line's fields other than the remote address and the duration come to, for
# lines seen lately: a bounded table of bounded keys; and each remote address's member.
Around = tuple[str, str]
AroundKey = tuple[str | None, str, str, str, int, int, str | None, str, str | None, str | None]
_AROUND: dict[AroundKey, Around] = {}
_REMOTES: dict[str | None, str] = {}
MAX_KEPT_LINES: Final = 4096
MAX_KEPT_PATH: Final = 512


def _around(
    agent: str | None,
    method: str,
    path: str,
    route: str,
    status: int,
    sent: int,
    aborted: str | None,
    cache: str,
    upstream: str | None,
    identity: str | None,
) -> Around:
    """The JSON text of an access line's members after its remote address and before its
    duration, and after its duration."""
    return (
        f'"method": {_json(method)}, "path": {_json(path)}, '
        f'"route": {_json(route)}, "status": {status:d}, "bytes": {sent:d}, '
        f'"aborted": {"false" if aborted is None else "true"}, "duration_ms": ',
        f', "cache": {_json(cache)}, "upstream": {_json(upstream)}, '
        f'"identity": {_json(identity)}, "user_agent": {_json(agent)}'
        + ("" if aborted is None else f', "abort_cause": {_json(aborted)}'),
    )


def _json(text: str | None) -> str:
    return "null" if text is None else encode_basestring_ascii(text)


def _status_class(status: int) -> str:
    return _STATUS_CLASSES.get(status // 100) or f"{status // 100}xx"


def _cache_label(noted: keys.Notes, status: int) -> str:
    if status >= 400:
        return "error"
    return "pass" if noted.cache_result is None else str(noted.cache_result)


def _bytes_sent(noted: keys.Notes, response: web.StreamResponse | None) -> int:
    if noted.bytes_sent is not None:
        return noted.bytes_sent
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
