"""What an operator sees: request metrics, the access log, health and readiness, `/metrics`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy import state
from proxy.metrics import MAX_LOOP_LAG
from proxy.request_keys import ABORTED, BYTES_SENT, CACHE_KIND, IDENTITY, ROUTE, UPSTREAM
from proxy.traffic import TRAFFIC
from proxy.upstream import Upstream
from proxy.workers import is_relayed

access_log = logging.getLogger("registry_proxy.access")

OPERATOR_ROUTES: Final = frozenset({"metrics", "healthz", "readyz"})
# The `method` label: RFC 9110 section 9 methods, anything else (a client may send any token)
# is `other`, so clients cannot add series at will.
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Time every request, count it, and write one access log line, errors included."""
    started = time.monotonic()
    response: web.StreamResponse | None = None
    if is_relayed(request):
        return await handler(request)  # measured and logged by the worker the client talks to
    try:
        response = await handler(request)
        return response
    finally:
        duration = time.monotonic() - started
        status = response.status if response is not None else 499
        cache = _cache_result(response, status)
        route = request.get(ROUTE, "other")
        metrics = request.app[state.METRICS]
        method = request.method if request.method in METHODS else "other"
        metrics.request_duration.labels(route, method, f"{status // 100}xx", cache).observe(
            duration
        )
        if CACHE_KIND in request and cache in ("hit", "miss", "coalesced", "stale"):
            metrics.cache_requests.labels(request[CACHE_KIND], cache).inc()
        if (traffic := request.app.get(TRAFFIC)) is not None and status < 400:
            traffic.record(request, _bytes_sent(request, response))  # the admin API's top repos
        # The status went out before the body broke: only this tells it from a success.
        aborted = request.get(ABORTED)
        cut_short = ""
        if aborted is not None:
            metrics.aborted_responses.labels(aborted).inc()
            cut_short = f" aborted ({aborted}) after {_bytes_sent(request, response)} bytes"
        # Probes and scrapes arrive every few seconds: worth a line only when debugging.
        level = logging.DEBUG if route in OPERATOR_ROUTES else logging.INFO
        if access_log.isEnabledFor(level):
            access_log.log(
                level,
                "%s %s %s%s",
                request.method,
                request.path_qs,
                status,
                cut_short,
                extra={
                    "access": {
                        "remote": request.remote,
                        "method": request.method,
                        "path": request.path_qs,
                        "route": route,
                        "status": status,
                        "bytes": _bytes_sent(request, response),
                        "aborted": aborted is not None,
                        "duration_ms": round(duration * 1000, 3),
                        "cache": cache,
                        "upstream": request.get(UPSTREAM, None),
                        "identity": request.get(IDENTITY, None),
                        "user_agent": request.headers.get("User-Agent"),
                        **({} if aborted is None else {"abort_cause": aborted}),
                    }
                },
            )


def _cache_result(response: web.StreamResponse | None, status: int) -> str:
    if response is None or status >= 400:
        return "error"
    header = response.headers.get("X-Cache")
    return header.lower() if header else "pass"


def _bytes_sent(request: web.Request, response: web.StreamResponse | None) -> int:
    if BYTES_SENT in request:
        return request[BYTES_SENT]
    if isinstance(response, web.Response) and response.body is not None:
        return len(response.body) if isinstance(response.body, bytes | bytearray) else 0
    return 0


async def metrics_endpoint(request: web.Request) -> web.Response:
    request[ROUTE] = "metrics"
    body = generate_latest(request.app[state.METRICS].exposition())
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers. Restarting it would not help anything else."""
    request[ROUTE] = "healthz"
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the cache dir takes writes and the event loop is not stuck; with
    `ready_requires_upstream` (or `?upstream=1`) the upstreams must answer too."""
    app = request.app
    request[ROUTE] = "readyz"
    health = app[state.HEALTH]
    checks: dict[str, str] = {"cache": await health.check_cache()}
    checks["event_loop"] = "ok" if health.lag < MAX_LOOP_LAG else f"lagging {health.lag:.1f}s"
    if app[state.SETTINGS].ready_requires_upstream or request.query.get("upstream") == "1":
        checks.update(await health.check_upstreams(lambda: _probe(app[state.UPSTREAMS].configured)))
    ready = all(value == "ok" for value in checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )


async def _probe(upstreams: list[Upstream]) -> dict[str, str]:
    """The configured upstreams only: on-demand ones are the clients' choice, not the mirror's
    readiness."""
    results = await asyncio.gather(*(_upstream_reachable(u.settings.url) for u in upstreams))
    return {f"upstream {u.name}": result for u, result in zip(upstreams, results, strict=True)}


async def _upstream_reachable(url: Any) -> str:
    timeout = aiohttp.ClientTimeout(total=2)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url / "v2" / "") as response,
        ):
            # 401 is a healthy registry asking for a token.
            return "ok" if response.status in (200, 401) else f"answered {response.status}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"unreachable: {type(exc).__name__}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; access log lines carry their fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update(access)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access log would duplicate ours.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
