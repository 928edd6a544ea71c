"""HTTP handlers for the pull API: parse the request, ask a service, shape the response."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import urlencode

from aiohttp import web

from proxy import state
from proxy.oci import ApiPath, ErrorCode, RegistryError, parse_api_path

READ_METHODS = frozenset({"GET", "HEAD"})


async def registry_api(request: web.Request) -> web.StreamResponse:
    """Every `/v2/...` request: one parser picks the endpoint; bad names never reach a route."""
    tail = request.rel_url.raw_path.removeprefix("/v2").removeprefix("/")
    api = parse_api_path(tail)
    if api.endpoint == "unsupported" or request.method not in READ_METHODS:
        raise RegistryError(ErrorCode.UNSUPPORTED, "this registry mirror is read-only")
    if api.endpoint == "ping":
        return web.json_response({}, headers={"X-Cache": "HIT"})
    if api.endpoint == "manifest":
        return await _manifest(request, api)
    if api.endpoint == "blob":
        return await _blob(request, api)
    if api.endpoint == "tags" and request.method == "GET":
        return await _tags(request, api)
    raise RegistryError(ErrorCode.UNSUPPORTED, f"{request.method} is not supported here")


async def _manifest(request: web.Request, api: ApiPath) -> web.StreamResponse:
    assert api.repository is not None
    assert api.reference is not None
    upstream = request.app[state.UPSTREAM]
    answer = await request.app[state.MANIFESTS].get(
        upstream,
        api.repository,
        api.reference,
        request.headers.getall("Accept", []),
        head=request.method == "HEAD",
    )
    etag = f'"{answer.digest}"'
    headers = {
        "Content-Type": answer.media_type,
        "Docker-Content-Digest": str(answer.digest),
        "ETag": etag,
        "X-Cache": answer.cache,
    }
    if etag in request.headers.getall("If-None-Match", []):
        return web.Response(status=304, headers=headers)
    if answer.body is None:
        response = web.StreamResponse(headers=headers)
        response.content_length = answer.size
        return response
    return web.Response(body=answer.body, headers=headers)


async def _blob(request: web.Request, api: ApiPath) -> web.StreamResponse:
    assert api.repository is not None
    return await request.app[state.BLOBS].serve(
        request, request.app[state.UPSTREAM], api.repository, api.digest
    )


async def _tags(request: web.Request, api: ApiPath) -> web.StreamResponse:
    assert api.repository is not None
    # Only the spec's pagination parameters go upstream, re-encoded by us.
    query = {k: v for k, v in request.query.items() if k in ("n", "last")}
    if not query.get("n", "0").isdigit():
        raise RegistryError(ErrorCode.UNSUPPORTED, "n must be a number", status=400)
    query_string = urlencode(sorted(query.items()))
    body, link = await request.app[state.UPSTREAM].get_tags(api.repository, query_string)
    headers = {"Content-Type": "application/json"}
    if link is not None:
        headers["Link"] = link
    return web.Response(body=body, headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
