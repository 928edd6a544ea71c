"""The blob store on its own: downloads, verification, single flight, LRU, restart."""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from blobsources import CountingOpener, MemorySource, random_blob

from proxy.cache.download import BlobSource, Download, State
from proxy.cache.fetch import MAX_BACKLOG, MIN_BATCH, DiskLane, Part
from proxy.cache.store import BlobStore
from proxy.errors import DigestMismatch
from proxy.oci import Digest


async def read_all(download: Download, start: int = 0, end: int | None = None) -> bytes:
    await download.wait_ready()
    assert download.size is not None
    end = download.size - 1 if end is None else end
    out = bytearray()
    async for fd, offset, count in download.read(start, end):
        out += os.pread(fd, count, offset)
    return bytes(out)


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


@pytest.fixture
async def store(tmp_path: Path) -> BlobStore:
    store = BlobStore(tmp_path / "cache", 10 * 1024 * 1024)
    await store.open()
    return store


async def test_a_download_is_verified_and_lands_at_its_digest_path(store: BlobStore) -> None:
    digest, data = random_blob(300_000)
    download, started = store.download(digest, CountingOpener(data))
    assert started

    assert await read_all(download) == data
    assert download.task is not None
    await download.task
    assert download.state is State.COMPLETE
    assert store.blob_path(digest).read_bytes() == data
    assert digest in store
    assert files_under(store.temp_dir) == []


async def test_concurrent_requests_share_one_download_and_read_while_it_streams(
    store: BlobStore,
) -> None:
    digest, data = random_blob(1_000_000)
    paused, release = asyncio.Event(), asyncio.Event()
    opener = CountingOpener(data, pause_at=400_000, paused=paused, release=release)

    first, started_first = store.download(digest, opener)
    second, started_second = store.download(digest, opener)
    assert started_first
    assert not started_second
    assert second is first

    await paused.wait()
    # The download is stuck half way, yet a reader already gets the bytes that landed.
    early = await anext(aiter(first.read(0, len(data) - 1)))
    assert early[1] == 0
    assert 0 < early[2] <= 400_000
    assert first.state is State.STREAMING

    readers = [asyncio.create_task(read_all(first)) for _ in range(10)]
    ranged = asyncio.create_task(read_all(first, 350_000, 450_000))
    release.set()
    assert all(body == data for body in await asyncio.gather(*readers))
    assert await ranged == data[350_000:450_001]
    assert opener.offsets == [0]


async def test_a_lying_upstream_leaves_nothing_cached_and_readers_fail(store: BlobStore) -> None:
    digest, data = random_blob(200_000)
    lie = bytearray(data)
    lie[1000] ^= 0xFF
    download, _ = store.download(digest, CountingOpener(bytes(lie)))

    with pytest.raises(DigestMismatch):
        await read_all(download)
    assert download.state is State.FAILED
    assert digest not in store
    assert files_under(store.root) == []
    assert store.digest_mismatches == 1

    retry, started = store.download(digest, CountingOpener(data))
    assert started
    assert await read_all(retry) == data


async def test_a_truncated_body_is_not_cached(store: BlobStore) -> None:
    digest, data = random_blob(200_000)
    download, _ = store.download(digest, CountingOpener(data[:150_000], size=len(data)))
    with pytest.raises(DigestMismatch):
        await read_all(download)
    assert digest not in store
    assert files_under(store.root) == []


async def test_a_download_outlives_its_first_reader(store: BlobStore) -> None:
    digest, data = random_blob(500_000)
    paused, release = asyncio.Event(), asyncio.Event()
    download, _ = store.download(
        digest, CountingOpener(data, pause_at=100_000, paused=paused, release=release)
    )
    reader = asyncio.create_task(read_all(download))
    await paused.wait()
    reader.cancel()  # the client went away
    release.set()
    assert download.task is not None
    await download.task
    assert store.blob_path(digest).read_bytes() == data


