"""A worker sending a blob from the download file of the worker that owns it, as that owner's
feed allows (`proxy.workers.following`), against a fake owner whose feed each test writes."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.cache.layout import Layout
from proxy.metrics import Metrics
from proxy.oci import Digest
from proxy.workers.following import FILE_HEADER, SIZE_HEADER, follow, identity, open_followed

DATA = os.urandom(64 * 1024) + b"\n\n" + os.urandom(1024)  # newlines in the raw rest too

Follower = Callable[[list[bytes]], Coroutine[Any, Any, bytes]]


@pytest.fixture
async def follower(tmp_path: Path) -> AsyncIterator[Callable[..., Follower]]:
    """`follower(committed=...)`: a function that runs one GET through a follower whose owner
    sends the given feed, over the download file of `DATA` (in its place in blobs/ or not),
    and returns the body the client received (raising if its transfer broke)."""
    layout = Layout(tmp_path)
    layout.create()
    digest = Digest.of(DATA)
    servers: list[TestServer] = []

    async def start(app: web.Application) -> TestServer:
        server = TestServer(app)
        await server.start_server()
        servers.append(server)
        return server

    def make(*, committed: bool) -> Follower:
        layout.temp_path(digest).write_bytes(DATA)
        written = identity(os.stat(layout.temp_path(digest)))
        if committed:
            layout.make_shard_dir(digest)
            os.rename(layout.temp_path(digest), layout.blob_path(digest))

        async def run(feed: list[bytes]) -> bytes:
            async def owner(request: web.Request) -> web.StreamResponse:
                headers = {FILE_HEADER: written, SIZE_HEADER: str(len(DATA)), "X-Cache": "MISS"}
                response = web.StreamResponse(headers=headers)
                await response.prepare(request)
                for piece in feed:
                    await response.write(piece)
                await response.write_eof()
                return response

            owner_app = web.Application()
            owner_app.router.add_get("/", owner)
            owner_server = await start(owner_app)

            async def blob(request: web.Request) -> web.StreamResponse:
                async with aiohttp.ClientSession() as session:
                    answer = await session.get(owner_server.make_url("/"))
                    with open_followed(layout, digest, answer.headers[FILE_HEADER]) as fd:
                        assert fd is not None
                        return await follow(
                            request, answer, fd, digest, layout.blob_path(digest), Metrics(), 5
                        )

            app = web.Application()
            app.router.add_get("/blob", blob)
            url = (await start(app)).make_url("/blob")
            async with aiohttp.ClientSession() as client, client.get(url) as got:
                assert got.status == 200
                assert got.headers["Docker-Content-Digest"] == str(digest)
                return await got.read()

        return run

    yield make
    for server in servers:
        await server.close()


async def test_the_blob_is_sent_from_the_file_as_far_as_the_feed_goes(
    follower: Callable[..., Follower],
) -> None:
    feed = [b"1000\n", b"30000\n40", b"000\n", b"%d\n" % len(DATA)]
    assert await follower(committed=True)(feed) == DATA


async def test_the_last_byte_is_not_sent_from_a_file_that_is_not_the_cached_blob(
    follower: Callable[..., Follower],
) -> None:
    """A feed that reached the end names a committed blob; a file that is not one (its inode
    number reused by a later download) is never sent whole."""
    with pytest.raises(aiohttp.ClientPayloadError):
        await follower(committed=False)([b"1000\n", b"%d\n" % len(DATA)])


async def test_after_rest_the_owner_sends_the_remaining_bytes_itself(
    follower: Callable[..., Follower],
) -> None:
    """The owner's cache write failed at byte 5000: its bytes from there come in the feed."""
    feed = [b"5000\nre", b"st\n" + DATA[5000:5100], DATA[5100:]]
    assert await follower(committed=False)(feed) == DATA


@pytest.mark.parametrize(
    "feed",
    [[b"5000\n"], [b"5000\nrest\n" + DATA[5000:-1]]],
    ids=["progress", "rest"],
)
async def test_a_feed_that_stops_short_of_the_end_breaks_the_transfer(
    follower: Callable[..., Follower], feed: list[bytes]
) -> None:
    with pytest.raises(aiohttp.ClientPayloadError):
        await follower(committed=False)(feed)
