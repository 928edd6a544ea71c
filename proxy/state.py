"""Typed keys for what the application owns (aiohttp's `AppKey`), one place for all of them."""

from __future__ import annotations

from aiohttp import web

from proxy.access import AccessControl
from proxy.blobs import BlobService
from proxy.blobstore import BlobStore
from proxy.config import Settings
from proxy.manifests import ManifestService
from proxy.metrics import HealthMonitor, Metrics
from proxy.passthrough import UpstreamAccessCheck
from proxy.provenance import ProvenanceGuard
from proxy.routing import Upstreams
from proxy.tags import TagCache

SETTINGS = web.AppKey("settings", Settings)
UPSTREAMS = web.AppKey("upstreams", Upstreams)
STORE = web.AppKey("store", BlobStore)
TAGS = web.AppKey("tags", TagCache)
BLOBS = web.AppKey("blobs", BlobService)
MANIFESTS = web.AppKey("manifests", ManifestService)
ACCESS = web.AppKey("access", AccessControl)
PASSTHROUGH = web.AppKey("passthrough", UpstreamAccessCheck)
GUARD = web.AppKey("guard", ProvenanceGuard)
METRICS = web.AppKey("metrics", Metrics)
HEALTH = web.AppKey("health", HealthMonitor)
