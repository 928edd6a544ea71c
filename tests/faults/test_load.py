"""A thousand concurrent client connections against the in-process mirror, after warm-up.

Every connection is opened and held at once (an `asyncio.Barrier` releases them together), then
each makes a mix of manifest hits (by tag and by digest) and blob hits; not one may fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from fakeupstream import FakeUpstreamServer, Image
from harness.digests import sha256_digest
from yarl import URL

from faults.support import assert_cache_sound
from proxy.app import create_app
from proxy.config import Settings, UpstreamSettings

CONNECTIONS = 1000
REQUESTS_PER_CONNECTION = 3
REPOSITORY = "team/app"


@pytest.fixture
def enough_file_descriptors() -> Iterator[None]:
    """Two sockets per connection (client and server side) in one process, plus the rest."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * CONNECTIONS + 1024
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.fail(f"RLIMIT_NOFILE hard limit {hard} is below the {wanted} this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextlib.asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[tuple[str, web.AppRunner]]:
    """The mirror app on a real listening socket, as `registry-proxy serve` runs it (aiohttp's
    default listen backlog of 128 included)."""
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", runner
    finally:
        await runner.cleanup()


async def test_a_thousand_concurrent_connections_all_get_their_hits_without_one_failure(
    fake_upstream: FakeUpstreamServer, tmp_path: Path, enough_file_descriptors: None
) -> None:
    registry = fake_upstream.registry
    layers = [os.urandom(size) for size in (2_000, 16_000, 64_000)]
    image: Image = registry.add_image(REPOSITORY, "1.0", layers)
    settings = Settings(
        upstreams=(UpstreamSettings("fake", URL(fake_upstream.url)),),
        cache_dir=tmp_path / "cache",
        cache_max_size=1024**3,
    )
    expected = {
        f"/v2/{REPOSITORY}/manifests/1.0": image.manifest_bytes,
        f"/v2/{REPOSITORY}/manifests/{image.manifest_digest}": image.manifest_bytes,
        **{f"/v2/{REPOSITORY}/blobs/{sha256_digest(layer)}": layer for layer in layers},
        f"/v2/{REPOSITORY}/blobs/{image.config_digest}": image.config_bytes,
    }
    paths = list(expected)
    async with serve(settings) as (base, runner):
        async with aiohttp.ClientSession() as warm_up:
            for path in paths:
                async with warm_up.get(base + path) as response:
                    assert await response.read() == expected[path]
        upstream_calls = registry.count()
        barrier = asyncio.Barrier(CONNECTIONS + 1)
        failures: list[str] = []

        async def client(number: int) -> int:
            """One connection (a one-connection pool), held open across the barrier."""
            connector = aiohttp.TCPConnector(limit=1)
            timeout = aiohttp.ClientTimeout(total=60)
            done = 0
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                for request in range(REQUESTS_PER_CONNECTION):
                    path = paths[(number + request) % len(paths)]
                    try:
                        async with session.get(base + path) as response:
                            body = await response.read()
                            if response.status != 200 or body != expected[path]:
                                failures.append(f"{path}: {response.status}")
                            else:
                                done += 1
                    except aiohttp.ClientError as exc:
                        failures.append(f"{path}: {exc!r}")
                    if request == 0:
                        await barrier.wait()
            return done

        started = time.monotonic()
        clients = [asyncio.create_task(client(n)) for n in range(CONNECTIONS)]
        await barrier.wait()
        held_open = len(runner.server.connections) if runner.server is not None else 0
        completed = sum(await asyncio.gather(*clients))
        elapsed = time.monotonic() - started

    print(
        f"\n{CONNECTIONS} connections held open at once ({held_open} seen by the server), "
        f"{completed} requests in {elapsed:.2f} s ({completed / elapsed:.0f} requests/s)"
    )
    assert failures == []
    assert completed == CONNECTIONS * REQUESTS_PER_CONNECTION
    assert held_open == CONNECTIONS
    assert elapsed < 20.0
    assert registry.count() == upstream_calls  # every request after warm-up was a hit
    assert_cache_sound(settings.cache_dir)
