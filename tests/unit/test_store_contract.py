"""The store's contract: every case runs against the one-process `BlobStore` and against a
worker's `ShardedStore` (`proxy.workers.sharding`), which must behave the same for the digests
it owns. The sharded store is worker 0 of 2, given twice the budget (its share is half)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from blobsources import CountingOpener, random_blob

from proxy.cache.download import State
from proxy.cache.store import BlobStore
from proxy.errors import DigestMismatch
from proxy.oci import Digest
from proxy.workers.sharding import ShardedStore
from proxy.workers.supervisor import Worker

BUDGET = 1_000_000
WORKERS = 2


@dataclass
class Subject:
    """A store under test and how to make another one over the same directory."""

    store: BlobStore
    reopen: Callable[[], BlobStore]

    def blob(self, size: int) -> tuple[Digest, bytes]:
        """Random content whose digest this store owns."""
        while True:
            digest, data = random_blob(size)
            if self.store.claims(digest):
                return digest, data


def single(root: Path) -> BlobStore:
    return BlobStore(root, BUDGET)


def sharded(root: Path) -> BlobStore:
    return ShardedStore(root, BUDGET * WORKERS, Worker(0, WORKERS, root / "run"))


@pytest.fixture(params=[single, sharded], ids=["single", "sharded"])
async def subject(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Subject]:
    make: Callable[[Path], BlobStore] = request.param
    root = tmp_path / "cache"
    store = make(root)
    await store.open()
    yield Subject(store, lambda: make(root))
    await store.close()


async def download(store: BlobStore, digest: Digest, data: bytes) -> None:
    fetch, started = store.download(digest, CountingOpener(data))
    assert started
    assert fetch.task is not None
    await fetch.task
    assert fetch.state is State.COMPLETE


def read(store: BlobStore, digest: Digest) -> bytes | None:
    with store.open_blob(digest) as opened:
        if opened is None:
            return None
        fd, size = opened
        return os.pread(fd, size, 0)


async def test_the_budget_is_the_one_given(subject: Subject) -> None:
    assert subject.store.budget == BUDGET
    assert subject.store.stats().size == 0


async def test_a_download_lands_verified_at_its_digest_path(subject: Subject) -> None:
    store = subject.store
    digest, data = subject.blob(200_000)
    await download(store, digest, data)

    assert digest in store
    assert read(store, digest) == data
    assert store.blob_path(digest).read_bytes() == data
    assert list(store.temp_dir.iterdir()) == []
    assert store.stats().size == len(data)
    assert store.stats().entries == 1


async def test_a_small_blob_is_put_and_read_back(subject: Subject) -> None:
    store = subject.store
    digest, data = subject.blob(2_000)
    store.put_small(digest, data)
    await store.idle()

    assert store.read_small(digest) == data
    assert store.read_small(digest, limit=1_000) is None
    assert store.blob_path(digest).read_bytes() == data


async def test_bytes_that_do_not_match_their_digest_are_refused(subject: Subject) -> None:
    store = subject.store
    digest, data = subject.blob(2_000)
    with pytest.raises(DigestMismatch):
        store.put_small(digest, data + b"x")
    await store.idle()

    assert digest not in store
    assert not store.blob_path(digest).exists()


async def test_verify_evicts_what_rotted_on_disk_and_keeps_the_rest(subject: Subject) -> None:
    store = subject.store
    good, good_data = subject.blob(50_000)
    bad, bad_data = subject.blob(50_000)
    await download(store, good, good_data)
    await download(store, bad, bad_data)
    path = store.blob_path(bad)
    os.chmod(path, 0o644)
    path.write_bytes(b"\0" + bad_data[1:])

    assert await store.verify() == [bad]
    await store.idle()
    assert bad not in store
    assert not path.exists()
    assert read(store, good) == good_data


async def test_a_corrupt_small_blob_is_never_returned(subject: Subject) -> None:
    store = subject.store
    digest, data = subject.blob(2_000)
    store.put_small(digest, data)
    await store.idle()
    path = store.blob_path(digest)
    os.chmod(path, 0o644)
    path.write_bytes(b"\0" + data[1:])

    assert store.read_small(digest) is None
    await store.idle()
    assert not path.exists()


async def test_an_evicted_blob_is_gone_from_the_index_and_the_disk(subject: Subject) -> None:
    store = subject.store
    digest, data = subject.blob(100_000)
    await download(store, digest, data)

    assert store.evict(digest)
    assert not store.evict(digest)
    await store.idle()
    assert digest not in store
    assert read(store, digest) is None
    assert not store.blob_path(digest).exists()
    assert store.stats().size == 0


async def test_over_the_budget_the_least_recently_used_go_first(subject: Subject) -> None:
    store = subject.store
    blobs = [subject.blob(300_000) for _ in range(4)]
    for digest, data in blobs[:3]:
        await download(store, digest, data)
    assert read(store, blobs[0][0]) is not None  # the first is now more recent than the second

    await download(store, *blobs[3])
    await store.idle()
    assert [digest in store for digest, _ in blobs] == [True, False, True, True]
    assert store.stats().size <= store.budget
    assert store.evictions == 1


async def test_pinned_blobs_are_never_evicted_to_make_room(subject: Subject) -> None:
    store = subject.store
    blobs = [subject.blob(300_000) for _ in range(4)]
    pinned = blobs[0][0]
    store.pin(frozenset({pinned}), {pinned: 300_000})
    assert store.pinned == frozenset({pinned})
    for digest, data in blobs:
        await download(store, digest, data)
    await store.idle()

    assert pinned in store
    assert blobs[1][0] not in store
    assert store.stats().size <= store.budget


async def test_pins_larger_than_the_budget_are_refused(subject: Subject) -> None:
    store = subject.store
    digest, _ = subject.blob(10)
    with pytest.raises(ValueError, match="budget"):
        store.pin(frozenset({digest}), {digest: BUDGET + 1})
    assert store.pinned == frozenset()


async def test_a_new_store_over_the_directory_finds_what_was_cached(subject: Subject) -> None:
    digest, data = subject.blob(100_000)
    small, small_data = subject.blob(1_000)
    await download(subject.store, digest, data)
    subject.store.put_small(small, small_data)
    await subject.store.idle()

    again = subject.reopen()
    await again.open()
    try:
        assert digest in again
        assert small in again
        assert again.stats().size == len(data) + len(small_data)
        await again.ensure_verified(digest)
        assert read(again, digest) == data
        assert again.read_small(small) == small_data
    finally:
        await again.close()
