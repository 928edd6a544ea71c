"""Typed keys for what the application owns (aiohttp `AppKey`s) and what a handler notes on a
request for the access log and metrics (`RequestKey`s): every key, in one place.

The services are imported for the type checker only, so any module may import these keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from aiohttp import web

if TYPE_CHECKING:
    from proxy.cache.manifests import ManifestService
    from proxy.cache.pins import PinResolver
    from proxy.cache.prefetch import Prefetcher
    from proxy.cache.provenance import Provenance
    from proxy.cache.store import BlobStore
    from proxy.cache.tags import TagCache
    from proxy.config import Settings
    from proxy.metrics import Metrics
    from proxy.oci import CacheResult
    from proxy.server.access import AccessControl
    from proxy.server.blobs import BlobServing
    from proxy.server.guard import ProvenanceGuard
    from proxy.server.health import HealthMonitor
    from proxy.server.passthrough import UpstreamAccessCheck
    from proxy.server.prepared import PreparedAnswers
    from proxy.server.traffic import RepositoryTraffic
    from proxy.upstream.routing import Upstreams
    from proxy.workers.siblings import Siblings

# --- the application's services (set by `proxy.app.create_app`)
SETTINGS: Final[web.AppKey[Settings]] = web.AppKey("settings")
UPSTREAMS: Final[web.AppKey[Upstreams]] = web.AppKey("upstreams")
STORE: Final[web.AppKey[BlobStore]] = web.AppKey("store")
TAGS: Final[web.AppKey[TagCache]] = web.AppKey("tags")
BLOBS: Final[web.AppKey[BlobServing]] = web.AppKey("blobs")
MANIFESTS: Final[web.AppKey[ManifestService]] = web.AppKey("manifests")
ACCESS: Final[web.AppKey[AccessControl]] = web.AppKey("access")
PASSTHROUGH: Final[web.AppKey[UpstreamAccessCheck]] = web.AppKey("passthrough")
PROVENANCE: Final[web.AppKey[Provenance]] = web.AppKey("provenance")
GUARD: Final[web.AppKey[ProvenanceGuard]] = web.AppKey("guard")
METRICS: Final[web.AppKey[Metrics]] = web.AppKey("metrics")
HEALTH: Final[web.AppKey[HealthMonitor]] = web.AppKey("health")
PINS: Final[web.AppKey[PinResolver]] = web.AppKey("pins")
TRAFFIC: Final[web.AppKey[RepositoryTraffic]] = web.AppKey("repository_traffic")
PREFETCH: Final[web.AppKey[Prefetcher]] = web.AppKey("prefetch")
PREPARED: Final[web.AppKey[PreparedAnswers]] = web.AppKey("prepared")
# With several workers: the others, for the admin API and prefetch (proxy.workers.siblings).
SIBLINGS: Final[web.AppKey[Siblings]] = web.AppKey("siblings")


# --- what a request was (noted by handlers, read by the observe middleware)


@dataclass(slots=True)
class Notes:
    """What a request turned out to be, for its access log line and metrics: one object per
    request, so the observe middleware reads attributes rather than a dozen request keys."""

    route: str = "other"  # ping | manifest | blob | tags | referrers | metrics | ...
    cache_kind: str | None = None  # blob | manifest | tag
    # How the cache answered (hit, miss, ...): a value the handler sets, never a header read back.
    cache_result: CacheResult | None = None
    upstream: str | None = None
    repository: str | None = None  # upstream/name, for the admin API's top repositories
    identity: str | None = None  # who authenticated, or "anonymous"
    bytes_sent: int | None = None  # set by handlers that stream: sendfile bypasses aiohttp
    # Why a body was cut short after its status line went out: client | upstream | mirror.
    aborted: str | None = None


NOTES: Final = web.RequestKey("notes", Notes)


def notes(request: web.BaseRequest) -> Notes:
    """The request's notes (the observe middleware makes them first; made here otherwise)."""
    try:
        return request[NOTES]
    except KeyError:
        made = request[NOTES] = Notes()
        return made
