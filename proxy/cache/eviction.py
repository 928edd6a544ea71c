"""The budget, and what may be evicted to keep it: leases, pins, and deletion off the loop.

The budget is hard: the bytes on disk never exceed it, at any instant. Complete blobs, the whole
size of every download in flight (reserved before its first byte is written) and evicted blobs
until their files are really gone all count. Eviction takes the least recently used blob that
nobody is reading (no lease) and nobody pinned; a download waits for its victims' deletion
before it writes. A reader holds an open file descriptor, so even a blob evicted under it (by
an operator) stays readable to the end, and its bytes count until that reader closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from proxy.cache.index import Entry, Index
from proxy.cache.layout import Layout, unlink_quietly
from proxy.oci import Digest

log = logging.getLogger(__name__)


class NoRoom(Exception):
    """The bytes cannot fit: larger than the budget, or everything else is in use."""


class Eviction:
    def __init__(self, index: Index, layout: Layout, budget: int) -> None:
        self.index = index
        self.layout = layout
        self.budget = budget
        self.reserved = 0
        self._leases: Counter[Digest] = Counter()
        # Never evicted (what production runs); their bytes still count against the budget.
        self.pinned: frozenset[Digest] = frozenset()
        # Bytes of evicted blobs still on disk: unlinks under way, and files unlinked while a
        # reader of that digest held them open (freed when the last lease goes).
        self._deleting = 0
        self._held_open: Counter[Digest] = Counter()
        self._deleted = asyncio.Event()  # set, and replaced, each time evicted bytes are freed
        self._deletions: set[asyncio.Task[None]] = set()
        # Unlinking a large file can take a while; a thread of its own, so that frees are not
        # queued behind the fsyncs and hashing in the default pool while downloads wait on them.
        self._unlinker: ThreadPoolExecutor | None = None
        self._trash_names = itertools.count()
        self.evictions = 0
        self.evicted_bytes = 0
        # Told of every digest taken out of the cache (what was recorded of it can go too).
        self.on_evicted: Callable[[Digest], None] | None = None

    @property
    def deleting(self) -> int:
        """Evicted bytes still on disk: being deleted, or held open by a reader."""
        return self._deleting + self._held_open.total()

    # --- leases

    @contextlib.contextmanager
    def lease(self, digest: Digest) -> Iterator[None]:
        """Keep `digest` from eviction while the block runs (someone is reading it)."""
        self._leases[digest] += 1
        try:
            yield
        finally:
            self._leases[digest] -= 1
            if self._leases[digest] <= 0:
                del self._leases[digest]
                if self._held_open.pop(digest, 0):
                    self._freed()  # the last reader closed an evicted blob: its blocks are free

    def held_bytes(self, also: frozenset[Digest] = frozenset()) -> int:
        """Bytes of cached blobs eviction may not take now (leased or pinned), and of `also`."""
        held = self._leases.keys() | self.pinned | also
        return sum(entry.size for digest in held if (entry := self.index.get(digest)) is not None)

    # --- reservations

    async def reserve(self, size: int) -> int:
        """Reserve `size` bytes of the budget: evict to make room, then wait until the evicted
        files are gone from disk, so that the budget holds at every instant."""
        while (reserved := self.try_reserve(size)) is None:
            await self._deleted.wait()
        return reserved

    def try_reserve(self, size: int) -> int | None:
        """Reserve `size` bytes if they are free on disk now; None while evicted files that
        would make the room are still being deleted. Raises NoRoom when there is no room to
        make."""
        if size > self.budget:
            raise NoRoom(f"{size} bytes is larger than the whole cache budget")
        if not self.make_room(size):
            raise NoRoom("everything in the cache is in use")
        if self.index.size + self.reserved + self.deleting + size > self.budget:
            return None
        self.reserved += size
        return size

    def release(self, size: int) -> None:
        self.reserved -= size

    # --- pins

    def pin(self, digests: frozenset[Digest], sizes: dict[Digest, int]) -> None:
        """Replace the pinned set; refused when the pins alone would not fit in the budget.

        `sizes` gives the size of the pinned digests this store accounts for (from manifest
        descriptors), cached or not.
        """
        total = sum(sizes.get(digest, 0) for digest in digests)
        if total > self.budget:
            raise ValueError(
                f"pinned content is {total} bytes, more than the cache budget of {self.budget}"
            )
        self.pinned = digests

    # --- eviction

    def evict(self, digest: Digest) -> bool:
        """Remove one blob from the cache; readers holding it open finish undisturbed."""
        entry = self.index.drop(digest)
        if entry is None:
            return False
        self.delete_later(self.layout.blob_path(digest), digest, entry.size)
        if self.on_evicted is not None:
            self.on_evicted(digest)
        return True

    def make_room(self, incoming: int) -> bool:
        """Evict least recently used, unleased, unpinned blobs until `incoming` more bytes fit
        once the deletions under way are done (files held open by readers stay, so they count)."""
        excess = self.index.size + self.reserved + self._held_open.total() + incoming - self.budget
        if excess <= 0:
            return True
        victims: list[Digest] = []
        for digest, entry in self.index.items():
            if excess <= 0:
                break
            if (
                self._leases.get(digest)
                or digest in self.pinned
                or self._read_elsewhere(digest, entry)
            ):
                continue
            victims.append(digest)
            excess -= entry.size
        if excess > 0:
            return False
        for digest in victims:
            victim = self.index.get(digest)
            if victim is not None and self.evict(digest):
                self.evictions += 1
                self.evicted_bytes += victim.size
        return True

    def _read_elsewhere(self, digest: Digest, entry: Entry) -> bool:
        """Whether another process sharing the directory served this blob since we last did
        (a reader touches the mtime); if so it is as recent as that, and moves to the back."""
        with contextlib.suppress(OSError):
            mtime = self.layout.blob_path(digest).stat().st_mtime
            if mtime > entry.touched + 1:
                entry.touched = mtime
                self.index.used(digest)
                return True
        return False

    # --- deletion

    def delete_later(self, path: Path, digest: Digest | None = None, size: int = 0) -> None:
        """Move a blob out of `blobs/` now (a rename is cheap) and delete it in a thread; its
        `size` counts against the budget until the file is gone (`digest` being one this store
        accounts for, whose readers may keep the file's blocks alive after the unlink).

        The rename first means a new download of the same digest can land at the final path at
        once without a late unlink removing it.
        """
        trash = self.layout.trash_path(next(self._trash_names))
        try:
            path.rename(trash)
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
            await loop.run_in_executor(self._unlinker, unlink_quietly, trash)
        finally:
            self._deleting -= size
            if digest is not None and self._leases.get(digest):
                self._held_open[digest] += size  # a reader still has it open
            self._freed()

    def _freed(self) -> None:
        event, self._deleted = self._deleted, asyncio.Event()
        event.set()

    async def idle(self) -> None:
        while self._deletions:
            await asyncio.gather(*self._deletions, return_exceptions=True)

    def close(self) -> None:
        if self._unlinker is not None:
            self._unlinker.shutdown()
            self._unlinker = None
