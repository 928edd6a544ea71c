"""The composition root: builds every service from the settings, wires them into one aiohttp
application, and opens and closes them in order. The only module that knows them all.

    settings -> upstreams (proxy.upstream) -> store, tags, manifests (proxy.cache)
             -> blob service, access, guard (proxy.server) -> routes and middleware
    with several workers, the sharding layer (proxy.workers.sharding) wraps the store, the blob
    service and the observe middleware; nothing below it knows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web

from proxy.cache.fetch import FetchPolicy
from proxy.cache.manifests import ManifestService
from proxy.cache.pins import PinResolver
from proxy.cache.prefetch import Prefetcher
from proxy.cache.provenance import Provenance
from proxy.cache.store import BlobStore
from proxy.cache.tags import TagCache
from proxy.config import Settings
from proxy.metrics import Metrics
from proxy.ops import admin
from proxy.server import keys, operator, passthrough, routes
from proxy.server.access import AccessControl
from proxy.server.blobs import BlobService, BlobServing
from proxy.server.guard import ProvenanceGuard
from proxy.server.health import HealthMonitor
from proxy.server.middleware import Middleware, observe, render_errors
from proxy.server.passthrough import UpstreamAccessCheck
from proxy.server.prepared import PreparedAnswers
from proxy.server.traffic import RepositoryTraffic
from proxy.upstream.routing import Upstreams
from proxy.workers import siblings
from proxy.workers.sharding import (
    OwnerRelay,
    ShardedBlobService,
    ShardedStore,
    relay_lifecycle,
    unless_relayed,
    worker_metrics,
)
from proxy.workers.siblings import Siblings
from proxy.workers.supervisor import SINGLE, Worker


@dataclass(frozen=True)
class _Sharding:
    """What running as one of several workers adds, around the single-process pieces."""

    relay: OwnerRelay | None
    observe: Middleware


def create_app(
    settings: Settings,
    *,
    upstreams: Upstreams | None = None,
    store: BlobStore | None = None,
    tags: TagCache | None = None,
    blobs: BlobServing | None = None,
    metrics: Metrics | None = None,
    worker: Worker = SINGLE,
) -> web.Application:
    """The mirror; tests inject their own upstreams, store, tag cache, blob service or metrics.

    `worker` says which of several worker processes this is (see `proxy.workers`): each owns
    a share of the blobs and of the budget, and the first also runs the admin and metrics
    listeners.
    """
    several = worker.count > 1
    metrics = metrics or (worker_metrics(worker) if several else Metrics())
    upstreams = upstreams or Upstreams(settings, metrics=metrics)
    store = store or _store(settings, worker)
    tags = tags or TagCache.from_settings(settings)
    prefetcher = Prefetcher(store, settings, metrics)
    service = BlobService(store, metrics, settings.send_timeout, on_read=prefetcher.read)
    relay = None
    if blobs is None and isinstance(store, ShardedStore):
        relay = OwnerRelay(worker, tls=settings.tls_cert is not None)
        blobs = ShardedBlobService(service, store, relay)
    app = web.Application(
        middlewares=[unless_relayed(observe) if several else observe, render_errors]
    )
    _provide(app, settings, upstreams, store, tags, blobs or service, metrics)
    app[keys.PREFETCH] = prefetcher
    # What prefetch fetched through a repository was seen there (proxy.cache.provenance).
    prefetcher.on_fetched = lambda u, r, digest: app[keys.PROVENANCE].record(digest, u, r)
    app.cleanup_ctx.append(_lifecycle(worker, relay))
    app.on_response_prepare.append(routes.add_protocol_headers)
    # With a separate metrics address, /metrics is served there only.
    operator.add_operator_routes(app, metrics=settings.metrics_listen is None)
    if relay is not None:
        app[keys.SIBLINGS] = others = Siblings(worker, relay)
        prefetcher.on_foreign = others.pass_on_prefetch
        app.router.add_post(siblings.ROUTE, siblings.sibling_operation)
    if app[keys.GUARD].passing:
        app.router.add_route("*", passthrough.TOKEN_PATH, passthrough.token_endpoint)
    app.router.add_route("*", "/v2", routes.registry_api)
    app.router.add_route("*", "/v2/{tail:.*}", routes.registry_api)
    return app


def _store(settings: Settings, worker: Worker) -> BlobStore:
    if worker.count > 1:
        return ShardedStore(
            settings.cache_dir,
            settings.cache_max_size,
            worker,
            download_timeout=settings.download_timeout,
            fetch_policy=_fetch_policy(settings),
        )
    return BlobStore(
        settings.cache_dir,
        settings.cache_max_size,
        download_timeout=settings.download_timeout,
        fetch_policy=_fetch_policy(settings),
    )


def _fetch_policy(settings: Settings) -> FetchPolicy:
    return FetchPolicy(
        resume_attempts=settings.resume_attempts,
        resume_backoff=settings.resume_backoff,
        parallel_threshold=settings.parallel_download_threshold,
        parallel_parts=settings.parallel_download_parts,
        split_probe=settings.parallel_download_probe,
        split_below=settings.parallel_download_below,
    )


def _provide(
    app: web.Application,
    settings: Settings,
    upstreams: Upstreams,
    store: BlobStore,
    tags: TagCache,
    blobs: BlobServing,
    metrics: Metrics,
) -> None:
    """Every service, under its key (`proxy.server.keys`)."""
    access = AccessControl.from_files(
        settings.auth_htpasswd, settings.auth_tokens_file, settings.access
    )
    provenance = Provenance(settings.cache_dir)
    passing = frozenset(u.name for u in settings.upstreams if u.pass_client_credentials)
    manifests = ManifestService(store, tags, settings)
    app[keys.SETTINGS] = settings
    app[keys.UPSTREAMS] = upstreams
    app[keys.STORE] = store
    app[keys.TAGS] = tags
    app[keys.METRICS] = metrics
    app[keys.ACCESS] = access
    app[keys.PROVENANCE] = provenance
    store.eviction.on_evicted = provenance.forget
    app[keys.GUARD] = ProvenanceGuard(provenance, access, passing)
    app[keys.PASSTHROUGH] = UpstreamAccessCheck(provenance)
    app[keys.HEALTH] = HealthMonitor(metrics, store.temp_dir)
    app[keys.BLOBS] = blobs
    app[keys.MANIFESTS] = manifests
    app[keys.PINS] = PinResolver(
        store, manifests, upstreams, settings.pins, refresh=settings.pin_refresh
    )
    app[keys.TRAFFIC] = RepositoryTraffic()
    # Who asks matters once access is controlled: then every request goes the whole way.
    open_to_all = not (access.enabled or access.rules or passing)
    app[keys.PREPARED] = PreparedAnswers(tags, upstreams, enabled=open_to_all)
    metrics.watch_store(store)


def _lifecycle(
    worker: Worker, relay: OwnerRelay | None
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        """Open in order, close in reverse; one admin and one metrics listener, not one per
        worker."""
        store = app[keys.STORE]
        await store.open()
        await asyncio.to_thread(app[keys.PROVENANCE].open)
        async with contextlib.AsyncExitStack() as running:
            if worker.index == 0:  # by the files, whichever worker holds them
                await running.enter_async_context(app[keys.PROVENANCE].pruning(store.has_file))
            await running.enter_async_context(app[keys.HEALTH].running())
            if worker.index == 0:
                await running.enter_async_context(operator.metrics_listener(app))
            await running.enter_async_context(app[keys.PINS].running())
            if worker.index == 0:
                await running.enter_async_context(admin.listening(app))
            if relay is not None:
                await running.enter_async_context(relay_lifecycle(relay))
                # First out, while the sessions it uses are open.
                running.push_async_callback(app[keys.SIBLINGS].close)
            yield
        await app[keys.PREFETCH].close()
        await app[keys.MANIFESTS].close()
        await store.close()
        app[keys.ACCESS].close()
        await app[keys.PROVENANCE].idle()
        app[keys.PROVENANCE].close()
        await app[keys.UPSTREAMS].close()
        await app[keys.TAGS].close()

    return lifecycle
