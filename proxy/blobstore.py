"""The content-addressed blob cache: a bounded on-disk LRU with single-flight downloads.

Layout under the cache directory::

    <cache-dir>/
    +-- blobs/
    |   +-- sha256/
    |       +-- ab/
    |           +-- abcdef0123...       complete and verified; the name is the hex digest
    +-- tmp/
    |   +-- sha256-abcdef0123...        a download in progress, flock()ed by its writer
    |   +-- sha256-abcdef0123....N.small  a manifest being written (renamed at once)
    |   +-- evicted-<pid>-<n>           a blob being deleted, off the loop
    |   +-- .ready-XXXXXXXX             readiness's write probe, gone within milliseconds
    +-- run/                            with --workers: Unix sockets, metrics files (workers.py)
    +-- provenance.sqlite(-wal, -shm, -journal)  where each digest was seen (provenance.py)

Directories are created 0700 and files 0600 (cached images may be private; other local users
have no business reading them), whatever the umask; start-up tightens `blobs/` and `tmp/` left
0755 by older releases, which keeps their 0644 files out of reach. Files are created with
O_EXCL | O_NOFOLLOW, so nothing planted in `tmp/` is followed or reused.

Invariants:

* A file under `blobs/` is complete and its bytes hash to its name: downloads are written to
  `tmp/`, hashed as they stream, fsync()ed, and renamed into place only when digest and size
  match. A crash at any point leaves at most a file in `tmp/`, removed at the next start.
* One download per digest. It belongs to the store, not to the request that started it, so it
  outlives a client that disconnects. Every reader of that digest streams from the growing
  temporary file as bytes land (waiting on an event), then, after the rename, from the same inode.
* The budget is hard: the bytes on disk never exceed it, at any instant. Complete blobs, the
  whole size of every download in flight (reserved before its first byte is written) and
  evicted blobs until their files are really gone all count. Eviction takes the least recently
  used blob that nobody is reading; a download waits for its victims' deletion before it writes.
  A reader holds an open file descriptor, so even a blob evicted under it (by an operator)
  stays readable to the end, and its bytes count until that reader closes it.
* The temporary file's name and its flock are the coordination point between processes sharing
  a directory: start-up only removes temporary files whose lock nobody holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import fcntl
import itertools
import logging
import os
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from proxy.oci import Digest, ErrorCode, RegistryError

log = logging.getLogger(__name__)

# Refresh a hit's mtime (the recency that survives a restart) at most this often.
TOUCH_INTERVAL: Final = 60.0
READ_CHUNK: Final = 1024 * 1024
FILE_MODE: Final = 0o600
DIR_MODE: Final = 0o700
# A new file of our own: never through a symlink, never one that already exists.
CREATE_FLAGS: Final = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class BlobSource(Protocol):
    """An open blob body from upstream (`upstream.BlobStream`, or a fake in tests)."""

    @property
    def size(self) -> int | None: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    def close(self) -> None: ...


# Opens the blob from a byte offset; raises a RegistryError when the upstream cannot.
Opener = Callable[[int], Awaitable[BlobSource]]


class DigestMismatch(RegistryError):
    """The upstream's bytes did not match the digest: the upstream's fault, so a 502 that
    clients retry, never the 400 that DIGEST_INVALID means for a client's own mistake."""

    def __init__(self, digest: Digest, why: str) -> None:
        super().__init__(
            ErrorCode.UNAVAILABLE, f"upstream sent bad content for {digest}: {why}", status=502
        )
        self.counted = False  # by the store's digest_mismatches, once


class CacheResult:
    """How a response was answered, as the `X-Cache` header and metrics label say it."""

    HIT = "HIT"
    MISS = "MISS"
    COALESCED = "COALESCED"
    STALE = "STALE"


class NotCacheable(Exception):
    """The blob cannot go through the cache (too large, unknown size, no space, read-only)."""


