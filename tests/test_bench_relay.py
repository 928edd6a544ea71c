"""The bench relay's WAN knobs: exact byte counts, cuts after a byte count, per-connection caps.

The upstream here is a raw TCP server: it reads one request line, sends its payload, closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from bench.relay import Cuts, Relay

PAYLOAD = bytes(range(256)) * 1200  # 307,200 bytes
REQUEST = b"GET /payload\n"


@contextlib.asynccontextmanager
async def upstream(payload: bytes = PAYLOAD) -> AsyncIterator[int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            await reader.readline()
            writer.write(payload)
            await writer.drain()
            writer.close()
            await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def relay_to(port: int, **shape: object) -> AsyncIterator[Relay]:
    relay = await Relay(port, **shape).start()  # type: ignore[arg-type]
    try:
        yield relay
    finally:
        await relay.stop()


async def fetch(relay: Relay) -> tuple[bytes, bool]:
    """What the mirror's side of one connection receives, and whether it ended in a reset."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    received = bytearray()
    reset = False
    try:
        writer.write(REQUEST)
        await writer.drain()
        while chunk := await reader.read(65536):
            received += chunk
    except ConnectionResetError:
        reset = True
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return bytes(received), reset


SHAPES = {"plain": {}, "shaped": {"rtt": 0.002, "bandwidth": 400e6}}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
async def test_counts_every_byte_each_way(shape: dict[str, float]) -> None:
    async with upstream() as port, relay_to(port, **shape) as relay:
        for _ in range(2):
            body, reset = await fetch(relay)
            assert body == PAYLOAD
            assert not reset
        counters = await relay.settle(quiet=0.05)
    assert counters.downstream == 2 * len(PAYLOAD)
    assert counters.upstream == 2 * len(REQUEST)
    assert (counters.connections, counters.cuts) == (2, 0)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
async def test_close_cuts_the_first_connections_after_exactly_the_byte_count(
    shape: dict[str, float],
) -> None:
    cuts = Cuts(connections=2, after_bytes=100_000, reset=False)
    async with upstream() as port, relay_to(port, cuts=cuts, **shape) as relay:
        first, second, third = [await fetch(relay) for _ in range(3)]
        counters = await relay.settle(quiet=0.05)
    # A truncated response: the prefix, byte-exact, then EOF.
    assert first == second == (PAYLOAD[:100_000], False)
    assert third == (PAYLOAD, False)
    assert counters.cuts == 2
    assert counters.downstream == 2 * 100_000 + len(PAYLOAD)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
async def test_reset_cut_ends_in_a_reset_and_counts_what_crossed(shape: dict[str, float]) -> None:
    cuts = Cuts(connections=1, after_bytes=100_000)
    async with upstream() as port, relay_to(port, cuts=cuts, **shape) as relay:
        body, reset = await fetch(relay)
        counters = await relay.settle(quiet=0.05)
        assert reset
        # A reset may drop what the kernel still held; never more than the cut let through.
        assert PAYLOAD.startswith(body)
        assert len(body) <= 100_000
        assert (counters.cuts, counters.downstream) == (1, 100_000)

        # The cut is spent; reset() re-arms it.
        assert await fetch(relay) == (PAYLOAD, False)
        relay.reset()
        _, reset = await fetch(relay)
        assert reset
        assert relay.counters.cuts == 1


async def test_connections_below_the_byte_count_are_neither_cut_nor_counted_as_cut() -> None:
    small = PAYLOAD[:50_000]
    async with upstream(small) as port, relay_to(port, cuts=Cuts(1, 100_000)) as relay:
        assert [await fetch(relay) for _ in range(3)] == [(small, False)] * 3
        assert relay.counters.cuts == 0


async def test_per_connection_cap_paces_each_connection() -> None:
    # 8 Mbit/s = 1 MB/s: 307,200 bytes cannot arrive in less than about 0.3 s, whatever the load.
    async with upstream() as port, relay_to(port, per_connection=8e6) as relay:
        started = time.monotonic()
        results = await asyncio.gather(fetch(relay), fetch(relay))
        elapsed = time.monotonic() - started
        counters = await relay.settle(quiet=0.05)
    assert list(results) == [(PAYLOAD, False)] * 2
    assert elapsed >= 0.25
    assert elapsed < 10  # a hang bound only: the machine may be loaded
    assert counters.downstream == 2 * len(PAYLOAD)
