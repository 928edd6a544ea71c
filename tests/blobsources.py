"""In-memory blob sources for driving the blob store without HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

from proxy.cache.download import BlobSource
from proxy.oci import Digest


def random_blob(size: int) -> tuple[Digest, bytes]:
    data = os.urandom(size)
    return Digest("sha256", hashlib.sha256(data).hexdigest()), data


def numbered_blob(number: int, size: int) -> tuple[Digest, bytes]:
    """Blob `number` of `size` bytes: the same bytes on every run, distinct for each number."""
    seed = hashlib.sha256(f"blob {number} of {size} bytes".encode()).digest()
    data = (seed * (size // len(seed) + 1))[:size]
    return Digest("sha256", hashlib.sha256(data).hexdigest()), data


class MemorySource:
    """Serves `data` from `offset` in chunks; can pause at a byte count until released."""

    validator: str | None = None
    accepts_ranges = False

    def __init__(
        self,
        data: bytes,
        offset: int = 0,
        *,
        size: int | None = -1,
        chunk: int = 64 * 1024,
        pause_at: int | None = None,
        paused: asyncio.Event | None = None,
        release: asyncio.Event | None = None,
    ) -> None:
        self.data = data
        self.offset = offset
        self._size = len(data) if size == -1 else size
        self.chunk = chunk
        self.pause_at = pause_at
        self.paused = paused
        self.release = release
        self.closed = False

    @property
    def size(self) -> int | None:
        return self._size

    def socket_body(self) -> None:
        return None  # bytes from memory, as aiohttp hands them over

    async def chunks(self) -> AsyncIterator[bytes]:
        position = self.offset
        while position < len(self.data):
            if self.pause_at is not None and position >= self.pause_at:
                assert self.paused is not None
                assert self.release is not None
                self.paused.set()
                await self.release.wait()
                self.pause_at = None
            end = min(position + self.chunk, len(self.data))
            if self.pause_at is not None and position < self.pause_at < end:
                end = self.pause_at
            yield self.data[position:end]
            position = end

    def close(self) -> None:
        self.closed = True


class CountingOpener:
    """An `Opener` that records each open and hands out `MemorySource`s of `data`."""

    def __init__(self, data: bytes, **source_options: object) -> None:
        self.data = data
        self.options = source_options
        self.offsets: list[int] = []

    async def __call__(self, offset: int) -> BlobSource:
        self.offsets.append(offset)
        return MemorySource(self.data, offset, **self.options)  # type: ignore[arg-type]