@dataclass(slots=True)
class Entry:
    size: int
    touched: float
    # Hashed by this process: at download, or on the first read after a start (the file may have
    # changed on disk while the mirror was down).
    verified: bool = False


@dataclass(frozen=True, slots=True)
class StoreStats:
    size: int
    entries: int
    reserved: int
    budget: int
    # Evicted blobs still on disk: being deleted, or held open by a reader.
    deleting: int = 0


class State(enum.Enum):
    CONNECTING = "connecting"
    STREAMING = "streaming"
    COMPLETE = "complete"
    FAILED = "failed"
    # The cache could not be written (ENOSPC, EROFS): readers carry on from upstream.
    DEGRADED = "degraded"


class Download:
    """One upstream download of one digest into a temporary file, shared by all its readers."""

    def __init__(self, store: BlobStore, digest: Digest, opener: Opener) -> None:
        self.store = store
        self.digest = digest
        self.opener = opener
        self.state = State.CONNECTING
        self.size: int | None = None
        self.written = 0
        self.error: BaseException | None = None
        self.temp_path = store.temp_path(digest)
        self.final_path = store.blob_path(digest)
        # Hash state over the first `written` bytes, kept when the cache write fails so a reader
        # continuing from upstream can still verify the whole blob.
        self.hasher: Any = digest.hasher()
        self.ready = asyncio.Event()  # size known, or failed
        self._progress = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def _notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    async def wait_ready(self) -> None:
        await self.ready.wait()
        if self.state is State.FAILED:
            assert self.error is not None
            raise self.error

    async def run(self) -> None:
        reserved = 0
        fd = -1
        stream: BlobSource | None = None
        try:
            async with asyncio.timeout(self.store.download_timeout):
                stream = await self.opener(0)
                if stream.size is None:
                    raise NotCacheable("upstream did not send the blob's size")
                self.size = stream.size
                reserved = await self.store.reserve(stream.size)
                fd = self._open_temp()
                self.state = State.STREAMING
                self.ready.set()
                await self._write(stream, fd)
                await asyncio.to_thread(os.fsync, fd)
                self._commit()
        except NotCacheable as exc:
            self._degrade(exc)
        except TimeoutError:  # before OSError, whose subclass it is
            self._fail(RegistryError(ErrorCode.UNAVAILABLE, "blob download timed out", status=504))
        except OSError as exc:
            # The disk is full or read-only: the cache is lost for this blob, the pull is not.
            log.warning("cannot cache %s, streaming it through: %s", self.digest, exc)
            self._degrade(exc)
        except Exception as exc:
            self._fail(exc)
        except BaseException:
            self._fail(RegistryError(ErrorCode.UNAVAILABLE, "blob download cancelled"))
            raise
        finally:
            if stream is not None:
                stream.close()
            if fd >= 0:
                # Only a file this download created, and under its flock: never another
                # process's download of the same digest.
                if self.state is not State.COMPLETE:
                    with contextlib.suppress(OSError):
                        os.unlink(self.temp_path)
                os.close(fd)  # releases the flock
            self.store.release_reservation(reserved)
            self.store.download_finished(self)
            self.ready.set()
            self._notify()

    def _open_temp(self) -> int:
        try:
            fd = os.open(self.temp_path, os.O_RDWR | CREATE_FLAGS, FILE_MODE)
        except FileExistsError:
            # Left by a process that died since start-up's sweep; one being written (its
            # flock held) is not touched, and this download streams through instead.
            if not _remove_unlocked(self.temp_path):
                raise
            fd = os.open(self.temp_path, os.O_RDWR | CREATE_FLAGS, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        return fd

    async def _write(self, stream: BlobSource, fd: int) -> None:
        assert self.size is not None
        async for chunk in stream.chunks():
            if self.written + len(chunk) > self.size:
                raise DigestMismatch(self.digest, "more bytes than its Content-Length")
            view = memoryview(chunk)
            while view:
                written = os.write(fd, view)
                self.hasher.update(view[:written])
                self.written += written
                view = view[written:]
                self._notify()
        if self.written != self.size:
            raise DigestMismatch(self.digest, f"{self.written} of {self.size} bytes")
        if self.hasher.hexdigest() != self.digest.encoded:
            raise DigestMismatch(self.digest, "digest mismatch")

    def _commit(self) -> None:
        assert self.size is not None
        self.store.make_shard_dir(self.digest)
        os.rename(self.temp_path, self.final_path)
        self.state = State.COMPLETE
        self.store.add_entry(self.digest, self.size)

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, DigestMismatch):
            self.store.digest_mismatches += 1
            exc.counted = True
            log.error("%s", exc.message)
        self.state = State.FAILED
        self.error = exc

    def _degrade(self, exc: BaseException) -> None:
        self.state = State.DEGRADED
        self.error = exc

    async def read(self, start: int, end: int) -> AsyncIterator[tuple[int, int, int]]:
        """Yield `(fd, offset, count)` pieces of bytes `start`..`end` (inclusive) as they land.

        The fd is the reader's own, opened on the temporary file before it can be renamed or
        removed, so it stays valid whatever happens to the path. Raises the download's error
        when it failed; stops early (having yielded up to `written`) when it degraded, and the
        caller continues from upstream.
        """
        fd = self._open_reader()
        try:
            position = start
            while position <= end:
                available = min(self._verified_or_held_back(), end + 1)
                if position < available:
                    yield fd, position, available - position
                    position = available
                elif self.state is State.FAILED:
                    assert self.error is not None
                    raise self.error
                elif self.state in (State.DEGRADED, State.COMPLETE):
                    return
                else:
                    await self._progress.wait()
        finally:
            if fd >= 0:
                os.close(fd)

    def _verified_or_held_back(self) -> int:
        """How many bytes readers may have: all that landed, but the last byte only once the
        whole blob verified, so that a client never receives a complete body with a bad digest.
        """
        if self.state in (State.COMPLETE, State.DEGRADED) or self.size is None:
            return self.written
        return min(self.written, self.size - 1)

    def _open_reader(self) -> int:
        for path in (self.temp_path, self.final_path):
            with contextlib.suppress(FileNotFoundError):
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return -1


