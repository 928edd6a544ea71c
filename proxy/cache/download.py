"""One upstream download of one digest into the cache, shared by every reader (single flight).

A download belongs to the store, not to the request that started it, so it outlives a client
that disconnects. It is written to `tmp/` (see `proxy.cache.layout`), hashed as it streams,
and renamed into `blobs/` only when digest and size match; its fsync follows in the background
(`BlobStore.persist`), so no client waits on the disk for its last byte: a blob this process has
not verified is hashed again before its first read (`BlobStore.ensure_verified`), so one torn by
a power cut before its fsync is fetched again, never served. Every reader of that
digest streams from the growing temporary file as bytes land (waiting on an event), then,
after the rename, from the same inode; the last byte is held back until the whole blob
verified, so no client ever receives a complete body with a bad digest. When the cache cannot
be written (ENOSPC, EROFS, no room in the budget) the download degrades and its readers carry
on from the upstream.

What a download needs from the store is `DownloadHost`; where the bytes come from, `Opener`
(and, for ranged parts of a large blob, a `RangeOrigin`). How the body is fetched, resumed where
a connection broke and split over several connections, is `proxy.cache.fetch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from proxy.cache.fetch import BodyChanged, BodyFetch, FetchPolicy, RangeOrigin, SocketSource
from proxy.cache.layout import CREATE_FLAGS, FILE_MODE, Layout, remove_unlocked
from proxy.errors import (
    DigestMismatch,
    DownloadTimedOut,
    ErrorCode,
    RegistryError,
)
from proxy.oci import Digest

log = logging.getLogger(__name__)


class BlobSource(Protocol):
    """An open blob body from upstream (`upstream.BlobStream`, or a fake in tests)."""

    @property
    def size(self) -> int | None: ...

    # The response's ETag or Last-Modified, compared when the download resumes.
    @property
    def validator(self) -> str | None: ...

    # Whether the upstream takes Range requests for it (a 206, or Accept-Ranges: bytes).
    @property
    def accepts_ranges(self) -> bool: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    # The body as its socket's bytes, when it can be read that way; then `chunks` is not used.
    def socket_body(self) -> SocketSource | None: ...

    def close(self) -> None: ...


# Opens the blob from a byte offset; raises a RegistryError when the upstream cannot.
Opener = Callable[[int], Awaitable[BlobSource]]


class NotCacheable(Exception):
    """The blob cannot go through the cache (too large, unknown size, no space, read-only)."""


class DownloadHost(Protocol):
    """What a download asks of the store it fills."""

    layout: Layout
    download_timeout: float
    fetch_policy: FetchPolicy

    async def reserve(self, size: int) -> int: ...

    def release_reservation(self, size: int) -> None: ...

    def add_entry(self, digest: Digest, size: int) -> None: ...

    def download_finished(self, download: Download) -> None: ...

    def count_mismatch(self, error: DigestMismatch) -> None: ...

    def persist(self, digest: Digest) -> None: ...


class State(enum.Enum):
    CONNECTING = "connecting"
    STREAMING = "streaming"
    COMPLETE = "complete"
    FAILED = "failed"
    # The cache could not be written (ENOSPC, EROFS): readers carry on from upstream.
    DEGRADED = "degraded"


class Download:
    """One upstream download of one digest into a temporary file, shared by all its readers."""

    def __init__(
        self,
        store: DownloadHost,
        digest: Digest,
        opener: Opener,
        origin: RangeOrigin | None = None,
    ) -> None:
        self.store = store
        self.digest = digest
        self.opener = opener
        self.origin = origin
        self.state = State.CONNECTING
        self.size: int | None = None
        # The contiguous prefix from byte 0 that is on disk and hashed: what readers may have.
        self.written = 0
        # Bumped when the download starts over on another body: a reader that already has bytes
        # of the previous one is aborted rather than given a splice.
        self.generation = 0
        self.error: BaseException | None = None
        self.temp_path = store.layout.temp_path(digest)
        self.final_path = store.layout.blob_path(digest)
        # Hash state over the first `written` bytes, kept when the cache write fails so a reader
        # continuing from upstream can still verify the whole blob.
        self.hasher: Any = digest.hasher()
        self.ready = asyncio.Event()  # size known, or failed
        self._progress = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._reserved = 0
        self._fd = -1

    @property
    def fd(self) -> int:
        return self._fd

    def advance(self, count: int) -> None:
        """The prefix grew by `count` bytes, hashed: wake the readers."""
        self.written += count
        self._notify()

    def _notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    async def wait_ready(self) -> None:
        await self.ready.wait()
        if self.state is State.FAILED:
            assert self.error is not None
            raise self.error

    async def run(self) -> None:
        try:
            async with asyncio.timeout(self.store.download_timeout):
                await self._fetch()
        except NotCacheable as exc:
            self._degrade(exc)
        except TimeoutError:  # before OSError, whose subclass it is
            self._fail(DownloadTimedOut())
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
            self._finish()

    async def _fetch(self) -> None:
        """Open the upstream body, reserve its size, fetch it into the temporary file, commit.
        What it acquires is kept on the download, for `_finish` to release whatever happens."""
        policy = self.store.fetch_policy
        first = await self.opener(0)
        try:
            if first.size is None:
                raise NotCacheable("upstream did not send the blob's size")
            self.size = first.size
            self._reserved = await self.store.reserve(first.size)
            self._fd = self._open_temp()
        except BaseException:
            first.close()
            raise
        self.state = State.STREAMING
        self.ready.set()
        ranges, restarts = True, 0
        while True:
            try:
                await BodyFetch(self, first, self.opener, self.origin, policy, ranges=ranges).run()
                break
            except BodyChanged as changed:
                restarts += 1
                if restarts > policy.resume_attempts:
                    raise RegistryError(
                        ErrorCode.UNAVAILABLE, f"upstream blob changed: {changed.why}", status=502
                    ) from None
                log.warning("upstream changed %s mid-download (%s); starting over",
                            self.digest, changed.why)  # fmt: skip
                ranges = ranges and changed.ranges
                self._start_over()
                await asyncio.sleep(policy.backoff(restarts))
                first = await self.opener(0)
                if first.size != self.size:
                    first.close()
                    raise DigestMismatch(self.digest, f"upstream sent {first.size} bytes") from None
        if self.written != self.size:
            raise DigestMismatch(self.digest, f"{self.written} of {self.size} bytes")
        if self.hasher.hexdigest() != self.digest.encoded:
            raise DigestMismatch(self.digest, "digest mismatch")
        self._commit()

    def _start_over(self) -> None:
        """Forget every byte of the previous body: readers holding some are aborted (see
        `read`), the others wait for the new body's."""
        self.generation += 1
        self.hasher = self.digest.hasher()
        self.written = 0
        os.ftruncate(self._fd, 0)
        self._notify()

    def _finish(self) -> None:
        if self._fd >= 0:
            # Only a file this download created, and under its flock: never another
            # process's download of the same digest.
            if self.state is not State.COMPLETE:
                with contextlib.suppress(OSError):
                    os.unlink(self.temp_path)
            os.close(self._fd)  # releases the flock
        self.store.release_reservation(self._reserved)
        self.store.download_finished(self)
        self.ready.set()
        self._notify()

    def _open_temp(self) -> int:
        try:
            fd = os.open(self.temp_path, os.O_RDWR | CREATE_FLAGS, FILE_MODE)
        except FileExistsError:
            # Left by a process that died since start-up's sweep; one being written (its
            # flock held) is not touched, and this download streams through instead.
            if not remove_unlocked(self.temp_path):
                raise
            fd = os.open(self.temp_path, os.O_RDWR | CREATE_FLAGS, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        return fd

    def _commit(self) -> None:
        assert self.size is not None
        self.store.layout.make_shard_dir(self.digest)
        os.rename(self.temp_path, self.final_path)
        self.state = State.COMPLETE
        self.store.add_entry(self.digest, self.size)
        self.store.persist(self.digest)

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, DigestMismatch):
            self.store.count_mismatch(exc)
            log.error("%s", exc.message)
        self.state = State.FAILED
        self.error = exc

    def _degrade(self, exc: BaseException) -> None:
        self.state = State.DEGRADED
        self.error = exc

    def degrade(self, exc: BaseException) -> None:
        """Give up on caching before starting: every reader streams from the upstream."""
        self._degrade(exc)
        self.ready.set()

    async def read(self, start: int, end: int) -> AsyncIterator[tuple[int, int, int]]:
        """Yield `(fd, offset, count)` pieces of bytes `start`..`end` (inclusive) as they land.

        The fd is the reader's own, opened on the temporary file before it can be renamed or
        removed, so it stays valid whatever happens to the path. Raises the download's error
        when it failed; stops early (having yielded up to `written`) when it degraded, and the
        caller continues from upstream.
        """
        fd = self._open_reader()
        generation = self.generation
        try:
            position = start
            while position <= end:
                if self.generation != generation and position > start:
                    raise RegistryError(
                        ErrorCode.UNAVAILABLE, "upstream blob changed mid-download", status=502
                    )
                generation = self.generation
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
