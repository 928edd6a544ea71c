"""A worker sends a blob its sibling is downloading from the shared file, not through the sibling.

Relaying the owner's bytes over its Unix socket copies each one three more times through two
event loops; in a herd spread over the workers that tripled the mirror's CPU. So a worker asks
the owner for the download's progress instead (`FOLLOW_HEADER`) and the owner answers (`Feed`)
with the identity of the file it writes into and then, one line per step, how many bytes from
the start readers may have: the owner's own rule (`Download.read`), the last byte only once the
whole blob verified. The worker (`follow`) opens that same file (by inode: the temporary path
or, once renamed, the final one) and sends those bytes with sendfile.

When the owner's cache write fails mid-download its readers carry on from upstream: the feed
then says `rest`, and the remaining bytes (hashed by the owner) follow it as they are. A feed
that breaks off before the blob's end aborts the client's transfer, as a broken relay does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import aiohttp
from aiohttp import web

from proxy.cache.download import Download, Opener, State
from proxy.cache.layout import Layout
from proxy.errors import ErrorCode, RegistryError
from proxy.metrics import Metrics
from proxy.oci import CacheResult, Digest
from proxy.server.blobs import (
    Body,
    Transfer,
    abort_transfer,
    blob_response,
    finish_from_upstream,
    send_chunk,
)

# Asks the owner for its download's progress rather than its bytes.
FOLLOW_HEADER: Final = "X-Registry-Proxy-Follow"
# The owner's answer: the file it downloads into (`st_dev:st_ino`), and the blob's size.
FILE_HEADER: Final = "X-Registry-Proxy-File"
SIZE_HEADER: Final = "X-Registry-Proxy-Size"
# In the feed: the rest of the blob follows as bytes.
REST: Final = b"rest"


def identity(stat: os.stat_result) -> str:
    return f"{stat.st_dev}:{stat.st_ino}"


class Feed:
    """The owner's side: answers a sibling's request for a download in flight with its progress.

    Set as the blob service's `handoff`; it answers only requests from a sibling (`relayed`),
    for a whole blob (a range is relayed as bytes)."""

    def __init__(
        self, metrics: Metrics, send_timeout: float, relayed: Callable[[web.Request], bool]
    ) -> None:
        self.metrics = metrics
        self.send_timeout = send_timeout
        self.relayed = relayed

    def wanted(self, request: web.Request) -> bool:
        headers = request.headers
        return FOLLOW_HEADER in headers and "Range" not in headers and self.relayed(request)

    async def __call__(
        self, request: web.Request, download: Download, opener: Opener, result: CacheResult
    ) -> web.StreamResponse | None:
        size = download.size
        if size is None or download.state is not State.STREAMING or not self.wanted(request):
            return None
        headers = {
            FILE_HEADER: identity(os.fstat(download.fd)),
            SIZE_HEADER: str(size),
            "X-Cache": result.header,
        }
        response = web.StreamResponse(status=200, headers=headers)
        await response.prepare(request)
        position = 0
        try:
            async for _, offset, count in download.read(0, size - 1):
                position = offset + count
                await send_chunk(response, b"%d\n" % position, self.send_timeout)
            if position < size:
                # The cache write failed: the rest from upstream, as the owner's readers get it.
                await send_chunk(response, REST + b"\n", self.send_timeout)
                transfer = Transfer(request, response, result, self.metrics, self.send_timeout)
                await finish_from_upstream(transfer, download, opener, position, Body(0, size - 1))
        except Exception as exc:
            abort_transfer(request, download.digest, exc)
            return response
        await response.write_eof()
        return response


@contextlib.contextmanager
def open_followed(layout: Layout, digest: Digest, file: str) -> Iterator[int | None]:
    """The file the owner downloads `digest` into, if it is still there under either name."""
    for path in (layout.temp_path(digest), layout.blob_path(digest)):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if identity(os.fstat(fd)) == file:
                yield fd
                return
        finally:
            os.close(fd)
    yield None


async def follow(
    request: web.Request,
    answer: aiohttp.ClientResponse,
    fd: int,
    digest: Digest,
    final: Path,
    metrics: Metrics,
    send_timeout: float,
) -> web.StreamResponse:
    """The sibling's side: send the blob from `fd` as the owner's feed in `answer` allows.

    The owner declares the last byte once its download verified and took its place at `final`;
    so `fd` must be that file then. (It was the owner's when it was opened, unless the owner's
    download had already ended and another file took its name and its freed inode number.)"""
    size = int(answer.headers[SIZE_HEADER])
    result = CacheResult.from_header(answer.headers.get("X-Cache")) or CacheResult.MISS
    response = blob_response(request, digest, size, None, result)
    await response.prepare(request)
    transfer = Transfer(request, response, result, metrics, send_timeout)
    position = 0  # sent from the file
    raw = False  # past `rest`
    pending = b""
    try:
        async for chunk in answer.content.iter_any():
            if raw:
                await _send_raw(transfer, chunk)
                continue
            pending += chunk
            available = position
            while (newline := pending.find(b"\n")) >= 0:
                line, pending = pending[:newline], pending[newline + 1 :]
                if line == REST:
                    raw = True
                    break
                available = int(line)  # only the last counts: the feed may have run ahead
            if available > position:
                if available == size and not _committed(fd, final):
                    raise RegistryError(ErrorCode.UNAVAILABLE, "followed another file", status=502)
                await transfer.send_file(fd, position, available - position)
                position = available
            if raw and pending:
                await _send_raw(transfer, pending)
                pending = b""
        if transfer.notes.bytes_sent != size:
            raise RegistryError(
                ErrorCode.UNAVAILABLE, "the owning worker's feed ended early", status=502
            )
    except Exception as exc:
        abort_transfer(request, digest, exc)
        return response
    await response.write_eof()
    return response


def _committed(fd: int, final: Path) -> bool:
    try:
        return identity(os.stat(final)) == identity(os.fstat(fd))
    except OSError:
        return False


async def _send_raw(transfer: Transfer, chunk: bytes) -> None:
    """Bytes the owner relayed from upstream: it counted them as served, this worker does not."""
    await send_chunk(transfer.response, chunk, transfer.send_timeout)
    transfer.notes.bytes_sent = (transfer.notes.bytes_sent or 0) + len(chunk)