class BlobStore:
    def __init__(
        self,
        root: Path,
        budget: int,
        *,
        download_timeout: float = 3600.0,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.root = root
        self.budget = budget
        # Worker `shard[0]` of `shard[1]` sharing the directory: it downloads, accounts for and
        # evicts only the digests it owns (see `owns`); the others it only reads.
        self.shard_index, self.shard_count = shard
        self.download_timeout = download_timeout
        self.blobs_dir = root / "blobs"
        self.temp_dir = root / "tmp"
        self._entries: OrderedDict[Digest, Entry] = OrderedDict()
        self._size = 0
        self._reserved = 0
        self._leases: Counter[Digest] = Counter()
        # Never evicted (what production runs); their bytes still count against the budget.
        self.pinned: frozenset[Digest] = frozenset()
        self._downloads: dict[Digest, Download] = {}
        self._verifications: dict[Digest, asyncio.Future[bool]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._deletions: set[asyncio.Task[None]] = set()
        self._small_writes: dict[Digest, asyncio.Task[None]] = {}
        # Bytes of evicted blobs still on disk: unlinks under way, and files unlinked while a
        # reader of that digest held them open (freed when the last lease goes).
        self._deleting = 0
        self._held_open: Counter[Digest] = Counter()
        self._deleted = asyncio.Event()  # set, and replaced, each time evicted bytes are freed
        # Unlinking a large file can take a while; a thread of its own, so that frees are not
        # queued behind the fsyncs and hashing in the default pool while downloads wait on them.
        self._unlinker: ThreadPoolExecutor | None = None
        self._eviction_names = itertools.count()
        self.writable = True
        self.digest_mismatches = 0
        self.evictions = 0
        self.evicted_bytes = 0

    # --- paths

    def owner_of(self, digest: Digest) -> int:
        return int(digest.encoded[:8], 16) % self.shard_count

    def owns(self, digest: Digest) -> bool:
        """Whether this worker downloads and accounts for `digest`: a fixed split by digest, so
        workers never race for one blob and their budgets add up to the directory's."""
        return self.shard_count == 1 or self.owner_of(digest) == self.shard_index

    def blob_path(self, digest: Digest) -> Path:
        return self.blobs_dir / digest.algorithm / digest.encoded[:2] / digest.encoded

    def make_shard_dir(self, digest: Digest) -> None:
        """Create the directories a blob is renamed into, 0700 each."""
        algorithm = self.blobs_dir / digest.algorithm
        for directory in (algorithm, algorithm / digest.encoded[:2]):
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory, DIR_MODE)

    def temp_path(self, digest: Digest) -> Path:
        return self.temp_dir / f"{digest.algorithm}-{digest.encoded}"

    # --- lifecycle

    async def open(self) -> None:
        """Rebuild the index from disk and clear abandoned downloads, off the event loop."""
        started = time.monotonic()
        try:
            self.root.mkdir(DIR_MODE, parents=True, exist_ok=True)
            for directory in (self.blobs_dir, self.temp_dir):
                private_dir(directory)
        except OSError as exc:
            self.writable = False
            log.warning("cache dir %s unusable, passing blobs through: %s", self.root, exc)
            return
        entries = await asyncio.to_thread(self._scan)
        for digest, entry in sorted(entries.items(), key=lambda item: item[1].touched):
            self._entries[digest] = entry
            self._size += entry.size
        removed = await asyncio.to_thread(self._remove_abandoned_temps)
        self._evict(0)
        log.info(
            "cache index rebuilt: %d blobs, %d bytes, %d abandoned downloads removed in %.2fs",
            len(self._entries), self._size, removed, time.monotonic() - started,
        )  # fmt: skip

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.idle()
        if self._unlinker is not None:
            self._unlinker.shutdown()
            self._unlinker = None

    async def idle(self) -> None:
        """Wait until evicted files are deleted and deferred manifest writes have landed."""
        while self._deletions or self._small_writes:
            await asyncio.gather(
                *self._deletions, *self._small_writes.values(), return_exceptions=True
            )

    def _scan(self) -> dict[Digest, Entry]:
        entries: dict[Digest, Entry] = {}
        for algorithm_dir in _subdirs(self.blobs_dir):
            for shard in _subdirs(Path(algorithm_dir.path)):
                with os.scandir(shard.path) as files:
                    for file in files:
                        try:
                            digest = Digest.parse(f"{algorithm_dir.name}:{file.name}")
                            stat = file.stat(follow_symlinks=False)
                        except (RegistryError, OSError):
                            log.warning("ignoring stray file in cache: %s", file.path)
                            continue
                        if (
                            shard.name == digest.encoded[:2]
                            and file.is_file()
                            and self.owns(digest)
                        ):
                            entries[digest] = Entry(stat.st_size, stat.st_mtime)
        return entries

    def _remove_abandoned_temps(self) -> int:
        removed = 0
        for entry in os.scandir(self.temp_dir):
            algorithm, _, encoded = entry.name.partition("-")
            with contextlib.suppress(RegistryError):
                if not self.owns(Digest.parse(f"{algorithm}:{encoded}")):
                    continue  # its owner cleans it up
            with contextlib.suppress(OSError):
                if _remove_unlocked(Path(entry.path)):  # else another process is writing it
                    removed += 1
        return removed

    # --- reading

    def stats(self) -> StoreStats:
        deleting = self._deleting + self._held_open.total()
        return StoreStats(self._size, len(self._entries), self._reserved, self.budget, deleting)

    def __contains__(self, digest: Digest) -> bool:
        return digest in self._entries

    @contextlib.contextmanager
    def open_blob(self, digest: Digest) -> Iterator[tuple[int, int] | None]:
        """An open fd and size of a cached blob (a hit, which refreshes its recency), or None.

        The blob is leased while the block runs, so eviction passes it over.
        """
        entry = self._entries.get(digest)
        if entry is None:
            yield None
            return
        path = self.blob_path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            # Deleted behind our back (an operator, another process): forget it, refetch.
            self._drop(digest)
            yield None
            return
        self._entries.move_to_end(digest)
        now = time.time()
        if now - entry.touched > TOUCH_INTERVAL:
            entry.touched = now
            with contextlib.suppress(OSError):
                os.utime(fd, (now, now))
        self._leases[digest] += 1
        try:
            yield fd, entry.size
        finally:
            os.close(fd)
            self._release_lease(digest)

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

    async def ensure_verified(self, digest: Digest) -> None:
        """Hash a blob not yet verified by this process before anyone reads it; a corrupt one is
        evicted (and so refetched). Concurrent first reads share one verification. Only for
        blobs this worker owns: the others ask their owner (`BlobService._serve_foreign`)."""
        entry = self._entries.get(digest)
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
        entry = self._entries.get(digest)
        if entry is None:
            return
        if good:
            entry.verified = True
        else:
            log.error("cached %s is corrupt on disk; evicting it", digest)
            self.evict(digest)

    def read_small(self, digest: Digest, limit: int = 4 * 1024 * 1024) -> bytes | None:
        """A small cached blob's bytes (a manifest), verified on every read, or None.

        Another worker's files are read too: a manifest is small enough to hash each time.
        """
        owned = self.owns(digest)
        with self.open_blob(digest) if owned else self.open_foreign(digest) as opened:
            if opened is None or opened[1] > limit:
                return None
            fd, size = opened
            data = os.pread(fd, size, 0)
        if Digest.of(data, digest.algorithm) != digest:
            log.error("cached %s is corrupt on disk; removing it", digest)
            if owned:
                self.evict(digest)
            else:
                self._delete_later(self.blob_path(digest))
            return None
        if owned:
            self._entries[digest].verified = True
        return data

    # --- writing

    def put_small(self, digest: Digest, data: bytes) -> None:
        """Store a small verified blob (a manifest); failures only log.

        Written at once when it fits; when it needs room, the victims are evicted now and the
        write follows their deletion in a task (`idle` waits for it), never blocking the loop
        on a large unlink.
        """
        if (
            digest in self._entries
            or digest in self._small_writes
            or not self.owns(digest)
            or not self.writable
            or len(data) > self.budget
        ):
            return
        if Digest.of(data, digest.algorithm) != digest:
            raise DigestMismatch(digest, "digest mismatch")
        try:
            reserved = self._try_reserve(len(data))
        except NotCacheable:
            return
        if reserved is not None:
            self._write_small(digest, data, reserved)
            return
        task = asyncio.get_running_loop().create_task(self._put_small_later(digest, data))
        self._small_writes[digest] = task
        task.add_done_callback(lambda _: self._small_writes.pop(digest, None))

    async def _put_small_later(self, digest: Digest, data: bytes) -> None:
        try:
            reserved = await self.reserve(len(data))
        except NotCacheable:
            return
        if digest in self._entries:
            self.release_reservation(reserved)
        else:
            self._write_small(digest, data, reserved)

    def _write_small(self, digest: Digest, data: bytes, reserved: int) -> None:
        temp = self.temp_dir / f"{digest.algorithm}-{digest.encoded}.{os.getpid()}.small"
        try:
            try:
                write_new_file(temp, data)
            except FileExistsError:
                # Our pid's name, left by a process that died: nobody else writes it.
                os.unlink(temp)
                write_new_file(temp, data)
            self.make_shard_dir(digest)
            os.rename(temp, self.blob_path(digest))
            self.add_entry(digest, len(data))
        except OSError as exc:
            log.warning("cannot cache manifest %s: %s", digest, exc)
            with contextlib.suppress(OSError):
                temp.unlink()
        finally:
            self.release_reservation(reserved)

    def download(self, digest: Digest, opener: Opener) -> tuple[Download, bool]:
        """The download of `digest` in flight, starting one if none is; True if it is new."""
        existing = self._downloads.get(digest)
        if existing is not None:
            return existing, False
        download = Download(self, digest, opener)
        if not self.writable:
            download._degrade(NotCacheable("cache directory is not writable"))
            download.ready.set()
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
        @contextlib.contextmanager
        def hold() -> Iterator[None]:
            self._leases[digest] += 1
            try:
                yield
            finally:
                self._release_lease(digest)

        return hold()

    def _release_lease(self, digest: Digest) -> None:
        self._leases[digest] -= 1
        if self._leases[digest] <= 0:
            del self._leases[digest]
            if self._held_open.pop(digest, 0):
                self._freed()  # the last reader closed an evicted blob: its blocks are free

    # --- accounting, called by downloads

    async def reserve(self, size: int) -> int:
        """Reserve `size` bytes of the budget for a download: evict to make room, then wait
        until the evicted files are gone from disk, so that the budget holds at every instant.
        """
        while (reserved := self._try_reserve(size)) is None:
            await self._deleted.wait()
        return reserved

    def _try_reserve(self, size: int) -> int | None:
        """Reserve `size` bytes if they are free on disk now; None while evicted files that
        would make the room are still being deleted. Raises NotCacheable when there is no room
        to make."""
        if size > self.budget:
            raise NotCacheable(f"{size} bytes is larger than the whole cache budget")
        if not self._evict(size):
            raise NotCacheable("everything in the cache is in use")
        if self._size + self._reserved + self._deleting + self._held_open.total() + size > (
            self.budget
        ):
            return None
        self._reserved += size
        return size

    def release_reservation(self, size: int) -> None:
        self._reserved -= size

    def add_entry(self, digest: Digest, size: int) -> None:
        if digest in self._entries:
            return
        self._entries[digest] = Entry(size, time.time(), verified=True)
        self._size += size

    def download_finished(self, download: Download) -> None:
        if self._downloads.get(download.digest) is download:
            del self._downloads[download.digest]

    # --- pins and checks

    def pin(self, digests: frozenset[Digest], sizes: dict[Digest, int]) -> None:
        """Replace the pinned set; refused when the pins alone would not fit in the budget.

        `sizes` gives the size of every pinned digest (from manifest descriptors), cached or not.
        """
        # With several workers each checks the pins it owns against its share of the budget.
        total = sum(sizes.get(digest, 0) for digest in digests if self.owns(digest))
        if total > self.budget:
            raise ValueError(
                f"pinned content is {total} bytes, more than the cache budget of {self.budget}"
            )
        self.pinned = digests

    async def verify(self) -> list[Digest]:
        """Re-hash every cached blob off the loop; corrupt ones are evicted and returned."""
        corrupt: list[Digest] = []
        for digest in list(self._entries):
            if not await asyncio.to_thread(hashes_to, self.blob_path(digest), digest):
                log.error("cached %s is corrupt or missing on disk; evicting it", digest)
                self.evict(digest)
                corrupt.append(digest)
        return corrupt

    def entries(self) -> list[tuple[Digest, int, float]]:
        """(digest, size, last use) from least to most recently used."""
        return [(d, e.size, e.touched) for d, e in self._entries.items()]

    # --- eviction

    def evict(self, digest: Digest) -> bool:
        """Remove one blob from the cache; readers holding it open finish undisturbed."""
        entry = self._entries.get(digest)
        if entry is None:
            return False
        self._drop(digest)
        self._delete_later(self.blob_path(digest), digest, entry.size)
        return True

    def _evict(self, incoming: int) -> bool:
        """Evict least recently used, unleased blobs until `incoming` more bytes fit once the
        deletions under way are done (files held open by readers stay, so they count)."""
        excess = self._size + self._reserved + self._held_open.total() + incoming - self.budget
        if excess <= 0:
            return True
        victims: list[Digest] = []
        for digest, entry in list(self._entries.items()):
            if excess <= 0:
                break
            if self._leases.get(digest) or digest in self.pinned:
                continue
            if self.shard_count > 1 and self._read_elsewhere(digest, entry):
                continue
            victims.append(digest)
            excess -= entry.size
        if excess > 0:
            return False
        for digest in victims:
            size = self._entries[digest].size
            self.evict(digest)
            self.evictions += 1
            self.evicted_bytes += size
        return True

    def _read_elsewhere(self, digest: Digest, entry: Entry) -> bool:
        """Whether another worker served this blob since we last did (it touched the mtime);
        if so it is as recent as that, and moves to the back of the line."""
        with contextlib.suppress(OSError):
            mtime = self.blob_path(digest).stat().st_mtime
            if mtime > entry.touched + 1:
                entry.touched = mtime
                self._entries.move_to_end(digest)
                return True
        return False

    def _drop(self, digest: Digest) -> None:
        entry = self._entries.pop(digest, None)
        if entry is not None:
            self._size -= entry.size

    def _delete_later(self, path: Path, digest: Digest | None = None, size: int = 0) -> None:
        """Move a blob out of `blobs/` now (a rename is cheap) and delete it in a thread; its
        `size` counts against the budget until the file is gone (`digest` being one this store
        accounts for, whose readers may keep the file's blocks alive after the unlink).

        The rename first means a new download of the same digest can land at the final path at
        once without a late unlink removing it.
        """
        trash = self.temp_dir / f"evicted-{os.getpid()}-{next(self._eviction_names)}"
        try:
            os.rename(path, trash)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("cannot evict %s: %s", path, exc)
            return
        if self._unlinker is None:
            self._unlinker = ThreadPoolExecutor(1, thread_name_prefix="cache-unlink")
        self._deleting += size
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._unlink(loop, trash, digest, size))
        self._deletions.add(task)
        task.add_done_callback(self._deletions.discard)

    async def _unlink(
        self, loop: asyncio.AbstractEventLoop, trash: Path, digest: Digest | None, size: int
    ) -> None:
        try:
            await loop.run_in_executor(self._unlinker, _unlink, trash)
        finally:
            self._deleting -= size
            if digest is not None and self._leases.get(digest):
                self._held_open[digest] += size  # a reader still has it open
            self._freed()

    def _freed(self) -> None:
        event, self._deleted = self._deleted, asyncio.Event()
        event.set()


