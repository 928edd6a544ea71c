"""Listening sockets, and a site that takes every connection waiting each time the loop wakes.

libuv, under uvloop, accepts one connection per turn of the event loop (since libuv 1.45,
pull request 3696), and aiohttp's sites listen again with a backlog of 128. A turn of a busy
mirror takes milliseconds, so a herd of pulls opening a hundred connections at once waited in
the kernel's queue, some of them for over a second, while the requests already accepted were
served; the ones beyond the backlog waited for the client's SYN retransmission. `AcceptingSite`
accepts in a loop, as asyncio's own loop does, a bounded number per wake-up, on a socket `bind`
left listening with a deep backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from ssl import SSLContext
from typing import Final

from aiohttp import web

log = logging.getLogger(__name__)

# The kernel's queue of connections not yet accepted (it caps this at net.core.somaxconn).
BACKLOG: Final = 4096
# Connections accepted per wake-up, at most: a herd's worth.
ACCEPTS_PER_WAKE: Final = 32
# Out of descriptors or memory: stop accepting for a while rather than spin (as asyncio does).
ACCEPT_RETRY_SECONDS: Final = 1.0
_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def bind(host: str, port: int, backlog: int = BACKLOG) -> list[socket.socket]:
    """Listening sockets on every address `host` resolves to (IPv6 ones IPv6 only), as aiohttp's
    TCP site binds them."""
    return _bound(host, port, backlog, reuse_port=False)


def bind_shared(
    host: str, port: int, count: int, backlog: int = BACKLOG
) -> list[list[socket.socket]]:
    """`count` sets of `bind`'s sockets on one port (SO_REUSEPORT: the kernel spreads the
    connections over the sets), or the error `bind` gives when anything else holds the port:
    another process's socket with SO_REUSEPORT too would otherwise join them."""
    for sock in _bound(host, port, None, reuse_port=False):
        sock.close()
    return [_bound(host, port, backlog, reuse_port=True) for _ in range(count)]


def _bound(host: str, port: int, backlog: int | None, *, reuse_port: bool) -> list[socket.socket]:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            if backlog is not None:
                sock.listen(backlog)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Acceptor(asyncio.AbstractServer):
    """Accepts connections on a listening socket and hands them to the loop with `factory`'s
    protocols (and TLS, given a context)."""

    def __init__(
        self,
        sock: socket.socket,
        factory: web.Server,
        ssl_context: SSLContext | None,
    ) -> None:
        self.sock = sock
        self.factory = factory
        self.ssl_context = ssl_context
        self._loop = asyncio.get_running_loop()
        # Connections being set up (a TLS handshake may take a while), with their sockets.
        self._connecting: dict[asyncio.Task[None], socket.socket] = {}
        self._retry: asyncio.TimerHandle | None = None
        self._serving = True
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._accept)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self.sock,)

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                connection, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while it waited in the queue
            except OSError as exc:
                if exc.errno not in _RESOURCES:
                    raise
                log.error(
                    "cannot accept connections (%s); trying again in %.0f s",
                    exc, ACCEPT_RETRY_SECONDS,
                )  # fmt: skip
                self._loop.remove_reader(self.sock.fileno())
                self._retry = self._loop.call_later(ACCEPT_RETRY_SECONDS, self._resume)
                return
            task = self._loop.create_task(self._connect(connection))
            self._connecting[task] = connection
            task.add_done_callback(self._connecting.pop)

    def _resume(self) -> None:
        self._retry = None
        if self._serving:
            self._loop.add_reader(self.sock.fileno(), self._accept)

    async def _connect(self, connection: socket.socket) -> None:
        connection.setblocking(False)
        try:
            await self._loop.connect_accepted_socket(self.factory, connection, ssl=self.ssl_context)
        except OSError as exc:  # a TLS handshake that failed or timed out: its transport closed
            log.debug("connection dropped before it was served: %s", exc)
            connection.close()

    def close(self) -> None:
        if not self._serving:
            return
        self._serving = False
        if self._retry is not None:
            self._retry.cancel()
        else:
            self._loop.remove_reader(self.sock.fileno())
        for task, connection in self._connecting.items():
            task.cancel()
            # Closes a socket no transport took yet; one that did, its transport closes.
            connection.close()
        self.sock.close()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        """Serving from the start."""

    async def serve_forever(self) -> None:
        raise NotImplementedError("served by the runner")

    async def wait_closed(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._connecting, return_exceptions=True)


class AcceptingSite(web.BaseSite):
    """aiohttp's site for a listening socket, accepting with an `Acceptor`."""

    __slots__ = ("_sock",)

    def __init__(
        self, runner: web.BaseRunner, sock: socket.socket, *, ssl_context: SSLContext | None
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._sock = sock

    @property
    def name(self) -> str:
        address = self._sock.getsockname()
        scheme = "https" if self._ssl_context else "http"
        if isinstance(address, str):
            return f"{scheme}://unix:{address}:"
        return f"{scheme}://{address[0]}:{address[1]}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = Acceptor(self._sock, server, self._ssl_context)
