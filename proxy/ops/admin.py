"""The admin API: a small JSON API on its own listener (`admin_listen`, off by default).

Every request carries `Authorization: Bearer <token>` when `admin_token_file` is set; without
it, or with another token, the answer is 401. Errors are `{"error": "..."}`.

    GET  /stats                      size, budget, entries, pins, hit ratio, top repositories,
                                     each upstream's quota (rate-limit headers)
    GET  /tags?repository=REPO       cached tag resolutions of a repository, with digest and age
    POST /invalidate  {"repository": REPO, "tag": TAG?}   the next pull of the tag (or of every
                                     tag of the repository) revalidates with the upstream
    POST /evict       {"digest": DIGEST}                  drop one blob or manifest
    POST /verify                     re-hash every cached file; corrupt ones are evicted
    GET  /pins                       pinned images and what they resolved to
    PUT  /pins        {"references": [REF, ...]}          replace the pinned set (422 when it
                                     does not fit in the budget)

REPO and REF are image references as clients write them (`nginx`, `ghcr.io/org/app:1.2`),
routed to an upstream as the mirror routes a pull (see `references`).

With several workers the API is served by worker 0, and what acts on the cache (`stats`'
cache figures, `invalidate`, `evict`, `verify`, setting pins) is done in every worker, each on
its share of the blobs and its own memory (`HERE`, run in the others by
`proxy.workers.siblings`), and the answers added up.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from proxy.cache.pins import PinsTooLarge, locate
from proxy.errors import RegistryError, SiblingUnreachable
from proxy.oci import Digest, Repository
from proxy.oci.references import ImageReference, InvalidReference
from proxy.server import keys
from proxy.server.operator import side_listener
from proxy.upstream.client import Upstream

log = logging.getLogger(__name__)

MIRROR: Final = web.AppKey("mirror", web.Application)
TOKEN: Final = web.AppKey("admin_token", str)
DEFAULT_TOP: Final = 10
CACHE_RESULTS: Final = ("hit", "stale", "miss", "coalesced")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@contextlib.asynccontextmanager
async def listening(mirror: web.Application) -> AsyncIterator[None]:
    """With `admin_listen`, serve the admin API while the block runs."""
    address = mirror[keys.SETTINGS].admin_listen
    if address is None:
        yield
        return
    async with side_listener(web.AppRunner(create_admin_app(mirror), access_log=None), address):
        log.info("admin API on %s:%d", *address)
        yield


def create_admin_app(mirror: web.Application) -> web.Application:
    admin = web.Application(middlewares=[_render_errors, _authenticate])
    admin[MIRROR] = mirror
    token_file = mirror[keys.SETTINGS].admin_token_file
    if token_file is not None:
        admin[TOKEN] = _read_token(token_file)
    admin.router.add_get("/stats", stats)
    admin.router.add_get("/tags", list_tags)
    admin.router.add_post("/invalidate", invalidate)
    admin.router.add_post("/evict", evict)
    admin.router.add_post("/verify", verify)
    admin.router.add_get("/pins", list_pins)
    admin.router.add_put("/pins", set_pins)
    return admin


def _read_token(path: Path) -> str:
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"admin token file {path} is empty")
    return token


@web.middleware
async def _render_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except AdminError as error:
        return _error(error.status, error.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason)


@web.middleware
async def _authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app.get(TOKEN)
    if token is not None:
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise AdminError(401, "authentication required: Authorization: Bearer <token>")
        if not hmac.compare_digest(presented.strip().encode(), token.encode()):
            raise AdminError(401, "invalid token")
    return await handler(request)


def _error(status: int, message: str) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="registry-proxy admin"'} if status == 401 else {}
    return web.json_response({"error": message}, status=status, headers=headers)


# --- handlers: parse, call the store / tag cache / pins, shape JSON


async def stats(request: web.Request) -> web.Response:
    mirror = request.app[MIRROR]
    top = _int_query(request, "top", DEFAULT_TOP)
    answers = await _everywhere(mirror, "stats", {"top": top})
    pins = mirror[keys.PINS]
    lookups = {result: sum(a["lookups"][result] for a in answers) for result in CACHE_RESULTS}
    answered = sum(lookups.values())
    cached = lookups["hit"] + lookups["stale"]
    return web.json_response(
        {
            **{field: sum(a[field] for a in answers) for field in STORE_FIGURES},
            "pinned": {"images": len(pins.references), "bytes": pins.pinned_bytes},
            "lookups": lookups,
            "hit_ratio": round(cached / answered, 4) if answered else None,
            "top_repositories": _top(answers, top),
            # What each configured upstream's rate-limit headers said (proxy.upstream.quota).
            "quota": {
                upstream.name: upstream.quota.snapshot()
                for upstream in mirror[keys.UPSTREAMS].configured
            },
        }
    )


async def list_tags(request: web.Request) -> web.Response:
    mirror = request.app[MIRROR]
    upstream, repository = _repository(mirror, request.query.get("repository", ""))
    tags = mirror[keys.TAGS]
    store = mirror[keys.STORE]
    now = time.time()
    rows = []
    for tag in sorted(await tags.tags(upstream.name, repository.name)):
        for resolution in await tags.resolutions(upstream.name, repository.name, tag):
            ttl = mirror[keys.SETTINGS].tag_ttl_for(upstream.settings, tag)
            age = now - resolution.checked
            rows.append(
                {
                    "tag": tag,
                    "digest": resolution.digest,
                    "media_type": resolution.media_type,
                    "checked": resolution.checked or None,  # None: invalidated
                    "age_seconds": round(age, 1) if resolution.checked else None,
                    "fresh": age < ttl,
                    "cached": Digest.parse(resolution.digest) in store,
                }
            )
    return web.json_response(
        {"upstream": upstream.name, "repository": repository.name, "tags": rows}
    )


async def invalidate(request: web.Request) -> web.Response:
    mirror = request.app[MIRROR]
    body = await _json_body(request)
    upstream, repository = _repository(mirror, str(body.get("repository", "")))
    tag = body.get("tag")
    if tag is not None and not isinstance(tag, str):
        raise AdminError(400, "tag must be a string")
    answers = await _everywhere(
        mirror, "invalidate", {"upstream": upstream.name, "repository": repository.name, "tag": tag}
    )
    # Workers sharing Redis each find the same tags: the most any of them found, not the sum.
    count = max(answer["invalidated"] for answer in answers)
    return web.json_response(
        {"upstream": upstream.name, "repository": repository.name, "tag": tag, "invalidated": count}
    )


async def evict(request: web.Request) -> web.Response:
    mirror = request.app[MIRROR]
    body = await _json_body(request)
    try:
        digest = Digest.parse(str(body.get("digest", "")))
    except RegistryError as exc:
        raise AdminError(400, exc.message) from None
    answers = await _everywhere(mirror, "evict", {"digest": str(digest)})
    outcomes = {answer["outcome"] for answer in answers}
    if "pinned" in outcomes:
        raise AdminError(409, f"{digest} is pinned; remove its image from the pins first")
    if "evicted" not in outcomes:
        raise AdminError(404, f"{digest} is not in the cache")
    return web.json_response({"digest": str(digest), "evicted": True})


async def verify(request: web.Request) -> web.Response:
    started = time.monotonic()
    answers = await _everywhere(request.app[MIRROR], "verify", {})
    return web.json_response(
        {
            "checked": sum(answer["checked"] for answer in answers),
            "corrupt": [digest for answer in answers for digest in answer["corrupt"]],
            "seconds": round(time.monotonic() - started, 3),
        }
    )


async def list_pins(request: web.Request) -> web.Response:
    return _pins_response(request.app[MIRROR])


async def set_pins(request: web.Request) -> web.Response:
    mirror = request.app[MIRROR]
    body = await _json_body(request)
    texts = body.get("references")
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        raise AdminError(400, 'expected {"references": ["image:tag", ...]}')
    try:
        references = tuple(dict.fromkeys(ImageReference.parse(text) for text in texts))
    except InvalidReference as exc:
        raise AdminError(400, str(exc)) from None
    previous = [str(reference) for reference in mirror[keys.PINS].references]
    answers = await _everywhere(mirror, "pins", {"references": [str(r) for r in references]})
    if refusals := [answer["refused"] for answer in answers if "refused" in answer]:
        if len(refusals) < len(answers):
            # Each worker holds its share of the pinned blobs in its share of the budget: one
            # refused, so those that took them go back, and every worker keeps the same pins.
            await _everywhere(mirror, "pins", {"references": previous})
        raise AdminError(422, f"pins refused: {refusals[0]}")
    return _pins_response(mirror)


def _pins_response(mirror: web.Application) -> web.Response:
    pins = mirror[keys.PINS]
    budget = mirror[keys.STORE].budget
    return web.json_response(
        {"budget": budget, "pinned_bytes": pins.pinned_bytes, "pins": pins.status()}
    )


# --- what is done in each worker (`HERE`): JSON in, JSON out


Operation = Callable[[web.Application, dict[str, Any]], Awaitable[dict[str, Any]]]
# The cache figures of `stats` that add up over workers.
STORE_FIGURES: Final = ("size", "budget", "reserved", "entries")


async def _everywhere(
    mirror: web.Application, operation: str, payload: dict[str, Any]
) -> list[dict[str, Any]]:
    """`operation`'s answer here, then every other worker's (with several workers)."""
    answers = [await HERE[operation](mirror, payload)]
    if (siblings := mirror.get(keys.SIBLINGS)) is not None:
        try:
            answers += await siblings.run(operation, payload)
        except SiblingUnreachable as exc:
            raise AdminError(503, f"{operation}: {exc}; the other workers did their part") from None
    return answers


async def stats_here(mirror: web.Application, payload: dict[str, Any]) -> dict[str, Any]:
    store = mirror[keys.STORE].stats()
    return {
        **{field: getattr(store, field) for field in STORE_FIGURES},
        "lookups": _cache_lookups(mirror),
        "top": [
            [name, served.bytes, served.requests]
            for name, served in mirror[keys.TRAFFIC].top(int(payload["top"]))
        ],
    }


async def invalidate_here(mirror: web.Application, payload: dict[str, Any]) -> dict[str, Any]:
    tags = mirror[keys.TAGS]
    count = await tags.invalidate(payload["upstream"], payload["repository"], payload["tag"])
    return {"invalidated": count}


async def evict_here(mirror: web.Application, payload: dict[str, Any]) -> dict[str, Any]:
    digest = Digest.parse(payload["digest"])
    store = mirror[keys.STORE]
    if digest in store.pinned:
        return {"outcome": "pinned"}
    evicted = store.evict(digest)  # only by the worker that owns it
    # Nor served from memory by any worker: eviction is how content is taken out of the mirror.
    mirror[keys.MANIFESTS].memo.forget(digest)
    mirror[keys.PREPARED].forget(digest)
    return {"outcome": "evicted" if evicted else "absent"}


async def verify_here(mirror: web.Application, payload: dict[str, Any]) -> dict[str, Any]:
    store = mirror[keys.STORE]
    checked = store.stats().entries
    corrupt = await store.verify()
    return {"checked": checked, "corrupt": [str(digest) for digest in corrupt]}


async def pins_here(mirror: web.Application, payload: dict[str, Any]) -> dict[str, Any]:
    references = tuple(ImageReference.parse(text) for text in payload["references"])
    try:
        await mirror[keys.PINS].apply(references)
    except PinsTooLarge as exc:
        return {"refused": str(exc)}
    return {}


HERE: Final[dict[str, Operation]] = {
    "stats": stats_here,
    "invalidate": invalidate_here,
    "evict": evict_here,
    "verify": verify_here,
    "pins": pins_here,
}


def _top(answers: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The repositories that were served the most bytes, over every worker."""
    totals: dict[str, list[int]] = {}
    for answer in answers:
        for name, served, requests in answer["top"]:
            total = totals.setdefault(name, [0, 0])
            total[0] += served
            total[1] += requests
    ranked = sorted(totals.items(), key=lambda item: item[1][0], reverse=True)[:limit]
    return [
        {"repository": name, "bytes": served, "requests": requests}
        for name, (served, requests) in ranked
    ]


# --- parsing helpers


def _repository(mirror: web.Application, text: str) -> tuple[Upstream, Repository]:
    try:
        return locate(mirror[keys.UPSTREAMS], ImageReference.parse_repository(text))
    except InvalidReference as exc:
        raise AdminError(400, str(exc)) from None
    except RegistryError as exc:
        raise AdminError(404, exc.message) from None


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json() if request.can_read_body else {}
    except json.JSONDecodeError:
        raise AdminError(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise AdminError(400, "the body must be a JSON object")
    return body


def _int_query(request: web.Request, name: str, default: int) -> int:
    text = request.query.get(name, str(default))
    if not text.isdigit():
        raise AdminError(400, f"{name} must be a whole number")
    return int(text)


def _cache_lookups(mirror: web.Application) -> dict[str, int]:
    """Cache lookups by result (blobs, manifests and tags together) from the metrics."""
    lookups = dict.fromkeys(CACHE_RESULTS, 0)
    for metric in mirror[keys.METRICS].cache_requests.collect():
        for sample in metric.samples:
            result = sample.labels.get("result", "")
            if sample.name.endswith("_total") and result in lookups:
                lookups[result] += int(sample.value)
    return lookups
