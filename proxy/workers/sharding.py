"""Several workers over one cache directory: the blobs are split between them by digest.

The owner of a digest (`owner_of`: a fixed split, so workers never race for one blob and their
budgets add up to the directory's) alone downloads it, accounts for it against its share of the
budget and evicts it. Another worker serves a complete blob straight from the shared directory,
and passes a miss to the owner over the owner's Unix socket (`<cache-dir>/run/worker-<n>.sock`),
so 50 concurrent requests for one blob spread over every worker still make one upstream
download, streamed to all of them as it lands: from the owner's download file, as the owner says
it verified (`proxy.workers.following`), or for a range through the owner.

This is a layer: `ShardedStore` is the store that claims only its own digests, and
`ShardedBlobService` decorates the blob service; `unless_relayed` keeps the observe middleware
from measuring a relay twice. Handlers, the store and the metrics below do not know how many
workers there are. Each socket is 0600, whatever the umask: a relay is trusted as coming from a
sibling worker (`is_relayed`), so no other local user may connect to one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Final

import aiohttp
from aiohttp import web
from prometheus_client import values
from yarl import URL

from proxy.cache.download import BlobSource
from proxy.cache.fetch import DEFAULT_FETCH_POLICY, FetchPolicy
from proxy.cache.layout import hashes_to
from proxy.cache.store import DEFAULT_DOWNLOAD_TIMEOUT, SMALL_LIMIT, TOUCH_INTERVAL, BlobStore
from proxy.metrics import Metrics
from proxy.oci import CacheResult, Digest, Repository
from proxy.server.blobs import BlobService, abort_transfer, send_chunk
from proxy.server.keys import notes
from proxy.server.middleware import Handler, Middleware
from proxy.upstream.client import Upstream
from proxy.workers.following import FILE_HEADER, FOLLOW_HEADER, Feed, follow, open_followed
from proxy.workers.supervisor import Worker

log = logging.getLogger(__name__)

# Marks a request one worker relays to another, so it is measured and logged once.
RELAY_HEADER: Final = "X-Registry-Proxy-Relay"
SOCKET_MODE: Final = 0o600
# What a worker passes on to the blob's owner, and what it passes back.
RELAYED = ("Range", "If-None-Match", "Authorization", "Accept", "User-Agent")
RELAYED_BACK = frozenset(
    {
        "Content-Type", "Content-Range", "Docker-Content-Digest", "ETag", "Accept-Ranges",
        "X-Cache", "WWW-Authenticate", "Retry-After",
    }
)  # fmt: skip
# Foreign blobs remembered as verified, at most.
MAX_VOUCHED: Final = 1_000_000
# A foreign blob up to this size is hashed by the worker serving it (a millisecond at most).
HASHED_HERE: Final = 1024 * 1024


class ShardedStore(BlobStore):
    """The store of worker `worker.index` of `worker.count`: it claims the digests it owns and
    a share of the budget; another worker's manifests it reads (and verifies) from their files."""

    def __init__(
        self,
        root: Path,
        budget: int,
        worker: Worker,
        *,
        download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT,
        fetch_policy: FetchPolicy = DEFAULT_FETCH_POLICY,
    ) -> None:
        self.worker = worker
        super().__init__(
            root,
            budget // worker.count,
            download_timeout=download_timeout,
            claims=self.owns,
            fetch_policy=fetch_policy,
        )

    def owner_of(self, digest: Digest) -> int:
        return int(digest.encoded[:8], 16) % self.worker.count

    def owns(self, digest: Digest) -> bool:
        return self.owner_of(digest) == self.worker.index

    @contextlib.contextmanager
    def open_foreign(self, digest: Digest) -> Iterator[tuple[int, int] | None]:
        """A complete blob another worker owns, read straight from its final path (a hit)."""
        try:
            fd = os.open(self.blob_path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            yield None
            return
        try:
            stat = os.fstat(fd)
            if time.time() - stat.st_mtime > TOUCH_INTERVAL:
                with contextlib.suppress(OSError):
                    os.utime(fd)  # recency the owner reads before evicting
            yield fd, stat.st_size
        finally:
            os.close(fd)

    def read_small(self, digest: Digest, limit: int = SMALL_LIMIT) -> bytes | None:
        """Another worker's manifests too: a manifest is small enough to hash each time."""
        if self.owns(digest):
            return super().read_small(digest, limit)
        with self.open_foreign(digest) as opened:
            if opened is None or opened[1] > limit:
                return None
            data = os.pread(opened[0], opened[1], 0)
        if Digest.of(data, digest.algorithm) != digest:
            log.error("cached %s is corrupt on disk; removing it", digest)
            self.eviction.delete_later(self.blob_path(digest))
            return None
        return data


class ShardedBlobService:
    """Serves the blobs this worker owns with the blob service it decorates, and the others
    from the shared directory or through their owner."""

    def __init__(self, inner: BlobService, store: ShardedStore, relay: OwnerRelay) -> None:
        self.inner = inner
        self.store = store
        self.relay = relay
        # What this worker owns and downloads, its siblings send from the file themselves.
        inner.handoff = Feed(inner.metrics, inner.send_timeout, is_relayed)
        # Blobs other workers own that their owner has verified since this worker started.
        self._foreign_verified: set[Digest] = set()

    async def serve(
        self, request: web.Request, upstream: Upstream, repository: Repository, digest: Digest
    ) -> web.StreamResponse:
        if self.store.owns(digest):
            return await self.inner.serve(request, upstream, repository, digest)
        return await self._serve_foreign(request, upstream, repository, digest)

    async def _serve_foreign(
        self, request: web.Request, upstream: Upstream, repository: Repository, digest: Digest
    ) -> web.StreamResponse:
        """A blob another worker owns: from the shared directory when complete, else from the
        owner, which downloads it once for every worker."""
        assert self.relay is not None
        session = self.relay.session(self.store.owner_of(digest))
        forwarded = {name: request.headers[name] for name in RELAYED if name in request.headers}
        url = URL(f"{self.relay.scheme}://worker{request.raw_path}", encoded=True)
        with self.store.open_foreign(digest) as found:
            if found is not None and await self._vouched(session, url, digest, *found):
                return await self.inner.serve_file(
                    request, digest, found[0], found[1], CacheResult.HIT
                )
        headers = {**forwarded, RELAY_HEADER: "1"}
        if request.method == "GET" and "Range" not in request.headers:
            headers[FOLLOW_HEADER] = "1"
        try:
            answer = await session.request(request.method, url, headers=headers, ssl=False)
            if FILE_HEADER in answer.headers:
                try:
                    with open_followed(
                        self.store.layout, digest, answer.headers[FILE_HEADER]
                    ) as fd:
                        if fd is not None:
                            self.inner.metrics.worker_handoffs.labels("file").inc()
                            return await follow(
                                request, answer, fd, digest, self.store.blob_path(digest),
                                self.inner.metrics, self.inner.send_timeout,
                            )  # fmt: skip
                finally:
                    answer.release()
                # Not the file the owner writes into (it moved on): its bytes, through it.
                del headers[FOLLOW_HEADER]
                answer = await session.request(request.method, url, headers=headers, ssl=False)
        except aiohttp.ClientError as exc:
            # The owner is restarting: this client is served straight from upstream instead.
            log.warning("worker owning %s unreachable (%s); passing it through", digest, exc)

            async def opener(offset: int) -> BlobSource:
                return await upstream.open_blob(repository, digest, offset)

            if request.method == "HEAD":
                return await self.inner.head_upstream(request, upstream, repository, digest)
            return await self.inner.pass_through(request, digest, opener)
        self.inner.metrics.worker_handoffs.labels("relay").inc()
        try:
            headers = {k: v for k, v in answer.headers.items() if k in RELAYED_BACK}
            if (result := CacheResult.from_header(answer.headers.get("X-Cache"))) is not None:
                notes(request).cache_result = result  # as the owner answered it
            response = web.StreamResponse(status=answer.status, headers=headers)
            if answer.content_length is not None:
                response.content_length = answer.content_length
            await response.prepare(request)
            # Counted here for the access log only: the owner counts the served bytes metric.
            noted = notes(request)
            noted.bytes_sent = 0
            try:
                # Whatever the owner sent, as it came: a fixed piece size would hold the first
                # bytes back until a piece filled.
                async for chunk in answer.content.iter_any():
                    await send_chunk(response, chunk, self.inner.send_timeout)
                    noted.bytes_sent += len(chunk)
            except Exception as exc:
                abort_transfer(request, digest, exc)
                return response
            await response.write_eof()
            return response
        finally:
            answer.release()

    async def _vouched(
        self, session: aiohttp.ClientSession, url: URL, digest: Digest, fd: int, size: int
    ) -> bool:
        """Whether a complete file another worker owns may be served: a small one is hashed here,
        a larger one by its owner on its first read after a start (once for every worker), which
        a HEAD asks it to do."""
        if digest in self._foreign_verified:
            return True
        if size <= HASHED_HERE:
            # Cheaper than a round trip to an owner busy with the herd that wants this blob.
            vouched = Digest.of(os.pread(fd, size, 0), digest.algorithm) == digest
            if not vouched:
                log.error("cached %s does not match its digest; asking its owner", digest)
        else:
            vouched = await self._owner_vouches(session, url, digest)
        if vouched:
            if len(self._foreign_verified) > MAX_VOUCHED:
                self._foreign_verified.clear()
            self._foreign_verified.add(digest)
        return vouched

    async def _owner_vouches(
        self, session: aiohttp.ClientSession, url: URL, digest: Digest
    ) -> bool:
        try:
            async with session.head(url, headers={RELAY_HEADER: "1"}, ssl=False) as answer:
                said = CacheResult.from_header(answer.headers.get("X-Cache"))
                return answer.status == 200 and said is CacheResult.HIT
        except aiohttp.ClientError:
            # The owner is restarting: hash it here rather than serve it unchecked.
            return await asyncio.to_thread(hashes_to, self.store.blob_path(digest), digest)


class OwnerRelay:
    """Sends a request on to the worker that owns the blob, over its Unix socket (which speaks
    TLS too when the mirror serves HTTPS, so `scheme` follows)."""

    def __init__(self, worker: Worker, *, tls: bool = False) -> None:
        self.worker = worker
        self.scheme = "https" if tls else "http"
        self._sessions: dict[int, aiohttp.ClientSession] = {}

    def session(self, owner: int) -> aiohttp.ClientSession:
        session = self._sessions.get(owner)
        if session is None or session.closed:
            # No pool limit: each client of a blob the owner downloads holds a connection for its
            # whole transfer, so a herd past aiohttp's default 100 would wait for the first.
            connector = aiohttp.UnixConnector(path=str(self.worker.socket_path(owner)), limit=0)
            session = aiohttp.ClientSession(
                connector=connector,
                connector_owner=True,
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=2),
            )
            self._sessions[owner] = session
        return session

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()