async def test_readers_get_the_last_byte_before_the_fsync_which_follows_in_the_background(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A disk that takes its time to sync: the fsync blocks until the test lets it go.
    disk = threading.Event()
    synced: list[tuple[int, int]] = []

    def slow_fsync(fd: int) -> None:
        assert disk.wait(timeout=30)
        info = os.fstat(fd)
        synced.append((info.st_dev, info.st_ino))

    monkeypatch.setattr(os, "fsync", slow_fsync)
    digest, data = random_blob(300_000)
    download, _ = store.download(digest, CountingOpener(data))

    assert await asyncio.wait_for(read_all(download), timeout=10) == data
    assert download.task is not None
    await asyncio.wait_for(download.task, timeout=10)
    assert download.state is State.COMPLETE
    assert digest in store  # a hit from now on, its bytes verified
    assert synced == []

    disk.set()
    await store.idle()
    # The file, then the directory whose entry the rename made: both survive a power cut.
    landed, entry = store.blob_path(digest).stat(), store.blob_path(digest).parent.stat()
    assert synced == [(landed.st_dev, landed.st_ino), (entry.st_dev, entry.st_ino)]


async def test_syncs_waiting_on_a_slow_disk_never_hold_up_later_downloads(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = threading.Event()

    def stuck_fsync(fd: int) -> None:
        assert disk.wait(timeout=30)

    monkeypatch.setattr(os, "fsync", stuck_fsync)
    # More committed blobs than the default thread pool has threads (at most 32): their syncs
    # wait, and every download still writes and lands.
    for _ in range(40):
        digest, data = random_blob(20_000)
        download, _ = store.download(digest, CountingOpener(data))
        assert download.task is not None
        await asyncio.wait_for(download.task, timeout=10)
        assert download.state is State.COMPLETE
    disk.set()
    await store.idle()


async def test_a_blob_larger_than_the_budget_is_not_cached(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, 100_000)
    await store.open()
    digest, data = random_blob(200_000)
    download, _ = store.download(digest, CountingOpener(data))
    await download.wait_ready()
    assert download.task is not None
    await download.task
    assert download.state is State.DEGRADED
    assert digest not in store
    assert files_under(store.root) == []


async def put(store: BlobStore, size: int) -> Digest:
    """Store a blob; when it needs room, it lands once its victims are deleted from disk."""
    digest, data = random_blob(size)
    store.put_small(digest, data)
    await store.idle()
    return digest


async def test_the_least_recently_used_blob_is_evicted_first(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, 300_000)
    await store.open()
    a, b, c = await put(store, 100_000), await put(store, 100_000), await put(store, 100_000)
    with store.open_blob(a) as hit:
        assert hit is not None  # a is now the most recent

    d = await put(store, 100_000)
    assert b not in store
    assert {a, c, d} <= {x for x in (a, b, c, d) if x in store}
    assert store.stats().size == 300_000
    await store.close()
    assert not store.blob_path(b).exists()


async def test_a_blob_being_read_is_passed_over_and_survives_eviction(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, 200_000)
    await store.open()
    digest, data = random_blob(100_000)
    store.put_small(digest, data)
    other = await put(store, 100_000)
    with store.open_blob(digest) as opened:
        assert opened is not None
        fd, size = opened
        await put(store, 100_000)  # must evict, and the leased blob is passed over
        assert digest in store
        assert other not in store
        store.evict(digest)  # an operator evicts it anyway: the reader is undisturbed
        await store.close()
        assert os.pread(fd, size, 0) == data
    assert digest not in store


async def test_restart_rebuilds_the_index_in_recency_order_and_drops_partials(
    tmp_path: Path,
) -> None:
    store = BlobStore(tmp_path, 300_000)
    await store.open()
    old, new = await put(store, 100_000), await put(store, 100_000)
    past = time.time() - 3600
    os.utime(store.blob_path(old), (past, past))
    abandoned = store.temp_dir / "sha256-abandoned"
    abandoned.write_bytes(b"partial")
    live = store.temp_dir / "sha256-live"
    live.write_bytes(b"being written by another process")
    holder = os.open(live, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)

    restarted = BlobStore(tmp_path, 200_000)
    await restarted.open()
    os.close(holder)

    assert not abandoned.exists()
    assert live.exists()
    assert new in restarted
    assert old in restarted
    await put(restarted, 100_000)  # over budget: the older blob goes first
    assert old not in restarted
    assert new in restarted


async def test_a_file_corrupted_on_disk_is_never_served_as_a_manifest(store: BlobStore) -> None:
    digest, data = random_blob(1000)
    store.put_small(digest, data)
    path = store.blob_path(digest)
    path.write_bytes(b"X" + data[1:])
    assert store.read_small(digest) is None
    assert digest not in store


async def test_pinned_blobs_survive_eviction_pressure(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, 300_000)
    await store.open()
    pinned = await put(store, 100_000)
    store.pin(frozenset({pinned}), {pinned: 100_000})
    for _ in range(5):
        await put(store, 100_000)
    assert pinned in store
    assert store.stats().size <= 300_000


async def test_a_pin_set_larger_than_the_budget_is_refused(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, 300_000)
    await store.open()
    digest, _ = random_blob(10)
    with pytest.raises(ValueError, match="more than the cache budget"):
        store.pin(frozenset({digest}), {digest: 400_000})
    assert store.pinned == frozenset()


async def test_verify_evicts_blobs_corrupted_on_disk(store: BlobStore) -> None:
    good, bad = await put(store, 5000), await put(store, 5000)
    path = store.blob_path(bad)
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01  # a single bit flip
    path.write_bytes(bytes(data))
    assert await store.verify() == [bad]
    assert bad not in store
    assert good in store


async def test_a_blob_changed_on_disk_while_stopped_is_caught_on_its_first_read(
    tmp_path: Path,
) -> None:
    store = BlobStore(tmp_path, 1_000_000)
    await store.open()
    good, bad = await put(store, 5000), await put(store, 5000)
    path = store.blob_path(bad)
    data = bytearray(path.read_bytes())
    data[4999] ^= 0x80
    path.write_bytes(bytes(data))

    restarted = BlobStore(tmp_path, 1_000_000)
    await restarted.open()
    await asyncio.gather(*(restarted.ensure_verified(bad) for _ in range(3)))
    await restarted.ensure_verified(good)
    assert bad not in restarted
    assert good in restarted


def mode(path: Path) -> int:
    return path.lstat().st_mode & 0o777


async def test_cache_files_are_0600_and_directories_0700_whatever_the_umask(
    tmp_path: Path,
) -> None:
    previous = os.umask(0)  # the most permissive umask: modes must come from the mirror itself
    try:
        store = BlobStore(tmp_path / "cache", 10 * 1024 * 1024)
        await store.open()
        digest, data = random_blob(300_000)
        download, _ = store.download(digest, CountingOpener(data))
        assert await read_all(download) == data
        manifest = await put(store, 1000)
    finally:
        os.umask(previous)
    for directory in (store.root, store.blobs_dir, store.temp_dir, store.blob_path(digest).parent):
        assert mode(directory) == 0o700, directory
    assert mode(store.blob_path(digest).parent.parent) == 0o700
    assert mode(store.blob_path(digest)) == 0o600
    assert mode(store.blob_path(manifest)) == 0o600


async def test_a_cache_written_by_an_older_release_is_read_and_closed_to_other_users(
    tmp_path: Path,
) -> None:
    """Older releases left 0755 directories and 0644 files: still served, no longer reachable."""
    digest, data = random_blob(5000)
    old = BlobStore(tmp_path, 1_000_000)
    path = old.blob_path(digest)
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    for made in (path, *path.parents):
        if made == tmp_path:
            break
        made.chmod(0o755 if made.is_dir() else 0o644)
    (tmp_path / "tmp").mkdir(0o755)

    store = BlobStore(tmp_path, 1_000_000)
    await store.open()
    assert store.read_small(digest) == data
    assert mode(store.blobs_dir) == mode(store.temp_dir) == 0o700


async def test_a_symlink_planted_at_a_download_path_is_never_written_through(
    store: BlobStore, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"not the mirror's to overwrite")
    digest, data = random_blob(100_000)
    store.temp_path(digest).symlink_to(victim)

    download, _ = store.download(digest, CountingOpener(data))
    assert await read_all(download) == data
    assert download.task is not None
    await download.task
    assert victim.read_bytes() == b"not the mirror's to overwrite"
    assert store.blob_path(digest).read_bytes() == data
    assert not store.blob_path(digest).is_symlink()


async def test_a_temporary_file_another_process_is_writing_is_left_alone(
    store: BlobStore,
) -> None:
    digest, data = random_blob(100_000)
    temp = store.temp_path(digest)
    temp.write_bytes(b"another process's partial download")
    holder = os.open(temp, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        download, _ = store.download(digest, CountingOpener(data))
        assert download.task is not None
        await download.task
        assert download.state is State.DEGRADED  # its readers continue from upstream
        assert temp.read_bytes() == b"another process's partial download"
        assert digest not in store
    finally:
        os.close(holder)


class TallyingSource(MemorySource):
    """A `MemorySource` that counts the bytes taken from it."""

    taken = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in super().chunks():
            self.taken += len(chunk)
            yield chunk


async def test_a_download_holds_at_most_its_backlog_in_memory_while_the_disk_is_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest, data = random_blob(3 * MAX_BACKLOG)
    store = BlobStore(tmp_path, 4 * len(data))
    await store.open()
    writing, disk = threading.Event(), threading.Event()
    pwritev = os.pwritev

    def slow_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        writing.set()
        assert disk.wait(timeout=30)
        return pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", slow_pwritev)
    chunk = 256 * 1024
    sources: list[TallyingSource] = []

    async def opener(offset: int) -> BlobSource:
        sources.append(TallyingSource(data, offset, chunk=chunk))
        return sources[-1]

    download, _ = store.download(digest, opener)
    # The download reads on, without giving the loop back, until it waits for the disk.
    assert await asyncio.to_thread(writing.wait, 10)
    assert MIN_BATCH <= sources[0].taken <= MAX_BACKLOG + chunk

    disk.set()
    assert await read_all(download) == data
    assert download.task is not None
    await download.task
    assert store.blob_path(digest).read_bytes() == data


class LaneHost:
    """What a `DiskLane` uses of its download."""

    def __init__(self, fd: int, digest: Digest) -> None:
        self.fd = fd
        self.hasher = digest.hasher()
        self.written = 0

    def advance(self, count: int) -> None:
        self.written += count


@pytest.mark.parametrize("chunk", [100_000, 3 * 1024 * 1024])
async def test_parts_written_out_of_order_are_hashed_once_the_prefix_reaches_them(
    tmp_path: Path, chunk: int
) -> None:
    digest, data = random_blob(7_000_000)
    fd = os.open(tmp_path / "blob", os.O_RDWR | os.O_CREAT, 0o600)
    host = LaneHost(fd, digest)
    parts = [Part(0, 2_000_000), Part(2_000_000, len(data))]
    lane = DiskLane(host, parts)  # type: ignore[arg-type]
    try:
        for part in reversed(parts):  # the later part lands first, read back to be hashed
            while part.position < part.end:
                piece = data[part.position : min(part.position + chunk, part.end)]
                lane.write(part, piece)
                part.position += len(piece)
            await lane.drain()
            if part.start:
                assert host.written == 0  # on disk, but not contiguous from byte 0
        await lane.finish()
    finally:
        await lane.stop()
        os.close(fd)
    assert host.hasher.hexdigest() == digest.encoded
    assert (tmp_path / "blob").read_bytes() == data
