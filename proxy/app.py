"""The aiohttp application: wiring, lifecycle and the one place errors are rendered."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from proxy import routes, state
from proxy.blobs import BlobService
from proxy.blobstore import BlobStore
from proxy.config import Settings
from proxy.manifests import ManifestService
from proxy.oci import ErrorCode, RegistryError
from proxy.routing import Upstreams
from proxy.tags import TagCache

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
) -> web.Application:
    """The mirror; tests inject their own upstreams, store or tag cache."""
    app = web.Application(middlewares=[render_errors])
    upstreams = upstreams or Upstreams(settings)
    store = store or BlobStore(
        settings.cache_dir, settings.cache_max_size, download_timeout=settings.download_timeout
    )
    tags = tags or TagCache.from_settings(settings)
    app[state.SETTINGS] = settings
    app[state.UPSTREAMS] = upstreams
    app[state.STORE] = store
    app[state.TAGS] = tags
    app[state.BLOBS] = BlobService(store)
    app[state.MANIFESTS] = ManifestService(store, tags, settings)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await store.open()
        yield
        await store.close()
        await upstreams.close()
        await tags.close()

    app.cleanup_ctx.append(lifecycle)
    app.on_response_prepare.append(routes.add_protocol_headers)
    app.router.add_route("*", "/v2", routes.registry_api)
    app.router.add_route("*", "/v2/{tail:.*}", routes.registry_api)
    return app
