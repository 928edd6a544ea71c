"""Serving blobs: from the cache with sendfile, from a download in flight, or straight through.

Every path here ends in one of two ways: the client has received exactly the bytes it asked
for, or its connection is aborted before the body completes, so no client can take a broken or
unverified transfer for a good one. An aborted response is marked on the request (`ABORTED`,
with its cause), so the access log and the metrics tell it from a success with the same status.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import aiohttp
from aiohttp import web

from proxy.cache.download import BlobSource, Download, Opener, State
from proxy.cache.store import BlobStore
from proxy.errors import DigestMismatch, ErrorCode, RegistryError
from proxy.metrics import Metrics
from proxy.oci import OCTET_STREAM, CacheResult, Digest, Repository
from proxy.server.keys import notes
from proxy.server.ranges import ByteRange, parse_range
from proxy.upstream.client import Upstream
from proxy.upstream.ranged import BlobOrigin

log = logging.getLogger(__name__)

DEFAULT_SEND_TIMEOUT: Final = 300.0


@dataclass(slots=True)
class Body:
    """What part of the blob a response carries."""

    start: int
    end: int  # inclusive; start > end for an empty body

    @classmethod
    def for_range(cls, byte_range: ByteRange | None, size: int) -> Body:
        if byte_range is None:
            return cls(0, size - 1)
        return cls(byte_range.start, byte_range.end)


class ClientGone(Exception):
    """The client went away, or stopped reading for `send_timeout`, in the middle of a body."""

    def __init__(self, exc: BaseException) -> None:
        self.stalled = isinstance(exc, TimeoutError)
        super().__init__("client stopped reading" if self.stalled else "client went away")


class Transfer:
    """One response body on its way out: sends bytes and accounts for them once."""

    # sendfile in pieces, so a client that stops reading is noticed within `send_timeout`.
    PIECE = 16 * 1024 * 1024
    COPY_PIECE = 256 * 1024
    # Handed to the transport when the socket is full, to learn when it drains (see `_splice`).
    WAIT_PIECE = 64 * 1024

    def __init__(
        self,
        request: web.Request,
        response: web.StreamResponse,
        cache: CacheResult,
        metrics: Metrics,
        send_timeout: float,
    ) -> None:
        self.request = request
        self.send_timeout = send_timeout
        self.response = response
        self.cache = cache
        self.metrics = metrics
        self.started = time.monotonic()
        self.first_byte_sent = False
        source = "cache" if cache == CacheResult.HIT else "upstream"
        self.served = metrics.served_bytes.labels(source)
        self.notes = notes(request)
        self.notes.bytes_sent = 0

    def _sent(self, count: int) -> None:
        if not self.first_byte_sent and count:
            self.first_byte_sent = True
            self.metrics.blob_first_byte.labels(self.cache).observe(time.monotonic() - self.started)
        self.notes.bytes_sent = (self.notes.bytes_sent or 0) + count
        self.served.inc(count)

    async def send_file(self, fd: int, offset: int, count: int) -> None:
        transport = self.request.transport
        if transport is None:
            raise ClientGone(ConnectionResetError())
        loop = asyncio.get_running_loop()
        if not isinstance(loop, asyncio.BaseEventLoop):
            # uvloop has no loop.sendfile: sendfile(2) by hand on a plain TCP socket, through
            # memory (as aiohttp's FileResponse does then) under TLS.
            sock = transport.get_extra_info("socket")
            tls = transport.get_extra_info("sslcontext") or transport.get_extra_info("ssl_object")
            if sock is None or tls is not None:
                await self._copy_file(fd, offset, count)
            else:
                await self._splice(transport, sock.fileno(), fd, offset, count)
            return
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as file:
            end = offset + count
            while offset < end:
                piece = min(self.PIECE, end - offset)
                # sendfile leaves the file position after the bytes it sent, even when it fails.
                file.seek(offset)
                try:
                    async with asyncio.timeout(self.send_timeout):
                        await loop.sendfile(transport, file, offset, piece)
                except (ConnectionError, TimeoutError) as exc:
                    self._sent(file.tell() - offset)
                    raise ClientGone(exc) from exc
                offset += piece
                self._sent(piece)

    async def write(self, chunk: bytes) -> None:
        await send_chunk(self.response, chunk, self.send_timeout)
        self._sent(len(chunk))

    async def _splice(
        self, transport: asyncio.Transport, sock: int, fd: int, offset: int, count: int
    ) -> None:
        """sendfile(2) from `fd` to the client's socket, next to the event loop's transport.

        Bytes go to the socket directly only while the transport has none buffered (they would
        overtake them). When the socket is full, a small piece goes through the transport
        instead: the loop sends it when the socket has room, and with a write buffer limit of
        0 the response's drain returns once it has, all of it.
        """
        low, high = transport.get_write_buffer_limits()
        transport.set_write_buffer_limits(high=0, low=0)
        try:
            end = offset + count
            while offset < end:
                if transport.is_closing():
                    raise ClientGone(ConnectionResetError())
                if transport.get_write_buffer_size():
                    await self._drain()
                    if transport.get_write_buffer_size():  # not the loop this was written for
                        await self._copy_file(fd, offset, end - offset)
                        return
                    continue
                try:
                    sent = os.sendfile(sock, fd, offset, min(self.PIECE, end - offset))
                except BlockingIOError:
                    sent = -1
                except ConnectionError as exc:
                    raise ClientGone(exc) from exc
                if sent == 0:
                    raise OSError(f"cache file ended at byte {offset} of {end}")
                if sent > 0:
                    offset += sent
                    self._sent(sent)
                    continue
                piece = os.pread(fd, min(self.WAIT_PIECE, end - offset), offset)
                if not piece:
                    raise OSError(f"cache file ended at byte {offset} of {end}")
                await self.write(piece)
                offset += len(piece)
                await self._drain()
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits(high=high, low=low)

    async def _drain(self) -> None:
        try:
            async with asyncio.timeout(self.send_timeout):
                await self.request.writer.drain()
        except (ConnectionError, TimeoutError) as exc:
            raise ClientGone(exc) from exc

    async def _copy_file(self, fd: int, offset: int, count: int) -> None:
        end = offset + count
        while offset < end:
            # One piece from the page cache takes microseconds; sending it is what waits.
            piece = os.pread(fd, min(self.COPY_PIECE, end - offset), offset)
            if not piece:
                raise OSError(f"cache file ended at byte {offset} of {end}")
            await self.write(piece)
            offset += len(piece)


class BlobServing(Protocol):
    """What the blob route asks of whatever serves blobs (one process, or sharded workers)."""

    async def serve(
        self, request: web.Request, upstream: Upstream, repository: Repository, digest: Digest
    ) -> web.StreamResponse: ...


class Handoff(Protocol):
    """Answers a request for a download in flight other than with its bytes, or returns None
    to let them be sent (`proxy.workers.following`: a sibling worker sends them itself)."""

    async def __call__(
        self, request: web.Request, download: Download, opener: Opener, result: CacheResult
    ) -> web.StreamResponse | None: ...


class BlobService:
    def __init__(
        self,
        store: BlobStore,
        metrics: Metrics,
        send_timeout: float = DEFAULT_SEND_TIMEOUT,
        on_read: Callable[[Digest], None] | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.send_timeout = send_timeout
        # Told of every blob a client GETs (prefetch counts what paid: `Prefetcher.read`).
        self.on_read = on_read
        self.handoff: Handoff | None = None

    async def serve(
        self, request: web.Request, upstream: Upstream, repository: Repository, digest: Digest
    ) -> web.StreamResponse:
        if self.on_read is not None and request.method == "GET":
            self.on_read(digest)
        await self.store.ensure_verified(digest)
        with self.store.open_blob(digest) as cached:
            if cached is not None:
                fd, size = cached
                return await self.serve_file(request, digest, fd, size, CacheResult.HIT)

        if request.method == "HEAD":
            return await self.head_upstream(request, upstream, repository, digest)

        origin = BlobOrigin(upstream, repository, digest)

        async def opener(offset: int) -> BlobSource:
            return await origin.open(offset)

        download, started = self.store.download(digest, opener, origin)
        result = CacheResult.MISS if started else CacheResult.COALESCED
        with self.store.lease(digest):
            await download.wait_ready()
            if download.state is State.COMPLETE:
                with self.store.open_blob(digest) as cached:
                    if cached is not None:
                        return await self.serve_file(request, digest, cached[0], cached[1], result)
            if self.handoff is not None:
                answer = await self.handoff(request, download, opener, result)
                if answer is not None:
                    return answer
            return await self._serve_download(request, download, opener, result)

    async def head_upstream(
        self, request: web.Request, upstream: Upstream, repository: Repository, digest: Digest
    ) -> web.StreamResponse:
        # A HEAD does not start a download: a client checking for a blob may never fetch it.
        size = await upstream.head_blob(repository, digest)
        response = blob_response(request, digest, size, None, CacheResult.MISS)
        await response.prepare(request)
        return response

    async def serve_file(
        self, request: web.Request, digest: Digest, fd: int, size: int, result: CacheResult
    ) -> web.StreamResponse:
        etag = f'"{digest}"'
        if_none_match = request.headers.getall("If-None-Match", [])
        if etag in if_none_match or "*" in if_none_match:
            notes(request).cache_result = result
            return web.StreamResponse(status=304, headers={"ETag": etag, "X-Cache": result.header})
        byte_range = parse_range(request.headers.get("Range"), size)
        response = blob_response(request, digest, size, byte_range, result)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        body = Body.for_range(byte_range, size)
        if body.end >= body.start:
            transfer = Transfer(request, response, result, self.metrics, self.send_timeout)
            try:
                await transfer.send_file(fd, body.start, body.end - body.start + 1)
            except Exception as exc:
                self._abort(request, digest, exc)
                return response
        await response.write_eof()
        return response

    async def _serve_download(
        self, request: web.Request, download: Download, opener: Opener, result: CacheResult
    ) -> web.StreamResponse:
        size = download.size
        if size is None:
            # Degraded before the upstream said the size: stream the whole thing through.
            return await self.pass_through(request, download.digest, opener)
        byte_range = parse_range(request.headers.get("Range"), size)
        body = Body.for_range(byte_range, size)
        response = blob_response(request, download.digest, size, byte_range, result)
        await response.prepare(request)
        transfer = Transfer(request, response, result, self.metrics, self.send_timeout)
        position = body.start
        try:
            async for fd, offset, count in download.read(body.start, body.end):
                await transfer.send_file(fd, offset, count)
                position = offset + count
            if position <= body.end:
                await finish_from_upstream(transfer, download, opener, position, body)
        except Exception as exc:
            self._abort(request, download.digest, exc)
            return response
        await response.write_eof()
        return response

    def _abort(self, request: web.Request, digest: Digest, exc: BaseException) -> None:
        if isinstance(exc, DigestMismatch):
            self.store.count_mismatch(exc)  # streamed through: the store may never have seen it
        abort_transfer(request, digest, exc)

    async def pass_through(
        self, request: web.Request, digest: Digest, opener: Opener
    ) -> web.StreamResponse:
        stream = await opener(0)
        stream.close()
        if stream.size is None:
            raise RegistryError(ErrorCode.UNAVAILABLE, "upstream did not say the blob's size")
        byte_range = parse_range(request.headers.get("Range"), stream.size)
        body = Body.for_range(byte_range, stream.size)
        response = blob_response(request, digest, stream.size, byte_range, CacheResult.MISS)
        await response.prepare(request)
        transfer = Transfer(request, response, CacheResult.MISS, self.metrics, self.send_timeout)
        hasher = digest.hasher() if body.start == 0 else None
        try:
            await _relay(transfer, opener, digest, body.start, body, hasher)
        except Exception as exc:
            self._abort(request, digest, exc)
            return response
        await response.write_eof()
        return response


async def finish_from_upstream(
    transfer: Transfer, download: Download, opener: Opener, position: int, body: Body
) -> None:
    """The cache write failed under a reader at `position`: the rest of `body` from upstream,
    verifying the whole blob when `body` covers all of it."""
    hasher = download.hasher.copy() if body.start == 0 else None
    await _relay(transfer, opener, download.digest, position, body, hasher)


async def _relay(
    transfer: Transfer, opener: Opener, digest: Digest, position: int, body: Body, hasher: Any
) -> None:
    """Copy bytes `position`..`body.end` from upstream to the client.

    `hasher` holds the hash of bytes 0..position when the client gets the whole blob; the
    remainder is then hashed too and a mismatch raises before the last byte is sent.
    """
    if position > body.end:
        return
    stream = await opener(position)
    try:
        async for chunk in stream.chunks():
            remaining = body.end - position + 1
            if len(chunk) > remaining:
                chunk = chunk[:remaining]
            if hasher is not None:
                hasher.update(chunk)
            last = position + len(chunk) > body.end
            if hasher is not None and last and hasher.hexdigest() != digest.encoded:
                raise DigestMismatch(digest, "digest mismatch")
            await transfer.write(chunk)
            position += len(chunk)
            if position > body.end:
                return
    finally:
        stream.close()
    raise RegistryError(ErrorCode.UNAVAILABLE, "upstream blob ended early", status=502)


def blob_response(
    request: web.Request,
    digest: Digest,
    size: int,
    byte_range: ByteRange | None,
    result: CacheResult,
) -> web.StreamResponse:
    headers = {
        "Content-Type": OCTET_STREAM,
        "Docker-Content-Digest": str(digest),
        "ETag": f'"{digest}"',
        "Accept-Ranges": "bytes",
        "X-Cache": result.header,
    }
    notes(request).cache_result = result
    if byte_range is None:
        response = web.StreamResponse(status=200, headers=headers)
        response.content_length = size
    else:
        headers["Content-Range"] = byte_range.content_range()
        response = web.StreamResponse(status=206, headers=headers)
        response.content_length = byte_range.length
    return response


async def send_chunk(response: web.StreamResponse, chunk: bytes, send_timeout: float) -> None:
    try:
        async with asyncio.timeout(send_timeout):
            await response.write(chunk)
    except (ConnectionError, TimeoutError) as exc:
        raise ClientGone(exc) from exc


def abort_transfer(request: web.Request, digest: Digest, exc: BaseException) -> None:
    """Break the connection mid-body: the short body tells the client the transfer failed."""
    if isinstance(exc, ClientGone):
        notes(request).aborted = "client"
        if exc.stalled:
            log.warning("aborting transfer of %s: %s", digest, exc)
        else:
            log.debug("client went away during %s", digest)
    else:
        # The upstream (or the worker owning the blob) failed, or sent bytes that do not match.
        notes(request).aborted = (
            "upstream" if isinstance(exc, RegistryError | aiohttp.ClientError) else "mirror"
        )
        log.warning("aborting transfer of %s: %s", digest, exc)
    if request.transport is not None:
        request.transport.abort()
