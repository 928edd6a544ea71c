"""The budget is hard: the bytes on disk never exceed it, at any instant, under concurrent pulls.

The disk only grows when a download or a manifest write puts bytes in a file, so the test
measures the whole cache directory right after every one of those writes (the sources below
run between the store's writes, with nothing else in between) instead of sampling on a timer.
Evicted files count until they are gone; downloads count for their whole size from the start.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from blobsources import MemorySource, numbered_blob

from proxy.cache.download import BlobSource, State
from proxy.cache.store import BlobStore
from proxy.oci import Digest

BUDGET = 2_000_000


@dataclass
class DiskWatch:
    """Measures the cache directory on demand and remembers what broke the rules."""

    store: BlobStore
    samples: int = 0
    peak: int = 0
    over_budget: list[int] = field(default_factory=list)
    unaccounted: list[tuple[int, int]] = field(default_factory=list)

    def measure(self) -> None:
        on_disk = 0
        for directory, _, files in os.walk(self.store.root):
            for name in files:
                try:
                    on_disk += os.lstat(os.path.join(directory, name)).st_size
                except FileNotFoundError:
                    continue  # deleted by the store's thread while we walked
        stats = self.store.stats()
        accounted = stats.size + stats.reserved + stats.deleting
        self.samples += 1
        self.peak = max(self.peak, on_disk)
        if on_disk > self.store.budget:
            self.over_budget.append(on_disk)
        if on_disk > accounted:
            self.unaccounted.append((on_disk, accounted))


class WatchedSource(MemorySource):
    """A blob body that measures the disk after each chunk the store has written."""

    def __init__(self, watch: DiskWatch, data: bytes, offset: int) -> None:
        super().__init__(data, offset, chunk=32 * 1024)
        self.watch = watch

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in super().chunks():
            self.watch.measure()  # the store wrote the previous chunk: the disk is at a peak
            yield chunk
            await asyncio.sleep(0)  # let the other downloads and the deletions interleave
        self.watch.measure()


async def pull(store: BlobStore, watch: DiskWatch, digest: Digest, data: bytes) -> None:
    """What `BlobService.serve` does for one GET: a hit, or the shared download read to the end."""
    with store.open_blob(digest) as cached:
        if cached is not None:
            assert os.pread(cached[0], cached[1], 0) == data
            return

    async def opener(offset: int) -> BlobSource:
        return WatchedSource(watch, data, offset)

    download, _ = store.download(digest, opener)
    with store.lease(digest):
        await download.wait_ready()
        assert download.size == len(data)
        received = bytearray()
        async for fd, offset, count in download.read(0, len(data) - 1):
            received += os.pread(fd, count, offset)
    if download.state is State.COMPLETE:
        assert bytes(received) == data


async def test_concurrent_pulls_above_the_budget_never_put_more_than_it_on_disk(
    tmp_path: Path,
) -> None:
    store = BlobStore(tmp_path / "cache", BUDGET)
    await store.open()
    watch = DiskWatch(store)
    # 16 blobs of 150-600 kB: about three times the budget, pulled in overlapping waves.
    blobs = [numbered_blob(n, 150_000 + (n * 37_000) % 450_000) for n in range(16)]
    manifests = [numbered_blob(1000 + n, 20_000) for n in range(8)]
    for wave in range(6):
        chosen = [blobs[(wave * 5 + k * 3) % len(blobs)] for k in range(7)]
        pulls = [pull(store, watch, digest, data) for digest, data in chosen + chosen[:3]]
        puts = asyncio.gather(*pulls)
        digest, data = manifests[wave]
        store.put_small(digest, data)
        watch.measure()
        await puts
        watch.measure()
    await store.close()
    watch.measure()

    assert store.evictions > 10  # the workload did press on the budget
    assert watch.samples > 300
    assert watch.over_budget == [], f"peak {watch.peak} bytes on a {BUDGET} byte budget"
    assert watch.unaccounted == []
    assert watch.peak > BUDGET * 0.8


async def test_an_evicted_blob_still_open_by_a_reader_counts_until_the_reader_closes(
    tmp_path: Path,
) -> None:
    store = BlobStore(tmp_path, 300_000)
    await store.open()
    digest, data = numbered_blob(1, 200_000)
    store.put_small(digest, data)
    with store.open_blob(digest) as opened:
        assert opened is not None
        store.evict(digest)  # an operator evicts it while a client is reading it
        await store.idle()
        # Unlinked, but its blocks are still in use: only 100 kB of room, not 300 kB.
        assert store.stats().deleting == 200_000
        other, other_data = numbered_blob(2, 150_000)
        store.put_small(other, other_data)
        await store.idle()
        assert other not in store
        assert os.pread(opened[0], opened[1], 0) == data
    assert store.stats().deleting == 0
    store.put_small(other, other_data)
    await store.idle()
    assert other in store
