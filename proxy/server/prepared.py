"""Prepared answers: a manifest hit answered again without doing the work again.

On a mirror where anyone may pull anything (no access rules or logins, no upstream passing
client credentials), a manifest GET or HEAD the cache answered fresh (HIT) gets the same
response for the same request line and Accept lines: by digest for good, by tag until the tag
is due for revalidation or the tag cache changes (`ManifestAnswer.fresh_until`, `generation`).
A node pool pulling one image asks for the same tag thousands of times a second; each repeat
then costs a dictionary lookup instead of routing, parsing, the tag cache and header building.
With access control, every request goes the whole way: who asks matters there.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from proxy.cache.manifests import ManifestAnswer
from proxy.cache.tags import TagCache
from proxy.oci import CacheResult, Repository
from proxy.upstream.client import Upstream
from proxy.upstream.routing import Upstreams

# Keys come from clients: a bounded table of bounded keys (past either, nothing is kept).
MAX_ENTRIES: Final = 4096
MAX_KEY_LENGTH: Final = 2048

Key = tuple[str, str, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A response to repeat, and what the access log, metrics and prefetch need to know."""

    answer: ManifestAnswer  # a HIT, with how long it holds
    headers: dict[str, str]
    upstream: Upstream
    repository: Repository
    kind: str  # "tag" or "manifest", as the cache metrics count it

    @property
    def repository_key(self) -> str:
        return f"{self.upstream.name}/{self.repository.name}"

    def holds(self, generation: int, now: float) -> bool:
        """Whether the answer still holds with the tag cache at `generation`, at `now`."""
        answer = self.answer
        if answer.generation is not None and answer.generation != generation:
            return False
        return answer.fresh_until == math.inf or now < answer.fresh_until


class PreparedAnswers:
    def __init__(self, tags: TagCache, upstreams: Upstreams, *, enabled: bool) -> None:
        self.tags = tags
        self.upstreams = upstreams
        self.enabled = enabled
        self._entries: dict[Key, Prepared] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, request: web.Request) -> Prepared | None:
        if not self._entries or (key := _key(request)) is None:
            return None
        entry = self._entries.get(key)
        if entry is None or entry.holds(self.tags.generation, time.time()):
            return entry
        del self._entries[key]
        return None

    def keep(
        self,
        request: web.Request,
        upstream: Upstream,
        repository: Repository,
        answer: ManifestAnswer,
        headers: dict[str, str],
        kind: str,
    ) -> None:
        """Remember a response for repeats, if it may be repeated."""
        if not self.enabled or answer.cache is not CacheResult.HIT or answer.fresh_until <= 0:
            return
        # An upstream made up on demand may be closed when idle, and repeats would not count
        # as its use.
        key = _key(request)
        if key is None or not self.upstreams.is_configured(upstream):
            return
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[key] = Prepared(answer, headers, upstream, repository, kind)


def _key(request: web.Request) -> Key | None:
    if "If-None-Match" in request.headers:  # answered 304 or 200 by its value: not a repeat
        return None
    accept = tuple(request.headers.getall("Accept", ()))
    path = request.raw_path  # with its query: `ns` picks the upstream
    if len(path) + sum(map(len, accept)) > MAX_KEY_LENGTH:
        return None
    return request.method, path, accept
