"""What an operator asks the mirror: `/metrics`, `/healthz`, `/readyz`, on the mirror's own
address or, with `metrics_listen`, on a small app of their own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.server import keys
from proxy.server.health import MAX_LOOP_LAG
from proxy.server.runner import MirrorRunner
from proxy.upstream.client import Upstream


async def metrics_endpoint(request: web.Request) -> web.Response:
    keys.notes(request).route = "metrics"
    body = generate_latest(request.app[keys.METRICS].exposition())
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers. Restarting it would not help anything else."""
    keys.notes(request).route = "healthz"
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the cache dir takes writes and the event loop is not stuck; with
    `ready_requires_upstream` (or `?upstream=1`) the upstreams must answer too."""
    app = request.app
    keys.notes(request).route = "readyz"
    health = app[keys.HEALTH]
    checks: dict[str, str] = {"cache": await health.check_cache()}
    checks["event_loop"] = "ok" if health.lag < MAX_LOOP_LAG else f"lagging {health.lag:.1f}s"
    if app[keys.SETTINGS].ready_requires_upstream or request.query.get("upstream") == "1":
        checks.update(await health.check_upstreams(lambda: _probe(app[keys.UPSTREAMS].configured)))
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


def add_operator_routes(app: web.Application, *, metrics: bool = True) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if metrics:
        app.router.add_get("/metrics", metrics_endpoint)


@contextlib.asynccontextmanager
async def metrics_listener(app: web.Application) -> AsyncIterator[None]:
    """With `metrics_listen`, a second small app serves /metrics, /healthz and /readyz."""
    address = app[keys.SETTINGS].metrics_listen
    if address is None:
        yield
        return
    operator = web.Application()
    operator[keys.SETTINGS] = app[keys.SETTINGS]
    operator[keys.METRICS] = app[keys.METRICS]
    operator[keys.STORE] = app[keys.STORE]
    operator[keys.UPSTREAMS] = app[keys.UPSTREAMS]
    operator[keys.HEALTH] = app[keys.HEALTH]
    add_operator_routes(operator)
    async with side_listener(MirrorRunner(operator, access_log=None), address):
        yield


@contextlib.asynccontextmanager
async def side_listener(runner: web.BaseRunner, address: tuple[str, int]) -> AsyncIterator[None]:
    """Serve `runner`'s app on its own address while the block runs (metrics, admin API)."""
    await runner.setup()
    try:
        await web.TCPSite(runner, address[0], address[1]).start()
        yield
    finally:
        await runner.cleanup()
