"""The aiohttp application: wiring, lifecycle and the one place errors are rendered."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from proxy import admin, observability, passthrough, routes, state
from proxy.access import AccessControl
from proxy.blobs import BlobService
from proxy.blobstore import BlobStore
from proxy.config import Settings
from proxy.manifests import ManifestService
from proxy.metrics import HealthMonitor, Metrics
from proxy.oci import ErrorCode, RegistryError
from proxy.passthrough import UpstreamAccessCheck
from proxy.provenance import Provenance, ProvenanceGuard
from proxy.routing import Upstreams
from proxy.server import MirrorRunner
from proxy.tags import TagCache
from proxy.workers import SINGLE, OwnerRelay, Worker, relay_lifecycle

log = logging.getLogger(__name__)


def error_response(error: RegistryError) -> web.Response:
    return web.Response(
        status=error.status,
        body=error.body(),
        content_type="application/json",
        headers=error.headers,
    )


@web.middleware
async def render_errors(request: web.Request, handler: routes.Handler) -> web.StreamResponse:
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


def create_app(
    settings: Settings,
    *,
    upstreams: Upstreams | None = None,
    store: BlobStore | None = None,
    tags: TagCache | None = None,
    metrics: Metrics | None = None,
    worker: Worker = SINGLE,
) -> web.Application:
    """The mirror; tests inject their own upstreams, store, tag cache or metrics registry.

    `worker` says which of several worker processes this is (see `proxy.workers`): each owns
    a share of the blobs and of the budget, and the first also runs the admin and metrics
    listeners.
    """
    app = web.Application(middlewares=[observability.observe, render_errors])
    several = worker.count > 1
    metrics = metrics or Metrics(multiprocess_dir=worker.metrics_dir if several else None)
    upstreams = upstreams or Upstreams(settings, metrics=metrics)
    store = store or BlobStore(
        settings.cache_dir,
        settings.cache_max_size // worker.count,
        download_timeout=settings.download_timeout,
        shard=(worker.index, worker.count),
    )
    relay = OwnerRelay(worker, tls=settings.tls_cert is not None) if several else None
    tags = tags or TagCache.from_settings(settings)
    app[state.SETTINGS] = settings
    app[state.UPSTREAMS] = upstreams
    app[state.STORE] = store
    app[state.TAGS] = tags
    app[state.METRICS] = metrics
    app[state.ACCESS] = AccessControl.from_files(
        settings.auth_htpasswd, settings.auth_tokens_file, settings.access
    )
    provenance = Provenance(settings.cache_dir)
    passing = frozenset(u.name for u in settings.upstreams if u.pass_client_credentials)
    app[state.GUARD] = ProvenanceGuard(provenance, app[state.ACCESS], passing)
    app[state.PASSTHROUGH] = UpstreamAccessCheck(provenance)
    app[state.HEALTH] = HealthMonitor(metrics, store.temp_dir)
    app[state.BLOBS] = BlobService(store, metrics, settings.send_timeout, relay)
    metrics.watch_store(store)
    app[state.MANIFESTS] = ManifestService(store, tags, settings)
    admin.install(app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await store.open()
        await asyncio.to_thread(provenance.open)
        async with contextlib.AsyncExitStack() as running:
            await running.enter_async_context(app[state.HEALTH].running())
            # One admin and one metrics listener, not one per worker.
            if worker.index == 0:
                await running.enter_async_context(_metrics_listener(app))
            await running.enter_async_context(admin.running(app, listen=worker.index == 0))
            if relay is not None:
                await running.enter_async_context(relay_lifecycle(relay))
            yield
        await app[state.MANIFESTS].close()
        await store.close()
        app[state.ACCESS].close()
        provenance.close()
        await upstreams.close()
        await tags.close()

    app.cleanup_ctx.append(lifecycle)
    app.on_response_prepare.append(routes.add_protocol_headers)
    # With a separate metrics address, /metrics is served there only.
    _add_operator_routes(app, metrics=settings.metrics_listen is None)
    if passing:
        app.router.add_route("*", passthrough.TOKEN_PATH, passthrough.token_endpoint)
    app.router.add_route("*", "/v2", routes.registry_api)
    app.router.add_route("*", "/v2/{tail:.*}", routes.registry_api)
    return app


def _add_operator_routes(app: web.Application, *, metrics: bool = True) -> None:
    app.router.add_get("/healthz", observability.healthz)
    app.router.add_get("/readyz", observability.readyz)
    if metrics:
        app.router.add_get("/metrics", observability.metrics_endpoint)


@contextlib.asynccontextmanager
async def _metrics_listener(app: web.Application) -> AsyncIterator[None]:
    """With `metrics_listen`, a second small app serves /metrics, /healthz and /readyz."""
    address = app[state.SETTINGS].metrics_listen
    if address is None:
        yield
        return
    operator = web.Application()
    operator[state.SETTINGS] = app[state.SETTINGS]
    operator[state.METRICS] = app[state.METRICS]
    operator[state.STORE] = app[state.STORE]
    operator[state.UPSTREAMS] = app[state.UPSTREAMS]
    operator[state.HEALTH] = app[state.HEALTH]
    _add_operator_routes(operator)
    runner = MirrorRunner(operator, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, address[0], address[1]).start()
    try:
        yield
    finally:
        await runner.cleanup()
