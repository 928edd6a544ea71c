"""HTTP handlers for the pull API: parse the request, ask a service, shape the response."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import urlencode

from aiohttp import web

from proxy import passthrough, request_keys, state
from proxy.blobstore import CacheResult
from proxy.oci import ApiPath, Digest, ErrorCode, RegistryError, parse_api_path
from proxy.routing import is_registry_host
from proxy.taglist import TagQuery
from proxy.upstream import CLIENT_CREDENTIALS, Upstream

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
READ_METHODS = frozenset({"GET", "HEAD"})


async def registry_api(request: web.Request) -> web.StreamResponse:
    """Every `/v2/...` request: one parser picks the endpoint; bad names never reach a route."""
    raw_tail = request.rel_url.raw_path.removeprefix("/v2").removeprefix("/")
    access = request.app[state.ACCESS]
    identity = await access.authenticate(request.headers.get("Authorization"), request.remote)
    request[request_keys.IDENTITY] = identity
    if raw_tail == "":
        request[request_keys.ROUTE] = "ping"
        if request.method not in READ_METHODS:
            raise RegistryError(ErrorCode.UNSUPPORTED, "this registry mirror is read-only")
        # skopeo, podman and dockerd send credentials only after a challenged ping.
        if request.app[state.GUARD].passing and "Authorization" not in request.headers:
            raise RegistryError(
                ErrorCode.UNAUTHORIZED,
                "send credentials for upstreams that need them, or none",
                headers=passthrough.challenge(request),
            )
        return web.json_response({})
    upstream, tail = request.app[state.UPSTREAMS].route(raw_tail, request.query.get("ns"))
    request[request_keys.UPSTREAM] = upstream.name
    api = parse_api_path(tail)
    request[request_keys.ROUTE] = api.endpoint
    if api.endpoint == "unsupported" or request.method not in READ_METHODS:
        raise RegistryError(ErrorCode.UNSUPPORTED, "this registry mirror is read-only")
    if api.repository is not None:
        access.authorize(identity, upstream.name, api.repository.name)
    if api.repository is not None and upstream.settings.pass_client_credentials:
        credentials = passthrough.client_credentials(request.headers.get("Authorization"))
        # Set for this request's task and everything it starts (a download in its name).
        scope = CLIENT_CREDENTIALS.set(credentials)
        try:
            await request.app[state.PASSTHROUGH].check(request, upstream, api, credentials)
            return await _guarded(request, upstream, api, identity)
        finally:
            CLIENT_CREDENTIALS.reset(scope)
    return await _guarded(request, upstream, api, identity)


async def _guarded(
    request: web.Request, upstream: Upstream, api: ApiPath, identity: str
) -> web.StreamResponse:
    """Dispatch, serving content by digest only through a repository it was seen in
    (proxy.provenance), and note where what was served came from."""
    guard = request.app[state.GUARD]
    kind = {"manifest": "manifest", "blob": "blob"}.get(api.endpoint)
    by_digest = kind is not None and isinstance(api.reference, Digest)
    if kind is not None and isinstance(api.reference, Digest):
        assert api.repository is not None
        await guard.check(identity, upstream, api.repository, api.reference, kind)
    response = await _dispatch(request, upstream, api)
    if kind is not None and response.status in (200, 206, 304):
        assert api.repository is not None
        # A tag's resolution is kept per (upstream, repository), so its digest was seen there;
        # content by digest only when this request fetched it through this repository.
        fetched_here = response.headers.get("X-Cache") == CacheResult.MISS
        header = response.headers.get("Docker-Content-Digest")
        if header is not None and (fetched_here or not by_digest):
            digest = Digest.parse(header)
            guard.provenance.record(digest, upstream.name, api.repository.name)
    return response


async def _dispatch(request: web.Request, upstream: Upstream, api: ApiPath) -> web.StreamResponse:
    if api.endpoint == "manifest":
        return await _manifest(request, upstream, api)
    if api.endpoint == "blob":
        return await _blob(request, upstream, api)
    if request.method == "GET" and api.endpoint == "tags":
        return await _tags(request, upstream, api)
    if request.method == "GET" and api.endpoint == "referrers":
        return await _referrers(request, upstream, api)
    raise RegistryError(ErrorCode.UNSUPPORTED, f"{request.method} is not supported here")


async def _manifest(request: web.Request, upstream: Upstream, api: ApiPath) -> web.StreamResponse:
    assert api.repository is not None
    manifests = request.app[state.MANIFESTS]
    head = request.method == "HEAD"
    request[request_keys.CACHE_KIND] = "manifest" if isinstance(api.reference, Digest) else "tag"
    if isinstance(api.reference, Digest):
        answer = await manifests.by_digest(upstream, api.repository, api.reference, head=head)
    else:
        assert api.reference is not None
        accept = request.headers.getall("Accept", [])
        answer = await manifests.by_tag(upstream, api.repository, api.reference, accept, head=head)
    etag = f'"{answer.digest}"'
    headers = {
        "Content-Type": answer.media_type,
        "Docker-Content-Digest": str(answer.digest),
        "ETag": etag,
        "X-Cache": answer.cache,
    }
    if answer.cache == "STALE":
        headers["Warning"] = '110 registry-proxy "Response is Stale"'
    if etag in request.headers.getall("If-None-Match", []):
        return web.Response(status=304, headers=headers)
    if answer.body is None:
        response = web.StreamResponse(headers=headers)
        response.content_length = answer.size
        return response
    return web.Response(body=answer.body, headers=headers)


async def _blob(request: web.Request, upstream: Upstream, api: ApiPath) -> web.StreamResponse:
    assert api.repository is not None
    request[request_keys.CACHE_KIND] = "blob"
    return await request.app[state.BLOBS].serve(request, upstream, api.repository, api.digest)


async def _tags(request: web.Request, upstream: Upstream, api: ApiPath) -> web.StreamResponse:
    assert api.repository is not None
    query = TagQuery.parse(request.query)
    body, link = await upstream.get_tags(api.repository, query.upstream_query())
    page = query.page(body, link, request.rel_url.raw_path, request.query.get("ns"))
    headers = {"Content-Type": "application/json"}
    if page.link is not None:
        headers["Link"] = page.link
    return web.Response(body=page.body, headers=headers)


async def _referrers(request: web.Request, upstream: Upstream, api: ApiPath) -> web.StreamResponse:
    assert api.repository is not None
    query = {k: v for k, v in request.query.items() if k == "artifactType"}
    body, content_type = await upstream.get_referrers(
        api.repository, api.digest, urlencode(sorted(query.items()))
    )
    return web.Response(body=body, headers={"Content-Type": content_type})


async def add_protocol_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Docker-Distribution-API-Version"] = "registry/2.0"
    # OCI distribution spec: a mirror that uses `ns` says so by echoing it.
    ns = request.query.get("ns")
    if ns is not None and is_registry_host(ns):
        response.headers["OCI-Namespace"] = ns
