"""A blob body read from its socket (`proxy.upstream.socket_body`): exactly the body's bytes
after those aiohttp had read, and only a plain-HTTP body of known length with enough to come.
The upstream is a real aiohttp server on loopback; the client, the mirror's upstream session."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from fakeupstream import FakeUpstreamServer
from faults.support import settle
from harness.mirror import StartMirror

from proxy.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.server import keys
from proxy.upstream.socket_body import MIN_SOCKET_BODY, SocketBody
from unit.test_limits_and_tls import make_certificate

MiB = 1024 * 1024
DATA = os.urandom(6 * MiB)
HALF = len(DATA) // 2

Send = Callable[[web.Request, web.StreamResponse], Awaitable[None]]


@asynccontextmanager
async def upstream(
    send: Send, length: int | None = len(DATA), tls: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    """A server answering every GET with a body of `length` (None: chunked) that `send` writes."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        if length is None:
            response.enable_chunked_encoding()
        else:
            response.content_length = length
        await response.prepare(request)
        await send(request, response)
        return response

    app = web.Application()
    app.router.add_get("/blob", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    scheme = "https" if tls is not None else "http"
    try:
        yield f"{scheme}://127.0.0.1:{runner.addresses[0][1]}/blob"
    finally:
        await runner.cleanup()


def read_socket(body: SocketBody, until: int = 0) -> bytes:
    """What the disk thread does: the socket's bytes, until `until` are left."""
    view = memoryview(bytearray(MiB))
    got = bytearray()
    while body.remaining > until:
        count = body.read_into(view[: body.remaining - until])
        if count:
            got += view[:count]
        else:
            assert body.wait(5.0), "no bytes within 5 s"
    return bytes(got)


async def test_the_buffered_bytes_and_the_sockets_are_the_body_exactly() -> None:
    half_sent = asyncio.Event()
    go_on = asyncio.Event()

    async def in_two(request: web.Request, response: web.StreamResponse) -> None:
        await response.write(DATA[:HALF])
        half_sent.set()
        await go_on.wait()
        await response.write(DATA[HALF:])

    async with (
        upstream(in_two) as url,
        aiohttp.ClientSession() as session,
        session.get(url) as response,
    ):
        await half_sent.wait()
        # aiohttp reads until its buffer is over its limit, then holds the rest back (it
        # has no event for bytes buffered, not read).
        while response.content.total_bytes < 4 * 64 * 1024:  # noqa: ASYNC110
            await asyncio.sleep(0)
        try:
            body = SocketBody.take("fake", response, 5.0, None)
            assert body is not None
            buffered = b"".join(body.buffered)
            assert 0 < len(buffered) < HALF
            assert body.remaining == len(DATA) - len(buffered)
        finally:
            go_on.set()
        rest = await asyncio.to_thread(read_socket, body)
        body.close()
    assert buffered + rest == DATA


@pytest.mark.parametrize("kind", ["chunked", "tls", "small"])
async def test_a_body_that_must_stay_with_aiohttp_is_not_taken(tmp_path: Path, kind: str) -> None:
    tls = None
    if kind == "tls":
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(*make_certificate(tmp_path, "upstream"))
    size = MIN_SOCKET_BODY - 1 if kind == "small" else len(DATA)
    gate = asyncio.Event()

    async def first_bytes_then_wait(request: web.Request, response: web.StreamResponse) -> None:
        await response.write(DATA[: 64 * 1024])
        await gate.wait()
        await response.write(DATA[64 * 1024 : size])

    length = None if kind == "chunked" else size
    async with (
        upstream(first_bytes_then_wait, length, tls) as url,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as session,
        session.get(url) as response,
    ):
        try:
            assert SocketBody.take("fake", response, 5.0, None) is None
        finally:
            gate.set()
        assert await response.read() == DATA[:size]  # aiohttp reads it as ever


async def test_a_stall_times_out_and_a_connection_closed_early_breaks_the_transfer() -> None:
    gate = asyncio.Event()

    async def half_then_close(request: web.Request, response: web.StreamResponse) -> None:
        await response.write(DATA[:HALF])
        await gate.wait()
        assert request.transport is not None
        request.transport.close()

    async with (
        upstream(half_then_close) as url,
        aiohttp.ClientSession() as session,
        session.get(url) as response,
    ):
        try:
            body = SocketBody.take("fake", response, 0.2, None)
            assert body is not None
            buffered = b"".join(body.buffered)
            got = await asyncio.to_thread(read_socket, body, len(DATA) - HALF)
            assert buffered + got == DATA[:HALF]
            with pytest.raises(UpstreamTimeout):
                await body.readable()
        finally:
            gate.set()
        await body.readable()  # the end
        with pytest.raises(UpstreamUnavailable):
            await asyncio.to_thread(read_socket, body)
        body.close()


async def test_a_large_blob_is_read_from_its_socket_exactly_and_counted_once(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[SocketBody] = []
    take = SocketBody.take.__func__  # type: ignore[attr-defined]

    def recorded(cls: type[SocketBody], *args: Any) -> SocketBody | None:
        body: SocketBody | None = take(cls, *args)
        taken.extend([body] if body is not None else [])
        return body

    monkeypatch.setattr(SocketBody, "take", classmethod(recorded))
    fake_upstream.registry.add_image("team/app", "1.0", [os.urandom(3000)])
    digest = fake_upstream.registry.add_blob(DATA)
    client = await mirror()  # the default settings: one connection below 64 MiB

    response = await client.get(f"/v2/team/app/blobs/{digest}")
    assert (response.status, await response.read()) == (200, DATA)
    assert len(taken) == 1
    metrics = client.app[keys.METRICS].registry
    fetched = metrics.get_sample_value(
        "registry_proxy_upstream_fetched_bytes_total", {"upstream": "fake"}
    )
    assert fetched == len(DATA)
    await settle(client)
    hit = await client.get(f"/v2/team/app/blobs/{digest}")
    assert (hit.headers["X-Cache"], await hit.read()) == ("HIT", DATA)
