"""HTTP handlers for the pull API: parse the request, ask a service, shape the response.

Every `/v2/...` request goes through `registry_api`: authenticate the client, route to an
upstream (`proxy.upstream.routing`), parse the path into its endpoint's type
(`proxy.oci.api`), authorize, check the client's access upstream for a pass-through upstream
(`passthrough`) and the content's provenance (`guard`), then one handler per endpoint.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import urlencode

from aiohttp import web

from proxy.errors import ErrorCode, RegistryError
from proxy.oci import (
    BlobPath,
    CacheResult,
    Digest,
    ManifestPath,
    Ping,
    ReferrersPath,
    RepositoryPath,
    TagsPath,
    Unsupported,
    parse_api_path,
)
from proxy.server import keys, passthrough
from proxy.server.prepared import Prepared
from proxy.server.taglist import TagQuery
from proxy.upstream.client import Upstream
from proxy.upstream.routing import is_registry_host

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
READ_METHODS = frozenset({"GET", "HEAD"})


async def registry_api(request: web.Request) -> web.StreamResponse:
    """Every `/v2/...` request: one parser picks the endpoint; bad names never reach a route."""
    if (prepared := request.app[keys.PREPARED].get(request)) is not None:
        return _repeat(request, prepared)
    raw_tail = request.rel_url.raw_path.removeprefix("/v2").removeprefix("/")
    access = request.app[keys.ACCESS]
    identity = await access.authenticate(request.headers.get("Authorization"), request.remote)
    noted = keys.notes(request)
    noted.identity = identity
    if raw_tail == "":
        return _ping(request)
    upstream, tail = request.app[keys.UPSTREAMS].route(raw_tail, request.query.get("ns"))
    noted.upstream = upstream.name
    api = parse_api_path(tail)
    noted.route = api.endpoint
    if isinstance(api, Ping | Unsupported) or request.method not in READ_METHODS:
        raise RegistryError(ErrorCode.UNSUPPORTED, "this registry mirror is read-only")
    noted.repository = f"{upstream.name}/{api.repository.name}"
    access.authorize(identity, upstream.name, api.repository.name)
    if upstream.settings.pass_client_credentials:
        # The upstream in this client's name, for this request and what it starts.
        credentials = passthrough.client_credentials(request.headers.get("Authorization"))
        upstream = upstream.for_client(credentials)
        await request.app[keys.PASSTHROUGH].check(request, upstream, api, credentials)
    return await _guarded(request, upstream, api, identity)


def _ping(request: web.Request) -> web.StreamResponse:
    keys.notes(request).route = Ping.endpoint
    if request.method not in READ_METHODS:
        raise RegistryError(ErrorCode.UNSUPPORTED, "this registry mirror is read-only")
    # skopeo, podman and dockerd send credentials only after a challenged ping.
    if request.app[keys.GUARD].passing and "Authorization" not in request.headers:
        raise RegistryError(
            ErrorCode.UNAUTHORIZED,
            "send credentials for upstreams that need them, or none",
            headers=passthrough.challenge(request),
        )
    return web.json_response({})


async def _guarded(
    request: web.Request, upstream: Upstream, api: RepositoryPath, identity: str
) -> web.StreamResponse:
    """Dispatch, serving content by digest only through a repository it was seen in
    (proxy.server.guard), and note where what was served came from."""
    guard = request.app[keys.GUARD]
    content = isinstance(api, ManifestPath | BlobPath)
    digest = _content_digest(api)
    by_digest = digest is not None
    if digest is not None:
        await guard.check(identity, upstream, api.repository, digest, api.endpoint.value)
    response = await _dispatch(request, upstream, api)
    if content and response.status in (200, 206, 304):
        # A tag's resolution is kept per (upstream, repository), so its digest was seen there;
        # content by digest only when this request fetched it through this repository.
        fetched_here = keys.notes(request).cache_result is CacheResult.MISS
        header = response.headers.get("Docker-Content-Digest")
        if header is not None and (fetched_here or not by_digest):
            guard.provenance.record(Digest.parse(header), upstream.name, api.repository.name)
    return response


def _content_digest(api: RepositoryPath) -> Digest | None:
    """The digest a manifest or blob request names; None for a tag, a list, referrers."""
    if isinstance(api, BlobPath):
        return api.digest
    if isinstance(api, ManifestPath) and isinstance(api.reference, Digest):
        return api.reference
    return None


async def _dispatch(
    request: web.Request, upstream: Upstream, api: RepositoryPath
) -> web.StreamResponse:
    if isinstance(api, ManifestPath):
        return await _manifest(request, upstream, api)
    if isinstance(api, BlobPath):
        keys.notes(request).cache_kind = "blob"
        return await request.app[keys.BLOBS].serve(request, upstream, api.repository, api.digest)
    if request.method == "GET" and isinstance(api, TagsPath):
        return await _tags(request, upstream, api)
    if request.method == "GET" and isinstance(api, ReferrersPath):
        return await _referrers(request, upstream, api)
    raise RegistryError(ErrorCode.UNSUPPORTED, f"{request.method} is not supported here")


async def _manifest(
    request: web.Request, upstream: Upstream, api: ManifestPath
) -> web.StreamResponse:
    manifests = request.app[keys.MANIFESTS]
    head = request.method == "HEAD"
    noted = keys.notes(request)
    if isinstance(api.reference, Digest):
        kind = noted.cache_kind = "manifest"
        answer = await manifests.by_digest(upstream, api.repository, api.reference, head=head)
    else:
        kind = noted.cache_kind = "tag"
        accept = request.headers.getall("Accept", [])
        answer = await manifests.by_tag(upstream, api.repository, api.reference, accept, head=head)
    noted.cache_result = answer.cache
    etag = f'"{answer.digest}"'
    headers = {
        "Content-Type": answer.media_type,
        "Docker-Content-Digest": str(answer.digest),
        "ETag": etag,
        "X-Cache": answer.cache.header,
    }
    if answer.cache is CacheResult.STALE:
        headers["Warning"] = '110 registry-proxy "Response is Stale"'
    if etag in request.headers.getall("If-None-Match", []):
        return web.Response(status=304, headers=headers)
    request.app[keys.PREPARED].keep(
        request, upstream, api.repository, answer, headers, kind, protocol_headers(request)
    )
    if answer.body is not None:
        # Its blobs are what this client asks for next (proxy.cache.prefetch).
        request.app[keys.PREFETCH].image_served(
            upstream, api.repository, answer.digest, answer.body
        )
    return _manifest_response(headers, answer.body, answer.size)


def _repeat(request: web.Request, prepared: Prepared) -> web.StreamResponse:
    """A manifest hit answered before (proxy.server.prepared), noted as the first one was."""
    prepared.replay(keys.notes(request), request.app[keys.PREFETCH])
    request.app[keys.METRICS].prepared_answers.labels("app").inc()
    answer = prepared.answer
    return _manifest_response(prepared.headers, answer.body, answer.size)


def _manifest_response(
    headers: dict[str, str], body: bytes | None, size: int
) -> web.StreamResponse:
    if body is None:  # a HEAD: the length of what a GET would send
        response = web.StreamResponse(headers=headers)
        response.content_length = size
        return response
    return web.Response(body=body, headers=headers)


async def _tags(request: web.Request, upstream: Upstream, api: TagsPath) -> web.StreamResponse:
    query = TagQuery.parse(request.query)
    body, link = await upstream.get_tags(api.repository, query.upstream_query())
    page = query.page(body, link, request.rel_url.raw_path, request.query.get("ns"))
    headers = {"Content-Type": "application/json"}
    if page.link is not None:
        headers["Link"] = page.link
    return web.Response(body=page.body, headers=headers)


async def _referrers(
    request: web.Request, upstream: Upstream, api: ReferrersPath
) -> web.StreamResponse:
    query = {k: v for k, v in request.query.items() if k == "artifactType"}
    body, content_type = await upstream.get_referrers(
        api.repository, api.digest, urlencode(sorted(query.items()))
    )
    return web.Response(body=body, headers={"Content-Type": content_type})


async def add_protocol_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(protocol_headers(request))


def protocol_headers(request: web.BaseRequest) -> dict[str, str]:
    """The headers every response carries."""
    headers = {"Docker-Distribution-API-Version": "registry/2.0"}
    # OCI distribution spec: a mirror that uses `ns` says so by echoing it.
    ns = request.query.get("ns")
    if ns is not None and is_registry_host(ns):
        headers["OCI-Namespace"] = ns
    return headers
