"""A byte-counting TCP relay in front of the upstream registry, optionally shaped like a WAN.

Every mirror reaches the upstream through one of these, so its upstream traffic is measured the
same way whatever its HTTP client does (keep-alive, ranges, retries). Shaping models a WAN link:
``rtt`` is split into two one-way delays, and ``bandwidth`` (bits per second) is one link shared
by every connection in the upstream-to-mirror direction, like an office's internet uplink.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

READ_SIZE = 256 * 1024
# Chunks held per shaped connection: about a router's buffer; reading stops when it is full.
SHAPED_QUEUE_CHUNKS = 32
SHAPED_READ_SIZE = 64 * 1024


@dataclass
class Counters:
    downstream: int = 0  # upstream -> mirror: what a mirror costs in WAN traffic
    upstream: int = 0  # mirror -> upstream: requests
    connections: int = 0


class Link:
    """A serial link of fixed bandwidth: each chunk leaves after the ones queued before it."""

    def __init__(self, bits_per_second: float) -> None:
        self.bytes_per_second = bits_per_second / 8
        self.free_at = 0.0

    def departure(self, size: int, now: float) -> float:
        start = max(now, self.free_at)
        self.free_at = start + size / self.bytes_per_second
        return self.free_at


class Relay:
    def __init__(
        self,
        target_port: int,
        *,
        target_host: str = "127.0.0.1",
        rtt: float = 0.0,
        bandwidth: float | None = None,
    ) -> None:
        self.target = (target_host, target_port)
        self.rtt = rtt
        self.down_link = Link(bandwidth) if bandwidth else None
        self.up_link = Link(bandwidth) if bandwidth else None
        self.counters = Counters()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._last_activity = 0.0

    @property
    def shaped(self) -> bool:
        return self.rtt > 0 or self.down_link is not None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        # Aborting the sockets ends every connection's pipes (an upstream may hold a half-closed
        # keep-alive connection open); cancelling the handlers would leave asyncio logging them.
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def reset(self) -> None:
        self.counters = Counters()

    async def settle(self, quiet: float = 0.3, limit: float = 30.0) -> Counters:
        """Wait until no byte has crossed for ``quiet`` seconds (downloads a mirror finishes in
        the background count too), then return the counters."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        # Quiet is the absence of events, so there is nothing to await but time.
        while loop.time() < deadline and loop.time() - self._last_activity < quiet:  # noqa: ASYNC110
            await asyncio.sleep(quiet / 3)
        return self.counters

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.counters.connections += 1
        try:
            if self.rtt:
                await asyncio.sleep(self.rtt)  # the TCP handshake crosses the WAN once
            up_r, up_w = await asyncio.open_connection(*self.target)
            self._writers.update((client_w, up_w))
            try:
                await asyncio.gather(
                    self._pipe(client_r, up_w, self.up_link, downstream=False),
                    self._pipe(up_r, client_w, self.down_link, downstream=True),
                )
            finally:
                up_w.close()
                self._writers.discard(up_w)
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Shutdown (Ctrl-C): end quietly; asyncio would log a cancelled stream handler.
            return
        finally:
            client_w.close()
            self._writers.discard(client_w)
            self._tasks.discard(task)

    def _count(self, size: int, *, downstream: bool) -> None:
        if downstream:
            self.counters.downstream += size
        else:
            self.counters.upstream += size
        self._last_activity = asyncio.get_running_loop().time()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: Link | None,
        *,
        downstream: bool,
    ) -> None:
        if not self.shaped:
            await self._copy(reader, writer, downstream=downstream)
        else:
            await self._copy_shaped(reader, writer, link, downstream=downstream)
        # Half-close, so HTTP keep-alive and "read to EOF" bodies both behave as over TCP.
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()

    async def _copy(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, downstream: bool
    ) -> None:
        while data := await reader.read(READ_SIZE):
            self._count(len(data), downstream=downstream)
            writer.write(data)
            await writer.drain()

    async def _copy_shaped(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: Link | None,
        *,
        downstream: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(SHAPED_QUEUE_CHUNKS)

        async def deliver() -> None:
            broken = False
            while (item := await queue.get()) is not None:
                if broken:
                    continue  # keep consuming so the reader never blocks on a dead peer
                at, data = item
                delay = at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                try:
                    writer.write(data)
                    await writer.drain()
                except OSError:
                    broken = True

        delivery = asyncio.create_task(deliver())
        try:
            while data := await reader.read(SHAPED_READ_SIZE):
                self._count(len(data), downstream=downstream)
                now = loop.time()
                left = link.departure(len(data), now) if link is not None else now
                await queue.put((left + self.rtt / 2, data))
            await queue.put(None)
            await delivery
        finally:
            delivery.cancel()
