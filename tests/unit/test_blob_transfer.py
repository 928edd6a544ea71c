"""A blob body sent from a file under uvloop (the server's loop), which has no loop.sendfile:
`Transfer` calls sendfile(2) on the socket itself, next to the transport's own buffer. The
bytes must arrive whole and in order, after the headers, to a client that reads slowly (the
socket fills, and the transport holds some bytes), and the connection must carry the next
request (keep-alive) afterwards.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from pathlib import Path

import pytest
import uvloop
from aiohttp import web

from proxy.metrics import Metrics
from proxy.oci import CacheResult
from proxy.server.blobs import Transfer
from unit.test_limits_and_tls import make_certificate

SIZE = 3 * 1024 * 1024 + 12345
STEP = 10_000  # a piece through the transport: less than aiohttp drains after


def serve_file(path: Path, *, hold: bool) -> web.Application:
    """A handler that sends the file as a cold read does, a range at a time as it lands, with a
    small piece written through the transport between ranges (as `_relay` does after a degraded
    download). With `hold`, it then holds the loop a moment, as other work can between two
    callbacks: the client frees room in the socket while the transport still holds that piece,
    which bytes sent by sendfile must not overtake."""
    metrics = Metrics()

    async def handler(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        # A small send buffer: the socket fills up whenever the client falls behind.
        sock = request.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        response = web.StreamResponse()
        response.content_length = SIZE
        await response.prepare(request)
        transfer = Transfer(request, response, CacheResult.MISS, metrics, 30.0)
        fd = os.open(path, os.O_RDONLY)
        try:
            offset, step = 0, 0
            while offset < SIZE:
                count = min(STEP if step % 2 else 20 * STEP, SIZE - offset)
                if step % 2:
                    await transfer.write(os.pread(fd, count, offset))
                    if hold:
                        time.sleep(0.002)  # noqa: ASYNC251 - the loop held on purpose
                else:
                    await transfer.send_file(fd, offset, count)
                offset, step = offset + count, step + 1
        finally:
            os.close(fd)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/blob", handler)
    return app


def receive(sock: socket.socket, size: int) -> bytes:
    if not (data := sock.recv(size)):
        raise ConnectionError("the server closed the connection mid-body")
    return data


def fetch_twice(port: int, tls: bool = False) -> list[bytes]:
    """Two GETs on one connection, read slowly (in a thread, while the server's loop runs)."""
    bodies = []
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    raw.settimeout(20)  # a server that stops sending fails the test rather than hangs it
    raw.connect(("127.0.0.1", port))
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        raw = context.wrap_socket(raw)
    with raw as sock:
        received = b""
        for _ in range(2):
            sock.sendall(b"GET /blob HTTP/1.1\r\nHost: test\r\n\r\n")
            while b"\r\n\r\n" not in received:
                received += receive(sock, 65536)
            head, received = received.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200"), head
            assert f"Content-Length: {SIZE}".encode() in head
            while len(received) < SIZE:
                received += receive(sock, 16 * 1024)
                time.sleep(0.0005)
            bodies.append(received[:SIZE])
            received = received[SIZE:]
    return bodies


async def exchange(tmp_path: Path, *, hold: bool, tls: bool = False) -> list[bool]:
    data = os.urandom(SIZE)
    path = tmp_path / "blob"
    path.write_bytes(data)
    runner = web.AppRunner(serve_file(path, hold=hold))
    await runner.setup()
    context = None
    if tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*make_certificate(tmp_path, "mirror"))
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        bodies = await asyncio.to_thread(fetch_twice, runner.addresses[0][1], tls)
        return [body == data for body in bodies]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("hold", [True, False])
def test_a_file_sent_under_uvloop_arrives_whole_after_its_headers_and_keeps_the_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hold: bool
) -> None:
    calls: list[str] = []
    sendfile = os.sendfile

    def counted(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        try:
            sent = sendfile(out_fd, in_fd, offset, count)
        except BlockingIOError:
            calls.append("full")
            raise
        calls.append("sent")
        return sent

    monkeypatch.setattr(os, "sendfile", counted)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(exchange(tmp_path, hold=hold)) == [True, True]
    assert "sent" in calls  # the bytes went by sendfile
    if not hold:
        # The server outran the client: the full socket was waited for through the transport.
        assert "full" in calls


def test_under_tls_the_bytes_go_through_the_transport(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(*args: object) -> int:
        raise AssertionError("sendfile would bypass TLS")

    monkeypatch.setattr(os, "sendfile", refused)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(exchange(tmp_path, hold=False, tls=True)) == [True, True]
