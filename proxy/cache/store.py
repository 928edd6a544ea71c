"""The content-addressed blob cache: the index over the on-disk layout, opening and storing
blobs, composed with single-flight downloads (`proxy.cache.download`) and the budget
(`proxy.cache.eviction`). The tree it keeps is drawn in `proxy.cache.layout`.

Invariants:

* A file under `blobs/` is complete and its bytes hash to its name: downloads are written to
  `tmp/` and renamed into place only when digest and size match. A crash at any point leaves at
  most a file in `tmp/`, removed at the next start (unless its flock is held: another process
  sharing the directory is writing it).
* One download per digest (`download`), shared by every reader of that digest.
* The budget holds at every instant (`proxy.cache.eviction`).
* A store accounts for the digests it `claims` (all of them, unless several processes share
  the directory, see `proxy.workers.sharding`); it never indexes, evicts or cleans up others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from proxy.cache.download import Download, NotCacheable, Opener
from proxy.cache.eviction import Eviction, NoRoom
from proxy.cache.fetch import DEFAULT_FETCH_POLICY, FetchPolicy, RangeOrigin
from proxy.cache.index import Entry, Index
from proxy.cache.layout import Layout, hashes_to, remove_unlocked, write_new_file
from proxy.config import Settings
from proxy.errors import DigestMismatch
from proxy.oci import Digest

log = logging.getLogger(__name__)

# Refresh a hit's mtime (the recency that survives a restart) at most this often.
TOUCH_INTERVAL: Final = 60.0
SMALL_LIMIT: Final = 4 * 1024 * 1024
DEFAULT_DOWNLOAD_TIMEOUT: Final = Settings.download_timeout


@dataclass(frozen=True, slots=True)
class StoreStats:
    size: int
    entries: int
    reserved: int
    budget: int
    # Evicted blobs still on disk: being deleted, or held open by a reader.
    deleting: int = 0


def _everything(digest: Digest) -> bool:
    return True


def sync_file(path: Path) -> None:
    """fsync the file at `path`, then its directory (the entry its rename made), unless it is
    gone (evicted since)."""
    for target, flags in ((path, 0), (path.parent, os.O_DIRECTORY)):
        try:
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC | flags)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class BlobStore:
    def __init__(
        self,
        root: Path,
        budget: int,
        *,
        download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT,
        claims: Callable[[Digest], bool] = _everything,
        fetch_policy: FetchPolicy = DEFAULT_FETCH_POLICY,
    ) -> None:
        self.layout = Layout(root)
        self.index = Index()
        self.eviction = Eviction(self.index, self.layout, budget)
        self.claims = claims
        self.download_timeout = download_timeout
        self.fetch_policy = fetch_policy
        self._downloads: dict[Digest, Download] = {}
        self._verifications: dict[Digest, asyncio.Future[bool]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._small_writes: dict[Digest, asyncio.Task[None]] = {}
        self._syncs: set[asyncio.Future[None]] = set()
        self._syncer: ThreadPoolExecutor | None = None
        self.writable = True
        self.digest_mismatches = 0

    # --- paths and figures

    @property
    def root(self) -> Path:
        return self.layout.root

    @property
    def blobs_dir(self) -> Path:
        return self.layout.blobs_dir

    @property
    def temp_dir(self) -> Path:
        return self.layout.temp_dir

    def blob_path(self, digest: Digest) -> Path:
        return self.layout.blob_path(digest)

    def temp_path(self, digest: Digest) -> Path:
        return self.layout.temp_path(digest)

    def has_file(self, digest: Digest) -> bool:
        """Whether the digest's file is in the directory (this worker's or another's)."""
        return self.blob_path(digest).exists()

    @property
    def budget(self) -> int:
        return self.eviction.budget

    @property
    def pinned(self) -> frozenset[Digest]:
        return self.eviction.pinned

    @property
    def evictions(self) -> int:
        return self.eviction.evictions

    @property
    def evicted_bytes(self) -> int:
        return self.eviction.evicted_bytes

    def stats(self) -> StoreStats:
        return StoreStats(
            self.index.size,
            len(self.index),
            self.eviction.reserved,
            self.budget,
            self.eviction.deleting,
        )

    def __contains__(self, digest: Digest) -> bool:
        return digest in self.index

    def entries(self) -> list[tuple[Digest, int, float]]:
        """(digest, size, last use) from least to most recently used."""
        return [(d, e.size, e.touched) for d, e in self.index.items()]

    # --- lifecycle

    async def open(self) -> None:
        """Rebuild the index from disk and clear abandoned downloads, off the event loop."""
        started = time.monotonic()
        try:
            self.layout.create()
        except OSError as exc:
            self.writable = False
            log.warning("cache dir %s unusable, passing blobs through: %s", self.root, exc)
            return
        found = await asyncio.to_thread(self.layout.scan)
        for digest, (size, mtime) in sorted(found.items(), key=lambda item: item[1][1]):
            if self.claims(digest):
                self.index.add(digest, Entry(size, mtime))
        removed = await asyncio.to_thread(self._remove_abandoned_temps)
        self.eviction.make_room(0)
        log.info(
            "cache index rebuilt: %d blobs, %d bytes, %d abandoned downloads removed in %.2fs",
            len(self.index), self.index.size, removed, time.monotonic() - started,
        )  # fmt: skip

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.idle()
        self.eviction.close()
        if self._syncer is not None:
            self._syncer.shutdown(wait=False)

    async def idle(self) -> None:
        """Wait until evicted files are deleted, deferred manifest writes have landed and
        committed blobs reached the disk."""
        while self._small_writes or self._syncs:
            await asyncio.gather(*self._small_writes.values(), *self._syncs, return_exceptions=True)
        await self.eviction.idle()

    def _remove_abandoned_temps(self) -> int:
        removed = 0
        for entry in os.scandir(self.layout.temp_dir):
            digest = self.layout.temp_digest(entry.name)
            if digest is not None and not self.claims(digest):
                continue  # its owner cleans it up
            with contextlib.suppress(OSError):
                if remove_unlocked(Path(entry.path)):  # else another process is writing it
                    removed += 1
        return removed

    # --- reading

    @contextlib.contextmanager
    def open_blob(self, digest: Digest) -> Iterator[tuple[int, int] | None]:
        """An open fd and size of a cached blob (a hit, which refreshes its recency), or None.

        The blob is leased while the block runs, so eviction passes it over.
        """
        entry = self.index.get(digest)
        if entry is None:
            yield None
            return
        try:
            fd = os.open(self.blob_path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            # Deleted behind our back (an operator, another process): forget it, refetch.
            self.index.drop(digest)
            yield None
            return
        self.index.used(digest)
        now = time.time()
        if now - entry.touched > TOUCH_INTERVAL:
            entry.touched = now
            with contextlib.suppress(OSError):
                os.utime(fd, (now, now))
        try:
            with self.eviction.lease(digest):
                yield fd, entry.size
        finally:
            os.close(fd)

    async def ensure_verified(self, digest: Digest) -> None:
        """Hash a blob not yet verified by this process before anyone reads it; a corrupt one is
        evicted (and so refetched). Concurrent first reads share one verification."""
        entry = self.index.get(digest)
        if entry is None or entry.verified:
            return
        pending = self._verifications.get(digest)
        if pending is None:
            pending = asyncio.ensure_future(
                asyncio.to_thread(hashes_to, self.blob_path(digest), digest)
            )
            self._verifications[digest] = pending
            pending.add_done_callback(lambda _: self._verifications.pop(digest, None))
        good = await asyncio.shield(pending)
        entry = self.index.get(digest)
        if entry is None:
            return
        if good:
            entry.verified = True
        else:
            log.error("cached %s is corrupt on disk; evicting it", digest)
            self.evict(digest)

    def read_small(self, digest: Digest, limit: int = SMALL_LIMIT) -> bytes | None:
        """A small cached blob's bytes (a manifest), verified on every read, or None."""
        with self.open_blob(digest) as opened:
            if opened is None or opened[1] > limit:
                return None
            fd, size = opened
            data = os.pread(fd, size, 0)
        if Digest.of(data, digest.algorithm) != digest:
            log.error("cached %s is corrupt on disk; removing it", digest)
            self.evict(digest)
            return None
        entry = self.index.get(digest)
        if entry is not None:
            entry.verified = True
        return data

    # --- writing

    def put_small(self, digest: Digest, data: bytes) -> None:
        """Store a small verified blob (a manifest); failures only log.

        Written at once when it fits; when it needs room, the victims are evicted now and the
        write follows their deletion in a task (`idle` waits for it), never blocking the loop
        on a large unlink.
        """
        if (
            digest in self.index
            or digest in self._small_writes
            or not self.claims(digest)
            or not self.writable
            or len(data) > self.budget
        ):
            return
        if Digest.of(data, digest.algorithm) != digest:
            raise DigestMismatch(digest, "digest mismatch")
        try:
            reserved = self.eviction.try_reserve(len(data))
        except NoRoom:
            return
        if reserved is not None:
            self._write_small(digest, data, reserved)
            return
        task = asyncio.get_running_loop().create_task(self._put_small_later(digest, data))
        self._small_writes[digest] = task
        task.add_done_callback(lambda _: self._small_writes.pop(digest, None))

    async def _put_small_later(self, digest: Digest, data: bytes) -> None:
        try:
            reserved = await self.eviction.reserve(len(data))
        except NoRoom:
            return
        if digest in self.index:
            self.eviction.release(reserved)
        else:
            self._write_small(digest, data, reserved)

    def _write_small(self, digest: Digest, data: bytes, reserved: int) -> None:
        temp = self.layout.small_temp_path(digest)
        try:
            try:
                write_new_file(temp, data)
            except FileExistsError:
                # Our pid's name, left by a process that died: nobody else writes it.
                os.unlink(temp)
                write_new_file(temp, data)
            self.layout.make_shard_dir(digest)
            os.rename(temp, self.blob_path(digest))
            self.add_entry(digest, len(data))
        except OSError as exc:
            log.warning("cannot cache manifest %s: %s", digest, exc)
            with contextlib.suppress(OSError):
                temp.unlink()
        finally:
            self.eviction.release(reserved)

    # --- downloads (`proxy.cache.download.DownloadHost`)

    def download(
        self, digest: Digest, opener: Opener, origin: RangeOrigin | None = None
    ) -> tuple[Download, bool]:
        """The download of `digest` in flight, starting one if none is; True if it is new.
        With an `origin`, a large blob may be fetched in ranged parts (`proxy.cache.fetch`)."""
        existing = self._downloads.get(digest)
        if existing is not None:
            return existing, False
        download = Download(self, digest, opener, origin)
        if not self.writable:
            download.degrade(NotCacheable("cache directory is not writable"))
            return download, True
        self._downloads[digest] = download
        task = asyncio.create_task(download.run(), name=f"download {digest}")
        download.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return download, True

    @property
    def downloads_in_flight(self) -> int:
        return len(self._downloads)

    def in_flight(self, digest: Digest) -> Download | None:
        return self._downloads.get(digest)

    def lease(self, digest: Digest) -> contextlib.AbstractContextManager[None]:
        return self.eviction.lease(digest)

    async def reserve(self, size: int) -> int:
        try:
            return await self.eviction.reserve(size)
        except NoRoom as exc:
            raise NotCacheable(str(exc)) from None

    def release_reservation(self, size: int) -> None:
        self.eviction.release(size)

    def add_entry(self, digest: Digest, size: int) -> None:
        self.index.add(digest, Entry(size, time.time(), verified=True))

    def persist(self, digest: Digest) -> None:
        """fsync a committed blob's file in the background, one at a time in a thread of its
        own: on a slow disk, syncs queue there (as paths, holding no descriptor) instead of
        taking the default pool's threads from the downloads' writes. A failure only logs: the
        blob is verified again after a restart."""
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(1, thread_name_prefix="cache-sync")
        running = asyncio.get_running_loop().run_in_executor(
            self._syncer, sync_file, self.blob_path(digest)
        )
        self._syncs.add(running)
        running.add_done_callback(self._synced)

    def _synced(self, running: asyncio.Future[None]) -> None:
        self._syncs.discard(running)
        if not running.cancelled() and (exc := running.exception()) is not None:
            log.warning("cannot fsync a cached blob: %s", exc)

    def download_finished(self, download: Download) -> None:
        if self._downloads.get(download.digest) is download:
            del self._downloads[download.digest]

    def count_mismatch(self, error: DigestMismatch) -> None:
        """Count an upstream body that did not match its digest, once however many saw it."""
        if not error.counted:
            error.counted = True
            self.digest_mismatches += 1

    # --- pins, checks, eviction

    def pin(self, digests: frozenset[Digest], sizes: dict[Digest, int]) -> None:
        """Replace the pinned set; refused when the pins alone would not fit in the budget."""
        self.eviction.pin(digests, {d: s for d, s in sizes.items() if self.claims(d)})

    async def verify(self) -> list[Digest]:
        """Re-hash every cached blob off the loop; corrupt ones are evicted and returned."""
        corrupt: list[Digest] = []
        for digest in self.index:
            if not await asyncio.to_thread(hashes_to, self.blob_path(digest), digest):
                log.error("cached %s is corrupt or missing on disk; evicting it", digest)
                self.evict(digest)
                corrupt.append(digest)
        return corrupt

    def evict(self, digest: Digest) -> bool:
        """Remove one blob from the cache; readers holding it open finish undisturbed."""
        return self.eviction.evict(digest)
