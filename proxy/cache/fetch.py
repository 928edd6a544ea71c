"""Fetching one blob body into a download's temporary file (issue 15).

A connection that breaks before its last byte (reset, truncation, a stall past `read_timeout`)
is continued from the byte it reached with `Range: bytes=<reached>-`, after a short backoff,
the hash state kept; only `resume_attempts` attempts in a row without a new byte are made, and
the whole download stays within `download_timeout`. A blob larger than `parallel_threshold`
whose upstream takes Range requests is fetched as `parallel_parts` ranged requests at once,
each written at its offset and each resumed like a whole blob. Hashing follows the contiguous
prefix from byte 0, and readers are given that prefix only (see `proxy.cache.download`).

A resumed request answered with the whole body (200), another size or another validator
(ETag, Last-Modified) is a different body: `BodyChanged` makes the download start over, and two
bodies are never spliced.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from proxy.config import Settings
from proxy.errors import DigestMismatch, RangeIgnored, RegistryError

if TYPE_CHECKING:
    from proxy.cache.download import BlobSource, Download

log = logging.getLogger(__name__)

MiB: Final = 1024 * 1024
# Bytes of later parts, already on disk, read back and hashed off the loop at a time.
HASH_SLICE: Final = 8 * MiB
MAX_BACKOFF: Final = 5.0
# No part smaller than this: below it another connection costs more than it brings.
MIN_PART: Final = MiB


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    """How a blob body is fetched: the resume and parallel-download settings."""

    resume_attempts: int = Settings.resume_attempts
    resume_backoff: float = Settings.resume_backoff
    parallel_threshold: int = Settings.parallel_download_threshold
    parallel_parts: int = Settings.parallel_download_parts

    def parts(self, size: int, *, ranges: bool) -> list[Part]:
        """The byte ranges of a blob of `size` bytes: one, unless it is large and the upstream
        takes Range requests."""
        count = 1
        if ranges and size > self.parallel_threshold:
            count = max(1, min(self.parallel_parts, size // MIN_PART))
        bounds = [size * i // count for i in range(count + 1)]
        return [Part(bounds[i], bounds[i + 1]) for i in range(count)]

    def backoff(self, failures: int) -> float:
        return float(min(self.resume_backoff * 2 ** (failures - 1), MAX_BACKOFF))


DEFAULT_FETCH_POLICY: Final = FetchPolicy()


class RangeOrigin(Protocol):
    """Where a download opens ranges of its blob, and counts its resumes."""

    async def open_range(self, start: int, end: int) -> BlobSource: ...

    def resumed(self) -> None: ...


@dataclass(slots=True)
class Part:
    start: int
    end: int  # exclusive
    position: int = -1

    def __post_init__(self) -> None:
        if self.position < 0:
            self.position = self.start


class BodyChanged(Exception):
    """The upstream answered a resumed or ranged request with another body than the first."""

    def __init__(self, why: str, *, ranges: bool = True) -> None:
        super().__init__(why)
        self.why = why
        # False when the upstream ignored Range: start over on one connection.
        self.ranges = ranges


class ShortBody(Exception):
    """A stream that ended cleanly before its part's last byte."""


