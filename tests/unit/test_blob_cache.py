"""The blob cache through HTTP: one upstream download per blob, streamed to every waiter."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from fakeupstream import FakeUpstreamServer, Gate
from harness.filesystems import tmpfs
from harness.mirror import StartMirror

from proxy.cache.store import BlobStore
from proxy.oci import Digest
from proxy.server import keys as state

Client = TestClient[web.Request, web.Application]


def blob_path(digest: str) -> str:
    return f"/v2/team/app/blobs/{digest}"


def add_blob(upstream: FakeUpstreamServer, size: int) -> tuple[str, bytes]:
    data = os.urandom(size)
    upstream.registry.add_image("team/app", "1.0", [b"x"])  # makes the repository known
    return upstream.registry.add_blob(data), data


def store_of(client: Client) -> BlobStore:
    return client.app[state.STORE]


async def finish_download(client: Client, digest: str) -> None:
    download = store_of(client).in_flight(Digest.parse(digest))
    if download is not None and download.task is not None:
        await download.task


def upstream_gets(upstream: FakeUpstreamServer, digest: str) -> int:
    return upstream.registry.count("GET", path_contains=digest)


async def test_fifty_concurrent_misses_make_one_upstream_download_and_all_stream_early(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    digest, data = add_blob(fake_upstream, 2 * 1024 * 1024)
    gate = fake_upstream.registry.gate[digest] = Gate(after_bytes=512 * 1024)
    client = await mirror()
    first_bytes = [asyncio.Event() for _ in range(50)]

    async def pull(got_first_bytes: asyncio.Event) -> bytes:
        response = await client.get(blob_path(digest))
        assert response.status == 200
        body = bytearray(await response.content.readany())
        got_first_bytes.set()
        body += await response.read()
        return bytes(body)

    pulls = [asyncio.create_task(pull(event)) for event in first_bytes]
    await gate.reached.wait()
    # The upstream is stuck half way, and every client has bytes already.
    await asyncio.gather(*(event.wait() for event in first_bytes))
    assert Digest.parse(digest) not in store_of(client)
    gate.release.set()

    bodies = await asyncio.gather(*pulls)
    assert all(body == data for body in bodies)
    assert upstream_gets(fake_upstream, digest) == 1
    assert gate.hits == 1
    assert Digest.parse(digest) in store_of(client)


async def test_range_requests_on_a_blob_still_downloading_get_the_right_bytes(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    digest, data = add_blob(fake_upstream, 1024 * 1024)
    gate = fake_upstream.registry.gate[digest] = Gate(after_bytes=300_000)
    client = await mirror()
    leader = asyncio.create_task(client.get(blob_path(digest)))
    await gate.reached.wait()

    landed = await client.get(blob_path(digest), headers={"Range": "bytes=1000-1999"})
    assert landed.status == 206
    assert landed.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
    assert landed.headers["X-Cache"] == "COALESCED"
    assert await landed.read() == data[1000:2000]

    tail = asyncio.create_task(client.get(blob_path(digest), headers={"Range": "bytes=-500"}))
    middle = asyncio.create_task(client.get(blob_path(digest), headers={"Range": "bytes=600000-"}))
    gate.release.set()
    assert await (await tail).read() == data[-500:]
    assert await (await middle).read() == data[600000:]
    assert await (await leader).read() == data
    assert upstream_gets(fake_upstream, digest) == 1


async def test_the_download_completes_after_the_first_client_disconnects(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    digest, data = add_blob(fake_upstream, 1024 * 1024)
    gate = fake_upstream.registry.gate[digest] = Gate(after_bytes=200_000)
    client = await mirror()
    response = await client.get(blob_path(digest))
    await response.content.readany()
    await gate.reached.wait()
    response.close()  # containerd closes its range requests early
    gate.release.set()

    await finish_download(client, digest)
    again = await client.get(blob_path(digest))
    assert again.headers["X-Cache"] == "HIT"
    assert await again.read() == data
    assert upstream_gets(fake_upstream, digest) == 1


@pytest.mark.parametrize("fault", ["lie_about_digest", "truncate", "reset_after"])
async def test_bad_upstream_bytes_are_never_cached_and_the_client_sees_a_failed_transfer(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, fault: str
) -> None:
    digest, data = add_blob(fake_upstream, 500_000)
    registry = fake_upstream.registry
    if fault == "lie_about_digest":
        registry.lie_about_digest.add(digest)
    elif fault == "truncate":
        registry.truncate[digest] = 300_000
    else:
        registry.reset_after[digest] = 300_000
    client = await mirror()

    response = await client.get(blob_path(digest))
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    await finish_download(client, digest)
    store = store_of(client)
    assert Digest.parse(digest) not in store
    assert not store.blob_path(Digest.parse(digest)).exists()
    assert list(store.temp_dir.iterdir()) == []

    registry.lie_about_digest.clear()
    registry.truncate.clear()
    registry.reset_after.clear()
    retry = await client.get(blob_path(digest))
    assert await retry.read() == data
    assert upstream_gets(fake_upstream, digest) >= 2


async def test_a_hit_is_served_from_disk_with_ranges_and_etags_and_no_upstream_call(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    digest, data = add_blob(fake_upstream, 2048)
    client = await mirror()
    assert await (await client.get(blob_path(digest))).read() == data
    await finish_download(client, digest)
    calls = fake_upstream.registry.count()

    hit = await client.get(blob_path(digest))
    assert hit.headers["X-Cache"] == "HIT"
    assert hit.headers["ETag"] == f'"{digest}"'
    assert await hit.read() == data
    head = await client.head(blob_path(digest))
    assert head.status == 200
    assert head.headers["Content-Length"] == "2048"
    assert head.headers["Docker-Content-Digest"] == digest
    not_modified = await client.get(blob_path(digest), headers={"If-None-Match": f'"{digest}"'})
    assert not_modified.status == 304

    cases = {
        "bytes=500-1499": (206, data[500:1500], "bytes 500-1499/2048"),
        "bytes=500-": (206, data[500:], "bytes 500-2047/2048"),
        "bytes=-500": (206, data[-500:], "bytes 1548-2047/2048"),
        "bytes=2000-5000": (206, data[2000:], "bytes 2000-2047/2048"),
    }
    for header, (status, body, content_range) in cases.items():
        ranged = await client.get(blob_path(digest), headers={"Range": header})
        assert ranged.status == status, header
        assert ranged.headers["Content-Range"] == content_range
        assert await ranged.read() == body
    for header in ("bytes=500-0", "bytes=5000-10000"):
        refused = await client.get(blob_path(digest), headers={"Range": header})
        assert refused.status == 416, header
        assert refused.headers["Content-Range"] == "bytes */2048"
    assert fake_upstream.registry.count() == calls


async def test_a_blob_larger_than_the_budget_is_streamed_through(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    digest, data = add_blob(fake_upstream, 300_000)
    client = await mirror(cache_max_size=100_000)
    for _ in range(2):
        response = await client.get(blob_path(digest))
        assert await response.read() == data
    assert Digest.parse(digest) not in store_of(client)


async def test_a_full_disk_mid_download_still_delivers_the_whole_blob(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> None:
    digest, data = add_blob(fake_upstream, 3 * 1024 * 1024)
    with tmpfs(tmp_path / "tiny", "1m") as cache_dir:
        client = await mirror(cache_dir=cache_dir)
        response = await client.get(blob_path(digest))
        assert response.status == 200
        assert await response.read() == data
        await finish_download(client, digest)
        assert Digest.parse(digest) not in store_of(client)
        # Not the readiness check's write probe, which comes and goes in tmp/ every 5 s.
        left = [p for p in store_of(client).temp_dir.iterdir() if not p.name.startswith(".ready-")]
        assert left == []
        await client.close()


async def test_a_read_only_cache_dir_degrades_to_pass_through(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> None:
    digest, data = add_blob(fake_upstream, 200_000)
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as cache_dir:
        client = await mirror(cache_dir=cache_dir)
        for header, body in ((None, data), ("bytes=100-199", data[100:200])):
            headers = {"Range": header} if header else {}
            response = await client.get(blob_path(digest), headers=headers)
            assert await response.read() == body
        await client.close()
