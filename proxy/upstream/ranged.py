"""One blob of one upstream repository as a download opens it: from an offset (the first
request, or a resume), or a byte range (a part of a download over several connections)."""

from __future__ import annotations

from proxy.oci import Digest, Repository
from proxy.upstream.bodies import BlobStream
from proxy.upstream.client import Upstream


class BlobOrigin:
    """`proxy.cache.download.Opener` (`open`) and `proxy.cache.fetch.RangeOrigin`."""

    def __init__(self, upstream: Upstream, repository: Repository, digest: Digest) -> None:
        self.upstream = upstream
        self.repository = repository
        self.digest = digest

    async def open(self, offset: int) -> BlobStream:
        return await self.upstream.open_blob(self.repository, self.digest, offset)

    async def open_range(self, start: int, end: int) -> BlobStream:
        return await self.upstream.open_blob(self.repository, self.digest, start, end)

    def resumed(self) -> None:
        if (metrics := self.upstream.metrics) is not None:
            metrics.upstream_resumes.labels(self.upstream.label).inc()

    def split(self, connections: int) -> None:
        if (metrics := self.upstream.metrics) is not None:
            metrics.split_downloads.labels(self.upstream.label, _CONNECTIONS[connections > 1]).inc()


_CONNECTIONS = {False: "one", True: "several"}
