"""Tag resolutions: which digest a tag meant, when we last checked, shared through aiocache.

A resolution is kept for `stale_ttl` (days), far longer than it is fresh (`tag_ttl_for`,
minutes): freshness decides when to revalidate, the long lifetime is what lets the mirror
answer while the upstream is down. With Redis as the backend every replica sees the same
resolutions, so the upstream sees one revalidation per TTL, not one per replica.

Keys include the upstream, the repository, the tag and the client's Accept set, because the
same tag means an index to one client and a single-platform manifest to another.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from typing import Any

from aiocache import Cache
from aiocache.serializers import JsonSerializer

from proxy.config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Resolution:
    digest: str
    media_type: str
    size: int
    checked: float  # wall-clock time of the last upstream confirmation, shared across replicas


def resolution_key(upstream: str, repository: str, tag: str, accepted: frozenset[str]) -> str:
    accept = ",".join(sorted(accepted)) if accepted else "*"
    accept_id = hashlib.sha256(accept.encode()).hexdigest()[:16]
    return f"{upstream}/{repository}:{tag}#{accept_id}"


class TagCache:
    """A thin, failure-tolerant layer over an aiocache backend.

    A broken backend (Redis down) must not fail pulls: every error is logged and treated as
    a cache miss, and the mirror keeps answering from the upstream.
    """

    def __init__(self, backend: Any, *, stale_ttl: float, negative_ttl: float) -> None:
        self.backend = backend
        self.stale_ttl = stale_ttl
        self.negative_ttl = negative_ttl

    @classmethod
    def from_settings(cls, settings: Settings) -> TagCache:
        if settings.redis_url:
            backend = Cache.from_url(settings.redis_url)
            backend.serializer = JsonSerializer()
            backend.namespace = "registry-proxy:"
        else:
            backend = Cache(Cache.MEMORY, serializer=JsonSerializer())
        return cls(backend, stale_ttl=settings.stale_ttl, negative_ttl=settings.negative_ttl)

    async def get(self, key: str) -> Resolution | None:
        value = await self._call("get", f"tag:{key}")
        if not isinstance(value, dict):
            return None
        try:
            return Resolution(**value)
        except TypeError:
            return None

    async def put(self, key: str, resolution: Resolution) -> None:
        await self._call("set", f"tag:{key}", asdict(resolution), ttl=int(self.stale_ttl))
        await self._call("delete", f"missing:{key}")

    async def forget(self, key: str) -> None:
        await self._call("delete", f"tag:{key}")

    async def is_missing(self, key: str) -> bool:
        return bool(await self._call("exists", f"missing:{key}"))

    async def put_missing(self, key: str) -> None:
        if self.negative_ttl > 0:
            await self._call("set", f"missing:{key}", 1, ttl=max(int(self.negative_ttl), 1))

    async def close(self) -> None:
        await self._call("close")

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await getattr(self.backend, method)(*args, **kwargs)
        except Exception as exc:
            log.warning("tag cache %s failed, carrying on without it: %s", method, exc)
            return None
