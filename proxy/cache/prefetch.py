"""Prefetch: when an image manifest is served, its missing blobs start downloading at once.

Clients fetch an image's blobs a few at a time, each after its own round trip; the mirror knows
the whole list the moment it serves the image manifest. Its config and layers not in the cache
are queued then, and fetched through the store's single-flight downloads (`BlobStore.download`),
the very ones a client's request joins: a client asking for a blob being prefetched streams it
as it lands, and the upstream sends it once.

Only the manifest a client asked for: an index served by tag prefetches nothing (every platform
would be fetched); the platform manifest the client then asks for by digest does.

Prefetch comes after clients:

* slots: it starts a download only while, after it, a quarter of the upstream's download slots
  (global and per upstream; at least one) stay free for clients, and waits for a slot to be
  given back otherwise;
* budget: it starts a blob only if the blob fits beside everything eviction may not take now
  (blobs being read, pinned ones, downloads in flight, and what it prefetched that no client
  has read yet, for `UNREAD_PROTECTION`), so it never evicts what is in use or what it just
  fetched, and never starts what cannot fit; the budget itself holds at every instant anyway
  (`proxy.cache.eviction`);
* bounded: at most `prefetch_concurrency` downloads at once, `QUEUE_SIZE` blobs queued, each
  digest once; on shutdown the queue is dropped and the downloads are cancelled with the store.

With several workers, a worker prefetches the blobs it owns (`BlobStore.claims`) only, and
hands an image whose other blobs are missing to `on_foreign` (the workers layer passes it on to
the other workers, whose `image_served(..., passed_on=True)` does not pass it back).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from proxy.cache.download import BlobSource, State
from proxy.cache.store import BlobStore
from proxy.config import Settings
from proxy.errors import RegistryError
from proxy.metrics import Metrics
from proxy.oci import Digest, Repository
from proxy.oci.media import image_blobs, is_image_manifest, manifest_document
from proxy.upstream.client import Upstream
from proxy.upstream.routing import CountedSlots

log = logging.getLogger(__name__)

QUEUE_SIZE: Final = 1024
# Manifests whose blob lists are kept parsed; past it the table starts over.
PARSED_MAX: Final = 4096
# A prefetched blob no client has read yet is kept from prefetch's own evictions this long.
UNREAD_PROTECTION: Final = 600.0
# A manifest served again within this long is not looked over again: a hot tag is served
# thousands of times a second, and its blobs only go missing when evicted.
RECHECK_SECONDS: Final = 1.0

# An image served here with blobs another worker owns missing: (upstream, repository, manifest,
# its body).
ForeignImage = Callable[[Upstream, Repository, Digest, bytes], None]
# Told of each blob prefetch completed: (upstream name, repository name, digest).
Fetched = Callable[[str, str, Digest], None]


@dataclass(frozen=True, slots=True)
class _Job:
    upstream: Upstream
    repository: Repository
    digest: Digest
    size: int


@dataclass(slots=True)
class _Active:
    size: int
    state: Callable[[], State]
    read: bool = False


def spare_slots_kept(capacity: int) -> int:
    """Download slots prefetch leaves to clients: a quarter, at least one."""
    return max(1, capacity // 4)


class Prefetcher:
    def __init__(
        self,
        store: BlobStore,
        settings: Settings,
        metrics: Metrics | None = None,
        *,
        on_fetched: Fetched | None = None,
        clock: Callable[[], float] = time.monotonic,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.on_fetched = on_fetched
        self.clock = clock
        self.queue_size = queue_size
        self._queue: deque[_Job] = deque()
        self._queued: set[Digest] = set()
        self._workers: set[asyncio.Task[None]] = set()
        self._active: dict[Digest, _Active] = {}
        self._unread: dict[Digest, float] = {}  # prefetched, not read yet: when it landed
        self._connecting = 0  # downloads started, not yet holding their slots
        # Set when one of ours stops connecting: it may have been counted twice (its slot taken,
        # itself not yet ready), so the slots are worth another look even with none given back.
        self._connected = asyncio.Event()
        self._closed = False
        self._parsed: dict[Digest, tuple[tuple[Digest, int], ...]] = {}
        self._checked: dict[Digest, float] = {}  # manifest -> when its blobs were looked over
        # Told of an image served here some of whose missing blobs this store does not claim.
        self.on_foreign: ForeignImage | None = None

    # --- what the handlers tell it

    def image_served(
        self,
        upstream: Upstream,
        repository: Repository,
        manifest: Digest,
        body: bytes,
        *,
        passed_on: bool = False,
    ) -> int:
        """A manifest was served (here, or by another worker that `passed_on` its missing blobs):
        queue its config and layers that are not cached; how many."""
        if (
            self._closed
            or not self.store.writable
            or not self.settings.prefetch_for(upstream.settings)
        ):
            return 0
        now = self.clock()
        if now - self._checked.get(manifest, -math.inf) < RECHECK_SECONDS:
            return 0
        if len(self._checked) >= PARSED_MAX:
            self._checked.clear()
        self._checked[manifest] = now
        queued = 0
        tell = None if passed_on else self.on_foreign
        foreign = False  # a blob another worker owns is missing: tell it (looked up once)
        for digest, size in self._blobs_of(manifest, body):
            if not self.store.claims(digest):
                foreign = foreign or (tell is not None and not self.store.has_file(digest))
                continue
            if (
                digest in self._queued
                or digest in self.store
                or self.store.in_flight(digest) is not None
            ):
                continue
            if len(self._queue) >= self.queue_size:
                self._skipped("queue_full")
                continue
            self._queue.append(_Job(upstream, repository, digest, size))
            self._queued.add(digest)
            queued += 1
        while self._queue and len(self._workers) < self.settings.prefetch_concurrency:
            task = asyncio.get_running_loop().create_task(self._work(), name="prefetch")
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)
        if foreign and tell is not None:
            tell(upstream, repository, manifest, body)
        return queued

    def _blobs_of(self, manifest: Digest, body: bytes) -> tuple[tuple[Digest, int], ...]:
        """The config and layers of an image manifest (none for an index: its platform
        manifest, asked for by digest, will say), parsed once per manifest: a hot tag's
        manifest is served thousands of times a second."""
        blobs = self._parsed.get(manifest)
        if blobs is None:
            try:
                document = manifest_document(body)
                image = is_image_manifest(document)
                blobs = tuple((b.digest, b.size) for b in image_blobs(document)) if image else ()
            except RegistryError:
                blobs = ()
            if len(self._parsed) >= PARSED_MAX:
                self._parsed.clear()
            self._parsed[manifest] = blobs
        return blobs

    def read(self, digest: Digest) -> None:
        """A client asked for a blob: if prefetch fetched it (or is fetching it), it paid."""
        active = self._active.get(digest)
        if active is not None and not active.read:
            active.read = True
            self._count_used()
        elif self._unread.pop(digest, None) is not None:
            self._count_used()

    # --- lifecycle

    async def settled(self) -> None:
        """Wait until the queue is empty and every prefetch download has finished."""
        while self._workers:
            await asyncio.gather(*list(self._workers), return_exceptions=True)

    async def close(self) -> None:
        """Drop the queue and stop; downloads in flight are the store's to cancel."""
        self._closed = True
        self._queue.clear()
        self._queued.clear()
        workers = list(self._workers)
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

    # --- the work

    async def _work(self) -> None:
        while self._queue:
            job = self._queue.popleft()
            try:
                await self._fetch(job)
            except Exception:  # a bug here must not stop the queue, nor reach a client
                log.exception("prefetch of %s failed", job.digest)
            finally:
                self._queued.discard(job.digest)

    def _taken(self, digest: Digest) -> bool:
        """Cached already, or a download (a client's, or ours) is on it."""
        return digest in self.store or self.store.in_flight(digest) is not None

    async def _fetch(self, job: _Job) -> None:
        if self._taken(job.digest):
            return
        await self._spare_slot(job.upstream)
        if self._taken(job.digest):
            return  # a client started it while we waited
        if not self._fits(job.size):
            self._skipped("no_room")
            return

        async def opener(offset: int) -> BlobSource:
            return await job.upstream.open_blob(job.repository, job.digest, offset)

        download, started = self.store.download(job.digest, opener)
        if not started or download.task is None:
            return
        active = _Active(job.size, lambda: download.state)
        self._active[job.digest] = active
        self._connecting += 1
        try:
            try:
                await download.ready.wait()  # it holds its slots and its reservation now
            finally:
                self._connecting -= 1
                connected, self._connected = self._connected, asyncio.Event()
                connected.set()
            # Waiting must not cancel the download: clients may be reading it.
            await asyncio.wait([download.task])
        finally:
            del self._active[job.digest]
        if download.state is not State.COMPLETE:
            self._skipped("failed")
            return
        if self.metrics is not None:
            self.metrics.prefetched_blobs.inc()
            self.metrics.prefetched_bytes.inc(job.size)
        if not active.read:
            self._unread[job.digest] = self.clock()
        if self.on_fetched is not None:
            self.on_fetched(job.upstream.name, job.repository.name, job.digest)

    async def _spare_slot(self, upstream: Upstream) -> None:
        """Wait until taking a download slot leaves enough free for clients, in every limit."""
        while (short := self._short_of(upstream)) is not None:
            waits = [
                asyncio.ensure_future(short.released()),
                asyncio.ensure_future(self._connected.wait()),
            ]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()

    def _short_of(self, upstream: Upstream) -> CountedSlots | None:
        for slots in upstream.download_slots:
            if not isinstance(slots, CountedSlots):
                continue
            free = slots.capacity - slots.taken - self._connecting
            if free - 1 < spare_slots_kept(slots.capacity):
                return slots
        return None

    def _fits(self, size: int) -> bool:
        """Whether `size` more bytes fit beside what eviction may not take, what downloads in
        flight reserved (or will: ours still connecting), and our unread prefetches."""
        now = self.clock()
        for digest, landed in list(self._unread.items()):
            if now - landed >= UNREAD_PROTECTION or digest not in self.store:
                del self._unread[digest]
        eviction = self.store.eviction
        unread = frozenset(self._unread)
        # Ours not holding a reservation: still connecting, or landed and not yet counted as
        # unread (the download finished; this task has not run since).
        unreserved = (State.CONNECTING, State.COMPLETE)
        connecting = sum(
            active.size for active in self._active.values() if active.state() in unreserved
        )
        in_use = eviction.held_bytes(unread) + eviction.reserved + eviction.deleting + connecting
        return in_use + size <= eviction.budget

    def _skipped(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.prefetch_skipped.labels(reason).inc()

    def _count_used(self) -> None:
        if self.metrics is not None:
            self.metrics.prefetch_used.inc()
