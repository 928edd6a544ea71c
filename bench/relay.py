"""A byte-counting TCP relay in front of the upstream registry, optionally shaped like a WAN.

Every mirror reaches the upstream through one of these, so its upstream traffic is measured the
same way whatever its HTTP client does (keep-alive, ranges, retries). Shaping models a WAN link:
``rtt`` is split into two one-way delays, ``bandwidth`` (bits per second) is one link shared by
every connection in the upstream-to-mirror direction, like an office's internet uplink, and
``per_connection`` (bits per second) caps each TCP connection on its own, as CDNs and long links
do to a single stream. ``cuts`` breaks chosen connections part-way (:class:`Cuts`).

The counters are what crossed the relay: a byte is counted when the relay reads it from one side
to pass it on, and a cut connection counts exactly the bytes it let through.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
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
    cuts: int = 0  # connections broken by :class:`Cuts`


@dataclass(frozen=True)
class Cuts:
    """Break the first ``connections`` upstream connections that carry more than ``after_bytes``
    towards the mirror: exactly ``after_bytes`` get through, then both sides are reset (RST, as
    a middlebox dropping the flow) or, with ``reset=False``, closed (FIN: a truncated response).

    Only connections that reach ``after_bytes`` count, so manifest and token requests on
    connections of their own are never the ones cut. :meth:`Relay.reset` re-arms the cuts.
    A reset may discard bytes the kernel still held for the mirror; they are counted all the same,
    since the upstream sent them through the relay.
    """

    connections: int
    after_bytes: int
    reset: bool = True


# How far a connection's own cap may lag behind its schedule and catch up: a sleep ends late by
# a millisecond or more, which would otherwise be lost on every chunk (10-40 % of the rate).
CAP_SLACK_SECONDS = 0.05


class Link:
    """A serial link of fixed bandwidth: each chunk leaves after the ones queued before it.

    With ``slack``, time up to that far in the past still counts as free (a token bucket that
    holds ``slack`` seconds' worth of bytes), so late wake-ups of a paced sender are made up.
    """

    def __init__(self, bits_per_second: float, slack: float = 0.0) -> None:
        self.bytes_per_second = bits_per_second / 8
        self.slack = slack
        self.free_at = 0.0

    def departure(self, size: int, now: float) -> float:
        start = max(now - self.slack, self.free_at)
        self.free_at = start + size / self.bytes_per_second
        return self.free_at


class _Connection:
    """One relayed connection: its two sockets, its own rate caps, the bytes it carried."""

    def __init__(self, client_w: asyncio.StreamWriter, per_connection: float | None) -> None:
        self.client_w = client_w
        self.upstream_w: asyncio.StreamWriter | None = None
        self.down_cap = Link(per_connection, CAP_SLACK_SECONDS) if per_connection else None
        self.up_cap = Link(per_connection, CAP_SLACK_SECONDS) if per_connection else None
        self.carried = 0  # upstream -> mirror
        self.cut_pending = False

    def cut(self, reset: bool) -> None:
        for writer in (self.client_w, self.upstream_w):
            if writer is None:
                continue
            if reset:
                sock = writer.get_extra_info("socket")
                with contextlib.suppress(OSError):
                    # Linger 0: close() sends RST instead of FIN (socket(7)).
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            elif writer is self.client_w:
                # The mirror gets every byte let through, then EOF: a truncated response.
                with contextlib.suppress(OSError):
                    writer.write_eof()
                writer.close()
            else:
                writer.transport.abort()


class Relay:
    def __init__(
        self,
        target_port: int,
        *,
        target_host: str = "127.0.0.1",
        rtt: float = 0.0,
        bandwidth: float | None = None,
        per_connection: float | None = None,
        cuts: Cuts | None = None,
    ) -> None:
        self.target = (target_host, target_port)
        self.rtt = rtt
        self.down_link = Link(bandwidth) if bandwidth else None
        self.up_link = Link(bandwidth) if bandwidth else None
        self.per_connection = per_connection
        self.cuts = cuts
        self.counters = Counters()
        self.port = 0
        self._cuts_left = cuts.connections if cuts else 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._last_activity = 0.0

    @property
    def shaped(self) -> bool:
        return self.rtt > 0 or self.down_link is not None or bool(self.per_connection)

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
        """Zero the counters and re-arm the cuts."""
        self.counters = Counters()
        self._cuts_left = self.cuts.connections if self.cuts else 0

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
        conn = _Connection(client_w, self.per_connection)
        try:
            if self.rtt:
                await asyncio.sleep(self.rtt)  # the TCP handshake crosses the WAN once
            up_r, up_w = await asyncio.open_connection(*self.target)
            conn.upstream_w = up_w
            self._writers.update((client_w, up_w))
            try:
                await asyncio.gather(
                    self._pipe(conn, client_r, up_w, self.up_link, downstream=False),
                    self._pipe(conn, up_r, client_w, self.down_link, downstream=True),
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

    def _admit(self, conn: _Connection, data: bytes, *, downstream: bool) -> bytes:
        """Count ``data``, or the part of it a cut lets through (then the cut is pending)."""
        if downstream:
            cuts = self.cuts
            if cuts is not None and self._cuts_left and conn.carried + len(data) > cuts.after_bytes:
                self._cuts_left -= 1
                self.counters.cuts += 1
                conn.cut_pending = True
                data = data[: cuts.after_bytes - conn.carried]
            conn.carried += len(data)
            self.counters.downstream += len(data)
        else:
            self.counters.upstream += len(data)
        self._last_activity = asyncio.get_running_loop().time()
        return data

    def _cut(self, conn: _Connection) -> None:
        assert self.cuts is not None
        conn.cut(self.cuts.reset)

    async def _pipe(
        self,
        conn: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: Link | None,
        *,
        downstream: bool,
    ) -> None:
        if not self.shaped:
            await self._copy(conn, reader, writer, downstream=downstream)
        else:
            await self._copy_shaped(conn, reader, writer, link, downstream=downstream)
        if conn.cut_pending:
            return
        # Half-close, so HTTP keep-alive and "read to EOF" bodies both behave as over TCP.
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()

    async def _copy(
        self,
        conn: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        downstream: bool,
    ) -> None:
        while not conn.cut_pending and (data := await reader.read(READ_SIZE)):
            data = self._admit(conn, data, downstream=downstream)
            writer.write(data)
            await writer.drain()
            if downstream and conn.cut_pending:
                self._cut(conn)

    async def _copy_shaped(
        self,
        conn: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: Link | None,
        *,
        downstream: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        cap = conn.down_cap if downstream else conn.up_cap
        # (departure, bytes, cut after them)
        queue: asyncio.Queue[tuple[float, bytes, bool] | None] = asyncio.Queue(SHAPED_QUEUE_CHUNKS)

        async def deliver() -> None:
            broken = False
            while (item := await queue.get()) is not None:
                if broken:
                    continue  # keep consuming so the reader never blocks on a dead peer
                at, data, cut = item
                delay = at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                try:
                    writer.write(data)
                    await writer.drain()
                except OSError:
                    broken = True
                if cut:
                    self._cut(conn)
                    return

        delivery = asyncio.create_task(deliver())
        try:
            while not conn.cut_pending and (data := await reader.read(SHAPED_READ_SIZE)):
                data = self._admit(conn, data, downstream=downstream)
                cut = downstream and conn.cut_pending
                now = loop.time()
                if cap is not None:
                    # The connection's own cap paces what it takes from the sender; the shared
                    # link then queues it behind the other connections' chunks, in time order.
                    paced = cap.departure(len(data), now)
                    if paced > now:
                        await asyncio.sleep(paced - now)
                        now = loop.time()
                left = link.departure(len(data), now) if link is not None else now
                await queue.put((left + self.rtt / 2, data, cut))
            await queue.put(None)
            await delivery
        finally:
            delivery.cancel()