def hashes_to(path: Path, digest: Digest) -> bool:
    hasher = digest.hasher()
    try:
        with path.open("rb") as file:
            while chunk := file.read(READ_CHUNK):
                hasher.update(chunk)
    except OSError:
        return False
    return bool(hasher.hexdigest() == digest.encoded)


def write_new_file(path: Path, data: bytes) -> None:
    """Create `path` (0600, exclusively, no symlink followed) holding `data`."""
    fd = os.open(path, os.O_WRONLY | CREATE_FLAGS, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def private_dir(path: Path) -> None:
    """Create `path` 0700, or make it so if it exists (older releases left 0755)."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        if os.stat(path).st_mode & 0o777 != DIR_MODE:
            try:
                os.chmod(path, DIR_MODE)
            except PermissionError as exc:
                log.warning("cannot make %s private (mode 0700): %s", path, exc)


def _remove_unlocked(path: Path) -> bool:
    """Remove a temporary file nobody holds the flock of (a symlink, whatever it points to);
    False if someone holds it. Unlinked under our lock, so never a file created after the check.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        os.unlink(path)  # a symlink: not ours to follow
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    finally:
        os.close(fd)
    return True


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _subdirs(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return [entry for entry in entries if entry.is_dir(follow_symlinks=False)]
    except OSError:
        return []
