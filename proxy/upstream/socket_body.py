"""The rest of a large blob body read straight from its socket, past aiohttp's parser.

aiohttp hands a body over as a fresh `bytes` per piece, copied twice on the way (the event
loop's read, the parser's body callback) and handled in Python piece by piece: on a fast link
that costs more CPU than hashing the blob (issue 14). A download's disk thread instead reads the
socket into one reused buffer, writes and hashes it there (`proxy.cache.fetch`).

Only a body aiohttp has not framed in pieces of its own is taken: plain HTTP (TLS is decrypted
in the transport), a Content-Length (no chunked framing), and enough of it left to be worth a
connection that is not reused afterwards (aiohttp's parser still waits for the body, so the
connection is closed with the stream). The transport stops reading and what aiohttp had read
(buffered, or held in its parser, which draining the buffer feeds through) is handed over first:
the socket's next byte is the body's next byte.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
from typing import Final

import aiohttp
from aiohttp.client_proto import ResponseHandler
from prometheus_client import Counter

from proxy.errors import UpstreamTimeout, UpstreamUnavailable

log = logging.getLogger(__name__)

# A body with less than this left after its headers stays with aiohttp: its connection is then
# reused, which matters more for small blobs than the copies do.
MIN_SOCKET_BODY: Final = 1024 * 1024


class SocketBody:
    """The bytes of one response body after `buffered`: `remaining` of them, on the socket."""

    def __init__(
        self,
        upstream: str,
        sock: socket.socket,
        buffered: list[bytes],
        remaining: int,
        read_timeout: float | None,
        fetched: Counter | None,
    ) -> None:
        self.buffered = buffered
        self.remaining = remaining
        self._upstream = upstream
        self._socket = sock
        self._read_timeout = read_timeout
        self._fetched = fetched
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)

    @classmethod
    def take(
        cls,
        upstream: str,
        response: aiohttp.ClientResponse,
        read_timeout: float | None,
        fetched: Counter | None,
    ) -> SocketBody | None:
        """The rest of `response`'s body as its socket's bytes, or None when it must stay with
        aiohttp. Called before anything of the body was read."""
        length = response.content_length
        connection = response.connection
        if length is None or connection is None or "Transfer-Encoding" in response.headers:
            return None
        content, protocol = response.content, connection.protocol
        transport = connection.transport
        if (
            transport is None
            or not isinstance(protocol, ResponseHandler)
            or transport.get_extra_info("ssl_object") is not None
            or transport.get_extra_info("sslcontext") is not None
            or content.exception() is not None
            or content.is_eof()
            or length - content.total_bytes < MIN_SOCKET_BODY
        ):
            return None
        raw = transport.get_extra_info("socket")
        if raw is None or raw.type != socket.SOCK_STREAM:
            return None
        # Each read below that empties the buffer lets the parser feed what it held back.
        buffered: list[bytes] = []
        while data := content.read_nowait(-1):
            buffered.append(data)
        protocol.pause_reading()  # the transport too, and aiohttp's read timer
        sock = socket.socket(fileno=os.dup(raw.fileno()))
        sock.setblocking(False)  # as the transport's: it sets the shared file's flags
        received = sum(map(len, buffered))
        log.debug("upstream %s: reading %d bytes of %s from the socket",
                  upstream, length - received, response.url.path)  # fmt: skip
        if fetched is not None:
            fetched.inc(received)
        return cls(upstream, sock, buffered, length - received, read_timeout, fetched)

    def read_into(self, view: memoryview) -> int:
        """In the disk thread: read what the socket has now into `view`, up to `remaining`;
        0 when it has nothing yet."""
        try:
            count = self._socket.recv_into(view, min(len(view), self.remaining))
        except BlockingIOError:
            return 0
        except OSError as exc:
            log.warning("upstream %s: blob transfer broke: %s", self._upstream, exc)
            raise UpstreamUnavailable(self._upstream, "blob transfer broke") from exc
        if not count:
            log.warning("upstream %s: blob transfer broke: the connection closed %d bytes "
                        "before the end", self._upstream, self.remaining)  # fmt: skip
            raise UpstreamUnavailable(self._upstream, "blob transfer broke")
        self.remaining -= count
        if self._fetched is not None:
            self._fetched.inc(count)
        return count

    def wait(self, seconds: float) -> bool:
        """In the disk thread: whether bytes (or the end) arrived within `seconds`."""
        return bool(self._poll.poll(seconds * 1000))

    async def readable(self) -> None:
        """On the event loop: until the socket has bytes (or the end); raises the upstream's
        timeout after `read_timeout`, as aiohttp does between the pieces of a body."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        fd = self._socket.fileno()
        loop.add_reader(fd, _resolve, ready)
        try:
            async with asyncio.timeout(self._read_timeout):
                await ready
        except TimeoutError:
            raise UpstreamTimeout(self._upstream, "timed out sending a blob") from None
        finally:
            loop.remove_reader(fd)

    def close(self) -> None:
        """Only once no thread reads it: the descriptor's number could be reused."""
        self._socket.close()


def _resolve(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)