class BodyFetch:
    """One attempt at a whole body: its parts, each resumed, into the download's file."""

    def __init__(
        self,
        download: Download,
        first: BlobSource,
        opener: Callable[[int], Awaitable[BlobSource]],
        origin: RangeOrigin | None,
        policy: FetchPolicy,
        *,
        ranges: bool = True,
    ) -> None:
        assert download.size is not None
        self.download = download
        self.size = download.size
        self.opener = opener
        self.origin = origin
        self.policy = policy
        self.validator = first.validator
        self.parts = policy.parts(
            self.size, ranges=ranges and origin is not None and first.accepts_ranges
        )
        self._first: BlobSource | None = first
        self._catching_up = False

    async def run(self) -> None:
        """Fetch every part; on return bytes 0..size are on disk and hashed (not yet checked)."""
        tasks = [asyncio.create_task(self._fetch_part(part)) for part in self.parts]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if (error := task.exception()) is not None:
                    raise error
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._first is not None:  # cancelled before the first part took it
                self._first.close()
        await self._catch_up()

    async def _fetch_part(self, part: Part) -> None:
        stream: BlobSource | None = None
        if part.start == 0:
            stream, self._first = self._first, None
        failures = 0
        error: BaseException | None = None
        while part.position < part.end or stream is not None:
            if stream is None:
                if failures:
                    self._resumed(part, failures, error)
                    await asyncio.sleep(self.policy.backoff(failures))
                try:
                    stream = await self._open(part)
                except RangeIgnored as exc:
                    raise BodyChanged(exc.message, ranges=False) from None
                except DigestMismatch:
                    raise
                except RegistryError as exc:
                    failures, error = self._failed(failures, exc)
                    continue
            before = part.position
            try:
                await self._copy(stream, part)
            except DigestMismatch:
                raise
            except (RegistryError, ShortBody) as exc:
                error = exc
            finally:
                stream.close()
                stream = None
            if part.position < part.end:
                failures, error = self._failed(0 if part.position > before else failures, error)

    def _failed(self, failures: int, error: BaseException | None) -> tuple[int, BaseException]:
        """Count an attempt without progress; past `resume_attempts`, give up with its error."""
        failures += 1
        if error is None:
            error = ShortBody()
        if failures > self.policy.resume_attempts:
            if isinstance(error, ShortBody):
                written = self.download.written
                raise DigestMismatch(self.download.digest, f"{written} of {self.size} bytes")
            raise error
        return failures, error

    def _resumed(self, part: Part, failures: int, error: BaseException | None) -> None:
        log.info(
            "resuming %s at byte %d of %d (attempt %d): %s",
            self.download.digest, part.position, self.size, failures, error or "ended early",
        )  # fmt: skip
        if self.origin is not None:
            self.origin.resumed()

    async def _open(self, part: Part) -> BlobSource:
        if part.end < self.size and self.origin is not None:
            stream = await self.origin.open_range(part.position, part.end)
        else:
            stream = await self.opener(part.position)
        if stream.size != self.size:
            stream.close()
            raise BodyChanged(f"the blob's size changed from {self.size} to {stream.size}")
        if self.validator and stream.validator and stream.validator != self.validator:
            stream.close()
            raise BodyChanged(f"its validator changed from {self.validator} to {stream.validator}")
        return stream

    async def _copy(self, stream: BlobSource, part: Part) -> None:
        fd = self.download.fd
        async for chunk in stream.chunks():
            room = part.end - part.position
            if len(chunk) > room:
                if part.end == self.size:
                    raise DigestMismatch(self.download.digest, "more bytes than its Content-Length")
                chunk = chunk[:room]  # the first part reads a whole-body stream up to its end
            offset, download = part.position, self.download
            # Bytes that extend the verified prefix are hashed as they are written, both in a
            # thread (hashlib and pwrite release the GIL): the loop goes on reading the socket.
            hasher = download.hasher if offset == download.written else None
            if self._catching_up:
                hasher = None
            await _off_loop(_write, fd, chunk, offset, hasher)
            part.position += len(chunk)
            if hasher is not None and hasher is download.hasher:
                download.advance(len(chunk))
            if self._frontier() > download.written:
                await self._catch_up()
            if part.position >= part.end:
                return
        if part.position < part.end:
            raise ShortBody()

    def _frontier(self) -> int:
        """Where the bytes on disk stop being contiguous from the start of the blob."""
        written = self.download.written
        for part in self.parts:
            if part.start <= written < part.end:
                return part.position
        return written

    async def _catch_up(self) -> None:
        if self._catching_up:
            return
        download = self.download
        self._catching_up = True
        try:
            while (frontier := self._frontier()) > download.written:
                count = min(frontier - download.written, HASH_SLICE)
                hasher = download.hasher
                await _off_loop(_hash_range, hasher, download.fd, download.written, count)
                if hasher is not download.hasher:
                    return  # the download started over meanwhile
                download.advance(count)
        finally:
            self._catching_up = False


async def _off_loop(work: Callable[..., None], *args: Any) -> None:
    """Run `work` in a thread and wait for it even when cancelled: it writes to the download's
    file descriptor, which must not be closed (and its number reused) while it does."""
    running = asyncio.ensure_future(asyncio.to_thread(work, *args))
    try:
        await asyncio.shield(running)
    except asyncio.CancelledError:
        await asyncio.wait([running])
        raise


def _write(fd: int, chunk: bytes, offset: int, hasher: Any) -> None:
    view = memoryview(chunk)
    while view:
        written = os.pwrite(fd, view, offset)
        offset += written
        view = view[written:]
    if hasher is not None:
        hasher.update(chunk)


def _hash_range(hasher: Any, fd: int, offset: int, count: int) -> None:
    while count:
        data = os.pread(fd, min(count, HASH_SLICE), offset)
        if not data:
            raise OSError(f"the temporary file ends at {offset}")
        hasher.update(data)
        offset += len(data)
        count -= len(data)
