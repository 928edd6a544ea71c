"""Tag resolutions: which digest a tag meant, when we last checked, shared through aiocache.

A resolution is kept for `stale_ttl` (days), far longer than it is fresh (`tag_ttl_for`,
minutes): freshness decides when to revalidate, the long lifetime is what lets the mirror
answer while the upstream is down. With Redis as the backend every replica sees the same
resolutions, so the upstream sees one revalidation per TTL, not one per replica.

Entries in the backend (JSON)::

    tag:<upstream>/<repository>:<tag>      {media type: resolution}      at most one per type
    repo:<upstream>/<repository>           [tag, ...]                    the tags ever resolved
    missing:<upstream>/<repository>:<tag>  [{types, until}, ...]         upstream 404s, briefly
    manifest:<digest>                      base64 body                   only on a shared backend

What a tag resolves to, per set of manifest types a client admits, and which 404s stand are
values of `proxy.cache.tag_answers`; this module stores them.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import time
from collections.abc import Callable
from typing import Any, ClassVar

from aiocache import Cache
from aiocache.serializers import JsonSerializer

from proxy.cache.tag_answers import Misses, Resolution, TagAnswers
from proxy.config import Settings
from proxy.oci import Digest

log = logging.getLogger(__name__)


def _tag_list(value: Any) -> list[str]:
    return [str(tag) for tag in value] if isinstance(value, list) else []


class TagCache:
    """A thin, failure-tolerant layer over an aiocache backend, with decoded entries in front.

    A broken backend (Redis down) must not fail pulls: every error is logged and treated as
    a cache miss, and the mirror keeps answering from the upstream.

    A tag hit reads two entries (its 404s and its answers). Through aiocache each read costs a
    task, a timeout, its plugins and a JSON decode: most of a hit's time. So every entry read or
    written here is also kept decoded in this process, absent ones too. With the in-process
    backend that copy is exact, every write passing through here; with a shared one (Redis) it
    is trusted for `SHARED_LOCAL_SECONDS`, so what another replica writes shows that much later.
    """

    SHARED_LOCAL_SECONDS: ClassVar[float] = 1.0
    # Entries kept decoded, at most (keys come from client requests); past it the copy starts
    # over, it is only a copy.
    LOCAL_MAX: ClassVar[int] = 100_000

    def __init__(
        self, backend: Any, *, stale_ttl: float, negative_ttl: float, shared: bool = False
    ) -> None:
        self.backend = backend
        self.stale_ttl = stale_ttl
        self.negative_ttl = negative_ttl
        self.local_seconds = self.SHARED_LOCAL_SECONDS if shared else math.inf
        self._local: dict[str, tuple[float, Any]] = {}  # key -> (until, decoded value)
        # Counts this process's writes: an answer read at one generation holds while it lasts.
        self.generation = 0
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

    async def answers(self, upstream: str, repository: str, tag: str) -> TagAnswers:
        key = f"tag:{upstream}/{repository}:{tag}"
        answers: TagAnswers = await self._read(key, TagAnswers.from_json)
        return answers

    async def get(
        self, upstream: str, repository: str, tag: str, types: frozenset[str]
    ) -> Resolution | None:
        """The cached answer for a client admitting these manifest types, fresh or not."""
        return (await self.answers(upstream, repository, tag)).choose(types)

    async def put(
        self,
        upstream: str,
        repository: str,
        tag: str,
        types: frozenset[str],
        resolution: Resolution,
    ) -> None:
        answers = await self.answers(upstream, repository, tag)
        new_tag = not answers
        answers = answers.record(types, resolution)
        await self._store(upstream, repository, tag, answers)
        await self._drop_contradicted_misses(upstream, repository, tag, answers)
        if new_tag:
            tags = await self.tags(upstream, repository)
            if tag not in tags:
                key, value = f"repo:{upstream}/{repository}", [*tags, tag]
                await self._write(key, value, value, self.stale_ttl)

    async def refused(
        self, upstream: str, repository: str, tag: str, types: frozenset[str]
    ) -> None:
        """The upstream has no manifest for this tag that `types` admits (a 404)."""
        answers = (await self.answers(upstream, repository, tag)).refused(types)
        if answers:
            await self._store(upstream, repository, tag, answers)
        else:
            await self.forget(upstream, repository, tag)
        await self.put_missing(upstream, repository, tag, types)

    async def tags(self, upstream: str, repository: str) -> list[str]:
        """Tags of a repository that were ever resolved here (and not yet expired)."""
        tags: list[str] = await self._read(f"repo:{upstream}/{repository}", _tag_list)
        return tags

    async def resolutions(self, upstream: str, repository: str, tag: str) -> list[Resolution]:
        return list(await self.answers(upstream, repository, tag))

    async def invalidate(self, upstream: str, repository: str, tag: str | None = None) -> int:
        """Make resolutions stale so the next pull revalidates; returns how many tags."""
        tags = [tag] if tag is not None else await self.tags(upstream, repository)
        count = 0
        for name in tags:
            answers = await self.answers(upstream, repository, name)
            if answers:
                await self._store(upstream, repository, name, answers.invalidated())
                count += 1
        return count

    async def forget(self, upstream: str, repository: str, tag: str) -> None:
        await self._drop(f"tag:{upstream}/{repository}:{tag}")

    async def _drop_contradicted_misses(
        self, upstream: str, repository: str, tag: str, answers: TagAnswers
    ) -> None:
        """A 404 remembered for a set that now has an answer is over; others stand."""
        key = f"missing:{upstream}/{repository}:{tag}"
        misses: Misses = await self._read(key, Misses.from_json)
        if not misses:
            return
        standing = misses.without(lambda types: answers.choose(types) is not None)
        if not standing:
            await self._drop(key)
        elif len(standing) != len(misses):
            ttl = max(math.ceil(max(until for _, until in standing.entries) - time.time()), 1)
            await self._write(key, standing.to_json(), standing, ttl)

    async def is_missing(
        self, upstream: str, repository: str, tag: str, types: frozenset[str]
    ) -> bool:
        key = f"missing:{upstream}/{repository}:{tag}"
        misses: Misses = await self._read(key, Misses.from_json)
        return bool(misses) and misses.covers(types, now=time.time())

    async def put_missing(
        self, upstream: str, repository: str, tag: str, types: frozenset[str]
    ) -> None:
        if self.negative_ttl <= 0:
            return
        key = f"missing:{upstream}/{repository}:{tag}"
        now = time.time()
        misses: Misses = await self._read(key, Misses.from_json)
        misses = misses.add(types, until=now + self.negative_ttl, now=now)
        await self._write(key, misses.to_json(), misses, max(math.ceil(self.negative_ttl), 1))

    async def close(self) -> None:
        await self._call("close")

    async def _store(self, upstream: str, repository: str, tag: str, answers: TagAnswers) -> None:
        key = f"tag:{upstream}/{repository}:{tag}"
        await self._write(key, answers.to_json(), answers, self.stale_ttl)

    async def _read(self, key: str, decode: Callable[[Any], Any]) -> Any:
        now = time.monotonic()
        entry = self._local.get(key)
        if entry is not None and entry[0] > now:
            return entry[1]
        value = decode(await self._call("get", key))
        # Absent ones too: most tags have no remembered 404, read on every hit.
        self._keep(key, value, now + self.local_seconds)
        return value

    async def _write(self, key: str, value: Any, decoded: Any, ttl: float) -> None:
        self.generation += 1
        self._keep(key, decoded, time.monotonic() + min(ttl, self.local_seconds))
        await self._call("set", key, value, ttl=int(ttl))

    async def _drop(self, key: str) -> None:
        self.generation += 1
        self._local.pop(key, None)
        await self._call("delete", key)

    def _keep(self, key: str, decoded: Any, until: float) -> None:
        if len(self._local) >= self.LOCAL_MAX:
            self._local.clear()
        self._local[key] = (until, decoded)

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await getattr(self.backend, method)(*args, **kwargs)
        except Exception as exc:
            log.warning("tag cache %s failed, carrying on without it: %s", method, exc)
            return None
