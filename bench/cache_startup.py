"""How long the blob store takes to rebuild its index at start-up.

    python -m bench.cache_startup [--blobs 100000]

Writes that many small verified blobs in the cache layout, drops the page cache when allowed
(root), then times `BlobStore.open()` cold and again warm.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

from proxy.cache.store import BlobStore


def populate(root: Path, count: int) -> None:
    for index in range(count):
        data = index.to_bytes(8, "big") * 16
        encoded = hashlib.sha256(data).hexdigest()
        shard = root / "blobs" / "sha256" / encoded[:2]
        shard.mkdir(parents=True, exist_ok=True)
        (shard / encoded).write_bytes(data)


def drop_page_cache() -> bool:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


async def time_open(root: Path) -> tuple[float, int]:
    store = BlobStore(root, 10**15)
    started = time.monotonic()
    await store.open()
    elapsed = time.monotonic() - started
    await store.close()
    return elapsed, store.stats().entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blobs", type=int, default=100_000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cache-startup-"))
    try:
        started = time.monotonic()
        populate(root, args.blobs)
        print(f"wrote {args.blobs} blobs in {time.monotonic() - started:.1f} s")
        dropped = drop_page_cache()
        cold, entries = asyncio.run(time_open(root))
        warm, _ = asyncio.run(time_open(root))
        label = "cold page cache" if dropped else "page cache not dropped (not root)"
        print(f"index of {entries} blobs rebuilt in {cold:.2f} s ({label}), {warm:.2f} s warm")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
