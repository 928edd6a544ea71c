"""Tag resolutions: which digest a tag meant, when we last checked, shared through aiocache.

A resolution is kept for `stale_ttl` (days), far longer than it is fresh (`tag_ttl_for`,
minutes): freshness decides when to revalidate, the long lifetime is what lets the mirror
answer while the upstream is down. With Redis as the backend every replica sees the same
resolutions, so the upstream sees one revalidation per TTL, not one per replica.

Entries in the backend::

    tag:<upstream>/<repository>:<tag>      {accept-set id: resolution}   one per client Accept set
    repo:<upstream>/<repository>           [tag, ...]                    the tags ever resolved
    missing:<upstream>/<repository>:<tag>  1                             an upstream 404, briefly
    manifest:<digest>                      base64 body                   only on a shared backend

The same tag means an index to a client that accepts indexes and a single-platform manifest to
one that does not, hence one resolution per Accept set, all under one entry so that
invalidating the tag reaches every variant.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from dataclasses import asdict, dataclass, replace
from typing import Any

from aiocache import Cache
from aiocache.serializers import JsonSerializer

from proxy.config import Settings
from proxy.oci import Digest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Resolution:
    digest: str
    media_type: str
    size: int
    checked: float  # wall-clock time of the last upstream confirmation, shared across replicas


def accept_id(accepted: frozenset[str]) -> str:
    """A short stable name for an Accept set; the order clients list types in does not matter."""
    text = ",".join(sorted(accepted)) if accepted else "*"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class TagCache:
    """A thin, failure-tolerant layer over an aiocache backend.

    A broken backend (Redis down) must not fail pulls: every error is logged and treated as
    a cache miss, and the mirror keeps answering from the upstream.
    """

    def __init__(
        self, backend: Any, *, stale_ttl: float, negative_ttl: float, shared: bool = False
    ) -> None:
        self.backend = backend
        self.stale_ttl = stale_ttl
        self.negative_ttl = negative_ttl
        # A backend other replicas read too also carries manifest bodies, so a tag resolved by
        # one replica costs the others no upstream GET (Docker Hub counts GETs as pulls).
        self.shared = shared

    @classmethod
    def from_settings(cls, settings: Settings) -> TagCache:
        if settings.redis_url:
            backend = Cache.from_url(settings.redis_url)
            backend.serializer = JsonSerializer()
            backend.namespace = "registry-proxy:"
        else:
            backend = Cache(Cache.MEMORY, serializer=JsonSerializer())
        return cls(
            backend,
            stale_ttl=settings.stale_ttl,
            negative_ttl=settings.negative_ttl,
            shared=bool(settings.redis_url),
        )

    async def get_manifest(self, digest: Digest) -> bytes | None:
        """A manifest another replica stored, verified against its digest; never trusted blind."""
        if not self.shared:
            return None
        value = await self._call("get", f"manifest:{digest}")
        if not isinstance(value, str):
            return None
        try:
            body = base64.b64decode(value, validate=True)
        except binascii.Error:
            return None
        return body if Digest.of(body, digest.algorithm) == digest else None

    async def put_manifest(self, digest: Digest, body: bytes) -> None:
        if self.shared:
            encoded = base64.b64encode(body).decode("ascii")
            await self._call("set", f"manifest:{digest}", encoded, ttl=int(self.stale_ttl))

    async def get(
        self, upstream: str, repository: str, tag: str, accepted: frozenset[str]
    ) -> Resolution | None:
        variants = await self._variants(upstream, repository, tag)
        return variants.get(accept_id(accepted))

    async def put(
        self,
        upstream: str,
        repository: str,
        tag: str,
        accepted: frozenset[str],
        resolution: Resolution,
    ) -> None:
        variants = await self._variants(upstream, repository, tag)
        new_tag = not variants
        variants[accept_id(accepted)] = resolution
        await self._store(upstream, repository, tag, variants)
        await self._call("delete", f"missing:{upstream}/{repository}:{tag}")
        if new_tag:
            tags = await self.tags(upstream, repository)
            if tag not in tags:
                await self._call(
                    "set", f"repo:{upstream}/{repository}", [*tags, tag], ttl=int(self.stale_ttl)
                )

    async def tags(self, upstream: str, repository: str) -> list[str]:
        """Tags of a repository that were ever resolved here (and not yet expired)."""
        value = await self._call("get", f"repo:{upstream}/{repository}")
        return [str(tag) for tag in value] if isinstance(value, list) else []

    async def resolutions(self, upstream: str, repository: str, tag: str) -> list[Resolution]:
        return list((await self._variants(upstream, repository, tag)).values())

    async def invalidate(self, upstream: str, repository: str, tag: str | None = None) -> int:
        """Make resolutions stale so the next pull revalidates; returns how many tags."""
        tags = [tag] if tag is not None else await self.tags(upstream, repository)
        count = 0
        for name in tags:
            variants = await self._variants(upstream, repository, name)
            if variants:
                stale = {key: replace(r, checked=0.0) for key, r in variants.items()}
                await self._store(upstream, repository, name, stale)
                count += 1
        return count

    async def forget(self, upstream: str, repository: str, tag: str) -> None:
        await self._call("delete", f"tag:{upstream}/{repository}:{tag}")

    async def is_missing(self, upstream: str, repository: str, tag: str) -> bool:
        return bool(await self._call("exists", f"missing:{upstream}/{repository}:{tag}"))

    async def put_missing(self, upstream: str, repository: str, tag: str) -> None:
        if self.negative_ttl > 0:
            key = f"missing:{upstream}/{repository}:{tag}"
            await self._call("set", key, 1, ttl=max(int(self.negative_ttl), 1))

    async def close(self) -> None:
        await self._call("close")

    async def _variants(self, upstream: str, repository: str, tag: str) -> dict[str, Resolution]:
        value = await self._call("get", f"tag:{upstream}/{repository}:{tag}")
        if not isinstance(value, dict):
            return {}
        variants = {}
        for key, fields in value.items():
            try:
                variants[str(key)] = Resolution(**fields)
            except TypeError:
                continue  # written by another version; it is only a cache
        return variants

    async def _store(
        self, upstream: str, repository: str, tag: str, variants: dict[str, Resolution]
    ) -> None:
        value = {key: asdict(resolution) for key, resolution in variants.items()}
        key = f"tag:{upstream}/{repository}:{tag}"
        await self._call("set", key, value, ttl=int(self.stale_ttl))

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await getattr(self.backend, method)(*args, **kwargs)
        except Exception as exc:
            log.warning("tag cache %s failed, carrying on without it: %s", method, exc)
            return None
