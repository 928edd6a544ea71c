"""The listening sockets and the site that accepts every waiting connection when the loop wakes."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import socket
from collections.abc import Callable
from typing import cast

import pytest
import uvloop
from aiohttp import web
from harness.ports import free_port

from proxy.server import listener
from proxy.server.listener import AcceptingSite

BURST = 20
# Turns of the event loop: one sees the socket readable, one sets up each connection's
# transport, one runs the protocol's connection_made; a few to spare.
TURNS = 6


async def turns(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def served_after_a_burst(
    make_site: Callable[[web.AppRunner, socket.socket], web.BaseSite], after: int = TURNS
) -> int:
    """How many of `BURST` connections already waiting in the kernel's queue the server has
    taken after `after` turns of a uvloop event loop (as the mirror runs)."""

    async def main() -> int:
        runner = web.AppRunner(web.Application())
        await runner.setup()
        [sock] = listener.bind("127.0.0.1", 0)
        site = make_site(runner, sock)
        await site.start()
        clients = [socket.create_connection(sock.getsockname()) for _ in range(BURST)]
        try:
            await turns(after)
            assert runner.server is not None
            return len(runner.server.connections)
        finally:
            for client in clients:
                client.close()
            await runner.cleanup()

    return uvloop.run(main())


def test_a_burst_of_connections_is_taken_at_the_first_wake_up() -> None:
    taken = served_after_a_burst(lambda runner, sock: AcceptingSite(runner, sock, ssl_context=None))
    assert taken == BURST


def test_uvloop_alone_takes_one_connection_per_turn() -> None:
    """What `AcceptingSite` is for: aiohttp's own site under uvloop (libuv >= 1.45) takes one
    connection per turn of the loop, so a burst waits for as many turns as it has connections.
    Should this fail, libuv accepts in a loop again and the site may go."""
    taken = served_after_a_burst(lambda runner, sock: web.SockSite(runner, sock))
    assert taken < BURST


def test_connections_beyond_one_wake_ups_share_are_taken_at_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(listener, "ACCEPTS_PER_WAKE", 3)
    wake_ups = -(-BURST // 3)
    taken = served_after_a_burst(
        lambda runner, sock: AcceptingSite(runner, sock, ssl_context=None), wake_ups + TURNS
    )
    assert taken == BURST


def test_an_ipv6_address_is_bound_ipv6_only() -> None:
    [sock] = listener.bind("::1", 0)
    with sock:
        assert sock.family == socket.AF_INET6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


def test_a_port_in_use_is_refused() -> None:
    [taken] = listener.bind("127.0.0.1", 0)
    with taken, pytest.raises(OSError, match="in use"):
        listener.bind("127.0.0.1", taken.getsockname()[1])


async def test_a_closed_site_stops_accepting_and_closes_its_socket() -> None:
    runner = web.AppRunner(web.Application())
    await runner.setup()
    [sock] = listener.bind("127.0.0.1", 0)
    address = sock.getsockname()
    site = AcceptingSite(runner, sock, ssl_context=None)
    await site.start()
    await runner.cleanup()
    assert sock.fileno() == -1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address).close()


def test_shared_sets_of_sockets_each_get_a_share_of_the_connections() -> None:
    sets = listener.bind_shared("127.0.0.1", free_port(), 2)
    try:
        [first], [second] = sets
        assert first.getsockname() == second.getsockname()
        clients = [socket.create_connection(first.getsockname()) for _ in range(64)]
        # The kernel queued each connection on one socket by its address hash: each of the
        # two takes some (all 64 on one happens once in 2**63).
        counts = []
        for sock in (first, second):
            sock.setblocking(False)
            taken = 0
            with contextlib.suppress(BlockingIOError):
                while True:
                    sock.accept()[0].close()
                    taken += 1
            counts.append(taken)
        assert sum(counts) == 64
        assert min(counts) > 0
        for client in clients:
            client.close()
    finally:
        for sock in itertools.chain.from_iterable(sets):
            sock.close()


def test_a_port_another_socket_shares_is_refused_to_shared_sets() -> None:
    """Two mirrors started on one port by mistake: the second must fail as it always did, not
    join the first's SO_REUSEPORT group and take half its connections."""
    [[held]] = listener.bind_shared("127.0.0.1", free_port(), 1)
    with held, pytest.raises(OSError, match="in use"):
        listener.bind_shared("127.0.0.1", held.getsockname()[1], 2)


class OutOfDescriptorsOnce:
    """A listening socket whose first accept fails as when the process has no descriptor left."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.failed = False

    def __getattr__(self, name: str) -> object:
        return getattr(self.sock, name)

    def accept(self) -> tuple[socket.socket, object]:
        if not self.failed:
            self.failed = True
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()


def test_out_of_descriptors_the_site_pauses_then_takes_the_connection(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(listener, "ACCEPT_RETRY_SECONDS", 0)
    failing: list[OutOfDescriptorsOnce] = []

    def make_site(runner: web.AppRunner, sock: socket.socket) -> web.BaseSite:
        failing.append(OutOfDescriptorsOnce(sock))
        return AcceptingSite(runner, cast(socket.socket, failing[0]), ssl_context=None)

    with caplog.at_level(logging.ERROR, logger=listener.__name__):
        taken = served_after_a_burst(make_site)
    assert failing[0].failed
    assert "cannot accept connections" in caplog.text
    assert taken == BURST
