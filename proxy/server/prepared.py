"""Prepared answers: a manifest hit answered again without doing the work again.

On a mirror where anyone may pull anything (no access rules or logins, no upstream passing
client credentials), a manifest GET or HEAD the cache answered fresh (HIT) gets the same
response for the same request line and Accept lines: by digest for good, by tag until the tag
is due for revalidation or the tag cache changes (`ManifestAnswer.fresh_until`, `generation`).
A node pool pulling one image asks for the same tag thousands of times a second; each repeat
then costs a dictionary lookup instead of routing, parsing, the tag cache and header building.
With access control, every request goes the whole way: who asks matters there.

Each entry also keeps its response as it goes on the wire (`Prepared.wire`), so the connection
handler (`proxy.server.runner`) can answer a repeat before aiohttp routes it or builds a response
(`proxy.server.repeats`).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import TYPE_CHECKING, Final

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from proxy.cache.manifests import ManifestAnswer
from proxy.cache.tags import TagCache
from proxy.oci import CacheResult, Digest, ManifestPath, Repository
from proxy.server.access import ANONYMOUS
from proxy.server.keys import Notes
from proxy.upstream.client import Upstream
from proxy.upstream.routing import Upstreams

if TYPE_CHECKING:
    from proxy.cache.prefetch import Prefetcher

# Keys come from clients: a bounded table of bounded keys (past either, nothing is kept).
MAX_ENTRIES: Final = 4096
MAX_KEY_LENGTH: Final = 2048

Key = tuple[str, str, frozenset[str]]
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Prepared:
    """A response to repeat, and what the access log, metrics and prefetch need to know."""

    answer: ManifestAnswer  # a HIT, with how long it holds
    headers: dict[str, str]
    upstream: Upstream
    repository: Repository
    kind: str  # "tag" or "manifest", as the cache metrics count it
    # The HTTP/1.1 response up to its Date value, and what follows it (headers as aiohttp
    # orders them: the handler's, Content-Length, Date, Server, then the protocol's).
    before_date: bytes = field(repr=False)
    after_date: bytes = field(repr=False)

    def wire(self, date: bytes) -> bytes:
        return b"".join((self.before_date, date, self.after_date))

    @property
    def repository_key(self) -> str:
        return f"{self.upstream.name}/{self.repository.name}"

    def replay(self, noted: Notes, prefetch: Prefetcher) -> None:
        """What the first hit did besides answering: note it, and tell prefetch."""
        noted.route = ManifestPath.endpoint
        noted.cache_kind = self.kind
        noted.cache_result = CacheResult.HIT
        noted.upstream = self.upstream.name
        noted.repository = self.repository_key
        noted.identity = ANONYMOUS
        answer = self.answer
        if answer.body is not None:
            prefetch.image_served(self.upstream, self.repository, answer.digest, answer.body)

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

    def forget(self, digest: Digest) -> None:
        """Drop every answer that is `digest` (evicted by an operator)."""
        for key in [key for key, entry in self._entries.items() if entry.answer.digest == digest]:
            del self._entries[key]

    def get(self, request: web.BaseRequest) -> Prepared | None:
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
        protocol_headers: dict[str, str],
    ) -> None:
        """Remember a response for repeats, if it may be repeated; `protocol_headers` are those
        every response gets (`proxy.server.routes.protocol_headers`)."""
        if not self.enabled or answer.cache is not CacheResult.HIT or answer.fresh_until <= 0:
            return
        # An upstream made up on demand may be closed when idle, and repeats would not count
        # as its use.
        key = _key(request)
        if key is None or not self.upstreams.is_configured(upstream):
            return
        values = (*headers.values(), *protocol_headers.values())
        if any(_CONTROL.search(value) for value in values):  # aiohttp would refuse to send it
            return
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        length = answer.size if answer.body is None else len(answer.body)
        before = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        after = "".join(f"{name}: {value}\r\n" for name, value in protocol_headers.items())
        self._entries[key] = Prepared(
            answer,
            headers,
            upstream,
            repository,
            kind,
            f"HTTP/1.1 200 OK\r\n{before}Content-Length: {length}\r\nDate: ".encode(),
            f"\r\nServer: {SERVER_SOFTWARE}\r\n{after}\r\n".encode() + (answer.body or b""),
        )


class HttpDate:
    """The Date header's value, made once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second, self._value = now, formatdate(now, usegmt=True).encode()
        return self._value


def _key(request: web.BaseRequest) -> Key | None:
    if "If-None-Match" in request.headers:  # answered 304 or 200 by its value: not a repeat
        return None
    # dockerd sends its Accept lines in a new order each time (a Go map); the answer depends on
    # the set of media types only.
    accept = frozenset(request.headers.getall("Accept", ()))
    path = request.raw_path  # with its query: `ns` picks the upstream
    if len(path) + sum(map(len, accept)) > MAX_KEY_LENGTH:
        return None
    return request.method, path, accept
