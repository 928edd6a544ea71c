"""Manifests: by digest from the content store (immutable), by tag through a resolution cache.

Manifests are content-addressed like blobs, so they live in the same store; their media type
is read back from the bytes (`oci.manifest_media_type`), never from a side file that could
disagree with them.

A tag request, in order:

1. a fresh resolution (younger than the tag's TTL) whose manifest is in the store: served
   without contacting the upstream (HIT);
2. otherwise one revalidation per tag and set of manifest types at a time, shared by every
   concurrent request: a HEAD (Docker Hub does not count HEADs as pulls), and a GET only when
   the digest moved (MISS);
3. the upstream failing (unreachable, timing out, 5xx, 429, circuit open) or answering slower
   than `revalidate_timeout`: the last resolution, however old, is served (STALE), whichever
   client's Accept first resolved it (`tags.TagAnswers`); a slow revalidation goes on in the
   background, bounded by the upstream's `response_timeout`;
4. a 404 is remembered for `negative_ttl`, for the set of manifest types it answered
   (`tags.Misses`), so a herd asking for a missing tag costs one call;
5. while the upstream's quota is low or it answered 429 (`proxy.upstream.quota`), a cached
   resolution is served as in 3. without asking it (STALE); new tags still go upstream.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from proxy.cache.store import BlobStore
from proxy.cache.tag_answers import Resolution
from proxy.cache.tags import TagCache
from proxy.config import Settings
from proxy.errors import ErrorCode, RegistryError, UpstreamError, UpstreamRefused
from proxy.oci import (
    CacheResult,
    Digest,
    MediaType,
    Repository,
    Tag,
    accepted_media_types,
    manifest_media_type,
    manifest_types,
)
from proxy.upstream.client import Upstream

# What we ask the upstream for when the client names nothing: every manifest type we know.
ALL_MANIFEST_TYPES = sorted(MediaType.MANIFESTS)


@dataclass(frozen=True, slots=True)
class ManifestAnswer:
    media_type: str
    digest: Digest
    size: int
    body: bytes | None  # None answers a HEAD
    cache: CacheResult
    # Until when (time.time()) the same request gets the same answer, as long as the tag cache
    # has not changed since `generation`; 0: not to be reused (proxy.server.prepared).
    fresh_until: float = 0.0
    generation: int | None = None


class ManifestService:
    def __init__(self, store: BlobStore, tags: TagCache, settings: Settings) -> None:
        self.store = store
        self.tags = tags
        self.settings = settings
        self._resolving: dict[str, asyncio.Future[tuple[Resolution, CacheResult]]] = {}
        self.memo = ManifestMemo()

    async def by_digest(
        self, upstream: Upstream, repository: Repository, digest: Digest, *, head: bool
    ) -> ManifestAnswer:
        body, media_type, result = await self._manifest_bytes(upstream, repository, digest)
        assert body is not None
        # Bytes by digest never change: a hit is the answer for good.
        until = math.inf if result is CacheResult.HIT else 0.0
        return ManifestAnswer(
            media_type, digest, len(body), None if head else body, result, fresh_until=until
        )

    async def _manifest_bytes(
        self,
        upstream: Upstream,
        repository: Repository,
        digest: Digest,
        *,
        from_upstream: bool = True,
    ) -> tuple[bytes | None, str, CacheResult]:
        """A manifest's bytes by digest, nearest first: memory, disk, the replicas' shared
        cache, then (unless told not to) the upstream. Bytes by digest never change."""
        remembered = self.memo.get(digest)
        if remembered is not None:
            return remembered[0], remembered[1], CacheResult.HIT
        body = self.store.read_small(digest)
        if body is None and (body := await self.tags.get_manifest(digest)) is not None:
            self.store.put_small(digest, body)
        if body is not None:
            media_type = manifest_media_type(body)
            self.memo.put(digest, body, media_type)
            return body, media_type, CacheResult.HIT
        if not from_upstream:
            return None, "", CacheResult.STALE
        manifest = await upstream.get_manifest(repository, digest, ALL_MANIFEST_TYPES)
        self.store.put_small(manifest.digest, manifest.body)
        await self.tags.put_manifest(manifest.digest, manifest.body)
        media_type = manifest_media_type(manifest.body)
        self.memo.put(digest, manifest.body, media_type)
        return manifest.body, media_type, CacheResult.MISS

    async def by_tag(
        self,
        upstream: Upstream,
        repository: Repository,
        tag: Tag,
        accept_lines: list[str],
        *,
        head: bool,
    ) -> ManifestAnswer:
        types = manifest_types(accepted_media_types(accept_lines))
        if not types:
            raise RegistryError(
                ErrorCode.MANIFEST_UNKNOWN, "the Accept header admits no manifest media type"
            )
        names = (upstream.name, repository.name, tag.name)
        generation = self.tags.generation  # what follows is read from this state of the cache
        if await self.tags.is_missing(*names, types):
            raise RegistryError(ErrorCode.MANIFEST_UNKNOWN, f"manifest unknown upstream ({tag})")
        answers = await self.tags.answers(*names)
        known = answers.choose(types)
        ttl = self.settings.tag_ttl_for(upstream.settings, tag.name)
        now = time.time()
        fresh = known is not None and now - known.checked < ttl
        # With the upstream's quota low (proxy.upstream.quota), a cached tag is served as it is
        # (STALE) rather than spend a request on its freshness.
        if known is not None and (fresh or upstream.quota.saving):
            result = CacheResult.HIT if fresh else CacheResult.STALE
            answer = await self._from_resolution(upstream, repository, known, head, result)
            if answer is not None and fresh:
                until = min(known.checked + ttl, now + self.tags.local_seconds)
                return replace(answer, fresh_until=until, generation=generation)
            if answer is not None:
                return answer

        async def resolve() -> tuple[Resolution, CacheResult]:
            cheap_first = head or bool(answers)
            return await self._resolve(upstream, repository, tag, types, known, cheap_first)

        key = f"{upstream.name}/{repository.name}:{tag.name}#{','.join(sorted(types))}"
        pending, joined = self._single_flight(key, resolve)
        try:
            # With an answer to fall back on, a slow upstream is no reason to make clients
            # wait; the revalidation carries on (bounded by the upstream's response timeout)
            # and its answer is there for the next request.
            timeout = self.settings.revalidate_timeout if known is not None else None
            resolution, result = await asyncio.wait_for(asyncio.shield(pending), timeout)
        except TimeoutError:
            assert known is not None
            resolution, result = known, CacheResult.STALE
        if joined and result == CacheResult.MISS:
            result = CacheResult.COALESCED
        answer = await self._from_resolution(upstream, repository, resolution, head, result)
        if answer is None:
            raise RegistryError(
                ErrorCode.UNAVAILABLE,
                f"upstream {upstream.name} unavailable and manifest not cached",
            )
        return answer

    async def _resolve(
        self,
        upstream: Upstream,
        repository: Repository,
        tag: Tag,
        types: frozenset[str],
        known: Resolution | None,
        cheap_first: bool,
    ) -> tuple[Resolution, CacheResult]:
        """Ask the upstream; `cheap_first`: by HEAD first, which Docker Hub does not count as a
        pull (worth it when a manifest of this tag is likely cached, or the client asked HEAD)."""
        names = (upstream.name, repository.name, tag.name)
        try:
            found = (
                await upstream.head_manifest(repository, tag, sorted(types))
                if cheap_first
                else None
            )
            if found is not None and found.media_type in types:
                if known is not None and found.digest == Digest.parse(known.digest):
                    resolution = replace(known, checked=time.time())
                    await self.tags.put(*names, types, resolution)
                    return resolution, CacheResult.HIT
                if found.digest in self.store:
                    resolution = Resolution(
                        str(found.digest), found.media_type, found.size, time.time()
                    )
                    await self.tags.put(*names, types, resolution)
                    return resolution, CacheResult.MISS
            manifest = await upstream.get_manifest(repository, tag, sorted(types))
        except UpstreamRefused as refused:
            if refused.code is ErrorCode.MANIFEST_UNKNOWN:
                await self.tags.refused(*names, types)
            raise
        except UpstreamError:
            if known is not None:
                return known, CacheResult.STALE
            raise
        media_type = manifest.media_type
        if media_type not in MediaType.MANIFESTS:  # e.g. a registry answering application/json
            media_type = manifest_media_type(manifest.body)
        if media_type not in types:
            await self.tags.refused(*names, types)
            raise RegistryError(
                ErrorCode.MANIFEST_UNKNOWN,
                f"upstream offers {media_type}, which the client does not accept",
            )
        self.store.put_small(manifest.digest, manifest.body)
        await self.tags.put_manifest(manifest.digest, manifest.body)
        resolution = Resolution(str(manifest.digest), media_type, len(manifest.body), time.time())
        await self.tags.put(*names, types, resolution)
        return resolution, CacheResult.MISS

    async def _from_resolution(
        self,
        upstream: Upstream,
        repository: Repository,
        resolution: Resolution,
        head: bool,
        result: CacheResult,
    ) -> ManifestAnswer | None:
        digest = Digest.parse(resolution.digest)
        if head:
            return ManifestAnswer(resolution.media_type, digest, resolution.size, None, result)
        # Resolved by a HEAD, or evicted since, the bytes come by digest; not while stale.
        body, _, _ = await self._manifest_bytes(
            upstream, repository, digest, from_upstream=result != CacheResult.STALE
        )
        if body is None:
            return None
        return ManifestAnswer(resolution.media_type, digest, len(body), body, result)

    def _single_flight(
        self, key: str, work: Callable[[], Awaitable[tuple[Resolution, CacheResult]]]
    ) -> tuple[asyncio.Future[tuple[Resolution, CacheResult]], bool]:
        """The resolution in flight for `key`, started if there is none; and whether it was
        already running (its other waiters then share one upstream request)."""
        pending = self._resolving.get(key)
        if pending is not None:
            return pending, True
        future: asyncio.Future[tuple[Resolution, CacheResult]] = asyncio.ensure_future(work())
        self._resolving[key] = future

        def done(finished: asyncio.Future[tuple[Resolution, CacheResult]]) -> None:
            if self._resolving.get(key) is finished:
                del self._resolving[key]
            if not finished.cancelled():
                finished.exception()  # retrieved: every waiter may have given up on it

        future.add_done_callback(done)
        return future, False

    async def settled(self) -> None:
        """Wait for every resolution in flight, including those all clients gave up on."""
        await asyncio.gather(*list(self._resolving.values()), return_exceptions=True)

    async def close(self) -> None:
        pending = list(self._resolving.values())
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


class ManifestMemo:
    """The hottest manifests in memory: a hit then costs no file read and no JSON parse.

    Only verified bytes come in (from the store, which verifies, or checked by digest), and the
    total is capped, so this is a bounded copy of what the store already holds.
    """

    def __init__(self, max_bytes: int = 32 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[Digest, tuple[bytes, str]] = OrderedDict()

    def get(self, digest: Digest) -> tuple[bytes, str] | None:
        entry = self._entries.get(digest)
        if entry is not None:
            self._entries.move_to_end(digest)
        return entry

    def put(self, digest: Digest, body: bytes, media_type: str) -> None:
        if digest in self._entries or len(body) > self.max_bytes:
            return
        self._entries[digest] = (body, media_type)
        self.size += len(body)
        while self.size > self.max_bytes:
            _, (evicted, _) = self._entries.popitem(last=False)
            self.size -= len(evicted)

    def forget(self, digest: Digest) -> None:
        entry = self._entries.pop(digest, None)
        if entry is not None:
            self.size -= len(entry[0])