@contextlib.asynccontextmanager
async def relay_lifecycle(relay: OwnerRelay) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await relay.close()


def relay_socket(path: Path) -> socket.socket:
    """This worker's listening Unix socket for relays from the others, 0600 from the start."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Linux creates the socket file with the socket inode's mode less the umask, so it is
        # never more open than this, not even between bind() and the chmod() below.
        os.fchmod(sock.fileno(), SOCKET_MODE)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by this worker's previous life
        sock.bind(str(path))
        os.chmod(path, SOCKET_MODE)
        # Listening at once: a bound socket that does not listen yet refuses the other workers'
        # relays, which they would take for a dead owner.
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock


def is_relayed(request: web.BaseRequest) -> bool:
    """A relay arrives on a worker's Unix socket; a client cannot claim to be one over TCP."""
    if RELAY_HEADER not in request.headers or request.transport is None:
        return False
    return isinstance(request.transport.get_extra_info("sockname"), str)


def unless_relayed(middleware: Middleware) -> Middleware:
    """`middleware`, skipped for a relay: the worker the client talks to measures and logs it."""

    @web.middleware
    async def wrapped(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_relayed(request):
            return await handler(request)
        return await middleware(request, handler)

    return wrapped


def worker_metrics(worker: Worker) -> Metrics:
    """Metrics for one of several workers: prometheus-client's multiprocess mode, switched on
    here, once per process after the fork and before any metric exists (it is process-wide:
    values go to mmap files under `run/metrics`, which every worker's scrape merges)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(worker.metrics_dir)
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    return Metrics(merged_from=worker.metrics_dir)
