"""Fetching one blob body into a download's temporary file (issue 15).

A connection that breaks before its last byte (reset, truncation, a stall past `read_timeout`)
is continued from the byte it reached with `Range: bytes=<reached>-`, after a short backoff,
the hash state kept; only `resume_attempts` attempts in a row without a new byte are made, and
the whole download stays within `download_timeout`. A blob larger than `parallel_threshold`
whose upstream takes Range requests is fetched as `parallel_parts` ranged requests, each
written at its offset and each resumed like a whole blob: when its first connection brings
less than `split_below` bytes a second over its first `split_probe` seconds (an upstream that
caps each connection), the rest is split then; a connection that is faster keeps the blob (on a
LAN more connections only cost CPU: parts past the hashed prefix are read back to be hashed).
Hashing follows the contiguous prefix from byte 0, and readers are given that prefix only (see
`proxy.cache.download`).

A resumed request answered with the whole body (200), another size or another validator
(ETag, Last-Modified) is a different body: `BodyChanged` makes the download start over, and two
bodies are never spliced.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from proxy.config import Settings
from proxy.errors import DigestMismatch, RangeIgnored, RegistryError

if TYPE_CHECKING:
    from proxy.cache.download import BlobSource, Download

log = logging.getLogger(__name__)

MiB: Final = 1024 * 1024
# Bytes of later parts, already on disk, read back and hashed in one batch.
HASH_SLICE: Final = 8 * MiB
# Bytes read from the sockets but not yet written, past which reading waits for the disk: what
# one download holds in memory. More (16 MiB was measured) makes large batches, whose bytes are
# no longer in the CPU's caches when they are written and hashed, and costs memory per download.
MAX_BACKLOG: Final = 4 * MiB
# A batch is handed to the worker thread once this large, or `BATCH_DELAY` after its first
# chunk: on a fast link a hand-off per chunk would cost more than the write, and on a slow one
# readers get bytes at most that late.
MIN_BATCH: Final = MiB
BATCH_DELAY: Final = 0.002
IOV_MAX: Final = 1024
# A body read from its socket (`SocketSource`) goes through one buffer of `SOCKET_BUFFER`, a step
# (one thread hand-off) reads up to `SOCKET_STEP` bytes or for `SOCKET_SECONDS`, and waits up to
# `SOCKET_WAIT` for more before it hands back.
SOCKET_BUFFER: Final = MiB
SOCKET_STEP: Final = 4 * MiB
SOCKET_SECONDS: Final = 0.025
SOCKET_WAIT: Final = 0.001
# A batch is written and hashed this much at a time, so that the hash reads bytes the write has
# just brought into the CPU's cache; later parts are read back into a buffer of this size.
SLICE: Final = 512 * 1024
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
    split_probe: float = Settings.parallel_download_probe  # 0: split at once
    split_below: int = Settings.parallel_download_below

    def parts(self, size: int, *, ranges: bool) -> int:
        """How many parts a blob of `size` bytes may be fetched in: one, unless it is large and
        the upstream takes Range requests."""
        if ranges and size > self.parallel_threshold:
            return max(1, min(self.parallel_parts, size // MIN_PART))
        return 1

    def backoff(self, failures: int) -> float:
        return float(min(self.resume_backoff * 2 ** (failures - 1), MAX_BACKOFF))


DEFAULT_FETCH_POLICY: Final = FetchPolicy()


class SocketSource(Protocol):
    """The rest of a body read from its socket by the disk thread (`proxy.upstream.socket_body`):
    `buffered` first, then `remaining` bytes from the socket."""

    buffered: list[bytes]
    remaining: int

    # In the disk thread: what the socket has now, into `view`; 0 when nothing yet. Raises a
    # RegistryError when the transfer broke.
    def read_into(self, view: memoryview) -> int: ...

    # In the disk thread: whether bytes arrived within `seconds`.
    def wait(self, seconds: float) -> bool: ...

    # On the loop: until bytes arrive; raises the upstream's timeout.
    async def readable(self) -> None: ...


class RangeOrigin(Protocol):
    """Where a download opens ranges of its blob, and counts its resumes."""

    async def open_range(self, start: int, end: int) -> BlobSource: ...

    def resumed(self) -> None: ...

    # A blob that may be split: how many connections it was fetched over, once decided.
    def split(self, connections: int) -> None: ...


@dataclass(slots=True)
class Part:
    start: int
    end: int  # exclusive
    position: int = -1  # the next byte to read from upstream
    on_disk: int = -1  # the next byte to write (touched by the `DiskLane` only)

    def __post_init__(self) -> None:
        if self.position < 0:
            self.position = self.start
        if self.on_disk < 0:
            self.on_disk = self.position


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
        self.count = policy.parts(
            self.size, ranges=ranges and origin is not None and first.accepts_ranges
        )
        self.parts = [Part(0, self.size)]
        if self.count > 1 and policy.split_probe <= 0:
            self.parts = _split(self.parts[0], self.count)
        self._first: BlobSource | None = first
        self.lane = DiskLane(download, self.parts)

    async def run(self) -> None:
        """Fetch every part; on return bytes 0..size are on disk and hashed (not yet checked)."""
        tasks = [asyncio.create_task(self._fetch_part(part)) for part in self.parts]
        if self.count > 1 and self.policy.split_probe > 0:
            tasks.append(asyncio.create_task(self._split_if_slow(tasks[0])))
        elif self.count > 1 and self.origin is not None:
            self.origin.split(len(self.parts))
        try:
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
            await self.lane.finish()
        finally:
            await self.lane.stop()

    async def _split_if_slow(self, first: asyncio.Task[None]) -> None:
        """After `split_probe` seconds of the first connection, split what is left over
        `count` connections if it brought less than `split_below` bytes a second, and fetch
        the new parts."""
        part = self.parts[0]
        started, reached = time.monotonic(), part.position
        await asyncio.wait([first], timeout=self.policy.split_probe)
        rate = (part.position - reached) / max(time.monotonic() - started, 1e-6)
        # A socket step in flight may write up to `SOCKET_STEP` past the position the loop knows.
        slow = not first.done() and rate < self.policy.split_below
        parts = _split(part, self.count, SOCKET_STEP) if slow else [part]
        self.parts.extend(parts[1:])  # the lane's list: its thread reads it, never changes it
        if self.origin is not None:
            self.origin.split(len(parts))
        if len(parts) < 2:
            return
        log.info(
            "splitting %s over %d connections at byte %d of %d: the first brought %.1f MB/s",
            self.download.digest, len(parts), part.position, self.size, rate / 1e6,
        )  # fmt: skip
        await asyncio.gather(*(self._fetch_part(later) for later in parts[1:]))

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
        if (body := stream.socket_body()) is not None:
            await self._copy_socket(body, part)
            return
        async for chunk in stream.chunks():
            if await self._queue(part, chunk):
                return
        if part.position < part.end:
            raise ShortBody()

    async def _copy_socket(self, body: SocketSource, part: Part) -> None:
        """`_copy` of a body the disk thread reads from its socket: what aiohttp had read
        first, through the queue, then the socket's bytes in `DiskLane.read_socket` steps."""
        for chunk in body.buffered:
            if await self._queue(part, chunk):
                return
        while part.position < part.end:
            if not body.remaining:
                raise ShortBody()
            if not await self.lane.read_socket(part, body):
                await body.readable()

    async def _queue(self, part: Part, chunk: bytes) -> bool:
        """Queue `chunk` for the disk thread; whether `part` is complete."""
        lane = self.lane
        room = part.end - part.position
        if len(chunk) > room:
            if part.end == self.size:
                raise DigestMismatch(self.download.digest, "more bytes than its Content-Length")
            chunk = chunk[:room]  # the first part reads a whole-body stream up to its end
        lane.write(part, chunk)
        part.position += len(chunk)
        if lane.backlog > MAX_BACKLOG:
            await lane.drain(MAX_BACKLOG // 2)
        elif lane.error is not None:
            raise lane.error
        return part.position >= part.end


# Chunks to write: per part, from an offset.
Batch = list[tuple["Part", int, list[bytes]]]
Bytes = bytes | memoryview


class DiskLane:
    """The download's file and hash state, worked on by one thread at a time, in order.

    Chunks read from the sockets are queued, and whatever queued while the previous batch was
    being written goes to a worker thread as one batch (written and hashed a `SLICE` at a time,
    each slice hashed while the write has left it in the CPU's cache): one thread hand-off per
    batch rather than per chunk, a batch as small as one chunk on a slow link (readers get bytes
    at once) and up to `MAX_BACKLOG` on a fast one. hashlib and the file calls release the GIL,
    so the loop goes on reading sockets meanwhile.

    Hashing follows the contiguous prefix from byte 0: a batch that extends it is hashed as it
    is written; bytes of later parts, already on disk, are read back into one reused buffer and
    hashed (`HASH_SLICE` per batch) once the prefix reaches them. The hasher, the read-back
    buffer and every part's `on_disk` are touched by the batch in flight only, and the loop
    reads the prefix from its result.
    """

    def __init__(self, download: Download, parts: list[Part]) -> None:
        self.download = download
        self.parts = parts
        self.fd = download.fd
        self.hasher = download.hasher
        self.hashed = download.written  # touched by the batch in flight only
        self.backlog = 0  # bytes queued or being written
        self.error: BaseException | None = None
        self._queued: Batch = []
        self._running: asyncio.Future[int] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._progress = asyncio.Event()
        self._stopped = False
        self._read_back: memoryview | None = None  # the batch in flight's, made when first needed
        self._socket_buffer: memoryview | None = None  # the same, for socket steps

    def write(self, part: Part, chunk: bytes) -> None:
        """Queue `chunk`, the bytes of `part` from its `position`."""
        queued = self._queued
        if queued and queued[-1][0] is part:
            queued[-1][2].append(chunk)
        else:
            queued.append((part, part.position, [chunk]))
        self.backlog += len(chunk)
        if self._running is None:
            if self.backlog >= MIN_BATCH:
                self._submit()
            elif self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(BATCH_DELAY, self._due)

    def _due(self) -> None:
        self._timer = None
        if self._running is None and self._queued:
            self._submit()

    async def drain(self, backlog: int = 0) -> None:
        """Wait until at most `backlog` bytes are left to write; raise the lane's error."""
        while self.backlog > backlog and self.error is None:
            if self._running is None:
                self._submit()
            await self._progress.wait()
        if self.error is not None:
            raise self.error

    async def finish(self) -> None:
        """Write everything queued and hash the whole contiguous prefix."""
        while self.error is None:
            if self._running is None:
                if not self._queued and self._frontier() <= self.hashed:
                    break
                self._submit()
            await self._progress.wait()
        if self.error is not None:
            raise self.error

    async def stop(self) -> None:
        """Queue nothing more and wait for the batch in flight, even when cancelled: it writes
        to the download's file descriptor, which must not be closed (and its number reused)
        while it does."""
        self._stopped = True
        self._queued.clear()
        if self._timer is not None:
            self._timer.cancel()
        if (running := self._running) is not None:
            try:
                await asyncio.wait([running])
            except asyncio.CancelledError:
                await asyncio.wait([running])
                raise

    async def read_socket(self, part: Part, body: SocketSource) -> int:
        """Read what `body`'s socket has for `part` into the file, in the worker thread, once
        the queued batches are written (the part's own bytes before the socket's): how many
        bytes (0: none came within `SOCKET_WAIT`). Raises the transfer's error, or the lane's."""
        while self._running is not None or self._queued:
            if self._running is None:
                self._submit()
            await self._progress.wait()
        if self.error is not None:
            raise self.error
        step = _SocketStep(part, body, min(part.end - part.position, body.remaining))
        running = asyncio.get_running_loop().run_in_executor(None, self._read_step, step)
        self._running = running
        running.add_done_callback(lambda done: self._written(done, []))
        # The step reads the body's socket, which its stream closes once this returns: even when
        # cancelled, wait for the step (a few milliseconds).
        cancelled = False
        while not running.done():
            try:
                await asyncio.wait([running])
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError()
        part.position += step.count
        if self.error is not None:
            raise self.error
        if step.error is not None:
            raise step.error
        return step.count

    def _submit(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._stopped or self.error is not None:
            return
        batch, self._queued = self._queued, []
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(None, self._write_batch, batch)
        self._running = running
        running.add_done_callback(lambda done: self._written(done, batch))

    def _written(self, done: asyncio.Future[int], batch: Batch) -> None:
        self._running = None
        if done.cancelled():
            self.error = self.error or asyncio.CancelledError()
        elif (error := done.exception()) is not None:
            self.error = error
        self.backlog -= sum(len(chunk) for _, _, chunks in batch for chunk in chunks)
        download = self.download
        if download.hasher is self.hasher and self.hashed > download.written:
            download.advance(self.hashed - download.written)
        if self._queued:
            self._submit()
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    def _write_batch(self, batch: Batch) -> int:
        """In the worker thread: write the batch, hash what extends the prefix."""
        for part, offset, chunks in batch:
            extends = offset == self.hashed
            for piece in _slices(chunks):
                offset = self._put(part, piece, offset, extends=extends)
        self._hash_frontier()
        return self.hashed

    def _put(self, part: Part, piece: Sequence[Bytes], offset: int, *, extends: bool) -> int:
        """In the worker thread: write `piece` at `offset`, then hash it when it `extends` the
        prefix; where `part` now ends on disk. Kept in step piece by piece: when a write fails
        (ENOSPC), a reader carries on from upstream at `hashed` with the hash state of exactly
        those bytes."""
        offset += _pwritev(self.fd, piece, offset)
        part.on_disk = offset
        if extends:
            for chunk in piece:
                self.hasher.update(chunk)
            self.hashed = offset
        return offset

    def _read_step(self, step: _SocketStep) -> int:
        """In the worker thread: read the socket into one reused buffer, write and hash it as
        `_write_batch` does, until `step.limit` bytes, `SOCKET_STEP` bytes or `SOCKET_SECONDS`
        (readers are told of bytes between steps), or until nothing came for `SOCKET_WAIT`."""
        if self._socket_buffer is None:
            self._socket_buffer = memoryview(bytearray(SOCKET_BUFFER))
        buffer, part, body = self._socket_buffer, step.part, step.body
        offset = part.on_disk
        extends = offset == self.hashed
        end = offset + min(step.limit, SOCKET_STEP)
        deadline = time.monotonic() + SOCKET_SECONDS
        while offset < end and time.monotonic() < deadline:
            try:
                count = body.read_into(buffer[: end - offset])
            except RegistryError as exc:
                step.error = exc
                break
            if not count:
                if not body.wait(SOCKET_WAIT):
                    break
                continue
            offset = self._put(part, [buffer[:count]], offset, extends=extends)
            step.count += count
        self._hash_frontier()
        return self.hashed

    def _hash_frontier(self) -> None:
        """Hash later parts that the prefix has reached, `HASH_SLICE` per batch so that writes
        go on."""
        if (frontier := self._frontier()) > self.hashed:
            if self._read_back is None:
                self._read_back = memoryview(bytearray(SLICE))
            end = min(frontier, self.hashed + HASH_SLICE)
            while self.hashed < end:
                view = self._read_back[: end - self.hashed]
                count = os.preadv(self.fd, [view], self.hashed)
                if not count:
                    raise OSError(f"the temporary file ends at {self.hashed}")
                self.hasher.update(view[:count])
                self.hashed += count

    def _frontier(self) -> int:
        """Where the bytes on disk stop being contiguous from the start of the blob."""
        hashed = self.hashed
        for part in self.parts:
            if part.start <= hashed < part.end:
                return part.on_disk
        return hashed


def _split(first: Part, count: int, margin: int = 0) -> list[Part]:
    """`first` and the parts that take what it has left, `count` in all (fewer when they would
    be smaller than `MIN_PART`): `first` now ends at the first cut, at least `margin` bytes
    past its position."""
    cut = min(first.position + max((first.end - first.position) // count, margin), first.end)
    rest = first.end - cut
    later = max(0, min(count - 1, rest // MIN_PART))
    if not later:
        return [first]
    bounds = [cut + rest * i // later for i in range(later + 1)]
    first.end = cut
    return [first, *(Part(bounds[i], bounds[i + 1]) for i in range(later))]


@dataclass(slots=True)
class _SocketStep:
    part: Part
    body: SocketSource
    limit: int
    count: int = 0  # read and written
    error: RegistryError | None = None  # the transfer broke


def _slices(chunks: list[bytes]) -> Iterator[list[bytes]]:
    """`chunks` in runs, each ending at the chunk that takes it to `SLICE` bytes or past."""
    run: list[bytes] = []
    size = 0
    for chunk in chunks:
        run.append(chunk)
        size += len(chunk)
        if size >= SLICE:
            yield run
            run, size = [], 0
    if run:
        yield run


def _pwritev(fd: int, chunks: Sequence[Bytes], offset: int) -> int:
    """Write all of `chunks` at `offset`; the count written."""
    total = 0
    views = [memoryview(chunk) for chunk in chunks]
    first = 0
    while first < len(views):
        written = os.pwritev(fd, views[first : first + IOV_MAX], offset)
        offset += written
        total += written
        while first < len(views) and written >= len(views[first]):
            written -= len(views[first])
            first += 1
        if written:
            views[first] = views[first][written:]
    return total
