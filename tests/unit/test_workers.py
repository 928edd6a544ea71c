"""Several worker processes on one port and one cache directory."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from unittest import mock

import aiohttp
import pytest
from fakeupstream import FakeUpstreamServer, Gate
from harness.filesystems import tmpfs
from harness.mirror import REPO_ROOT, Mirror, serve_command
from harness.ports import free_port

from proxy.cache.layout import Layout
from proxy.cache.provenance import Provenance
from proxy.errors import SiblingUnreachable
from proxy.oci import Digest
from proxy.workers.following import identity, open_followed
from proxy.workers.sharding import HASHED_HERE, OwnerRelay
from proxy.workers.siblings import Siblings
from proxy.workers.supervisor import Worker

WORKERS = 2


def any_alive(pids: set[int]) -> bool:
    return any(Path(f"/proc/{pid}").exists() for pid in pids)


def worker_pids(supervisor: int) -> set[int]:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children")
    return {int(pid) for pid in children.read_text().split()}


@contextlib.asynccontextmanager
async def started(mirror: Mirror) -> AsyncIterator[Mirror]:
    await asyncio.to_thread(mirror.start)
    try:
        yield mirror
    finally:
        await asyncio.to_thread(mirror.stop)


async def wait_for_workers(mirror: Mirror, pid: int, expected: int = WORKERS) -> set[int]:
    """The supervisor forks its workers; poll /proc (another process, no event to await)."""
    sockets = [mirror.cache_dir / "run" / f"worker-{i}.sock" for i in range(expected)]
    deadline = time.monotonic() + 20
    while True:
        pids = worker_pids(pid)
        if len(pids) == expected and all(path.exists() for path in sockets):
            return pids
        assert time.monotonic() < deadline, f"workers did not start: {pids}"
        await asyncio.sleep(0.05)


async def wait_for_admin(client: aiohttp.ClientSession, admin: str) -> None:
    """Worker 0 opens the admin listener once its cache is open, after the mirror answers."""
    await wait_for_answer(client, f"{admin}/stats", "the admin API")


async def wait_for_answer(
    client: aiohttp.ClientSession,
    url: str,
    what: str,
    proc: asyncio.subprocess.Process | None = None,
) -> None:
    """Poll `url` until it answers 200, while `proc` (serving it) runs."""
    deadline = time.monotonic() + 20
    while True:
        try:
            async with client.get(url) as answer:
                assert answer.status == 200
                return
        except aiohttp.ClientConnectorError:
            assert proc is None or proc.returncode is None, f"{what} exited"
            assert time.monotonic() < deadline, f"{what} did not start"
            await asyncio.sleep(0.05)  # another process, no event to await


def unix_session(mirror: Mirror, index: int) -> aiohttp.ClientSession:
    return unix_session_at(mirror.cache_dir / "run" / f"worker-{index}.sock")


def unix_session_at(path: Path) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path)))


async def test_a_herd_spread_over_every_worker_makes_one_upstream_download(
    fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> None:
    data = os.urandom(2 * 1024 * 1024)
    fake_upstream.registry.add_image("team/app", "1.0", [b"x"])
    digest = fake_upstream.registry.add_blob(data)
    gate = fake_upstream.registry.gate[digest] = Gate(after_bytes=512 * 1024)
    mirror = Mirror(tmp_path, fake_upstream.url, "--workers", str(WORKERS))
    async with started(mirror):
        await wait_for_workers(mirror, mirror.pid)
        # Each worker's own socket, so the herd provably reaches both of them.
        sessions = [unix_session(mirror, i) for i in range(WORKERS)]
        first_bytes = [asyncio.Event() for _ in range(50)]

        async def pull(session: aiohttp.ClientSession, got_first: asyncio.Event) -> bytes:
            async with session.get(f"http://mirror/v2/team/app/blobs/{digest}") as response:
                assert response.status == 200
                body = bytearray(await response.content.readany())
                got_first.set()
                return bytes(body + await response.read())

        try:
            pulls = [
                asyncio.create_task(pull(sessions[n % WORKERS], event))
                for n, event in enumerate(first_bytes)
            ]
            await gate.reached.wait()
            # Upstream is held half way, and clients of every worker already have bytes.
            await asyncio.gather(*(event.wait() for event in first_bytes))
            gate.release.set()
            bodies = await asyncio.gather(*pulls)
        finally:
            for session in sessions:
                await session.close()
        assert all(hashlib.sha256(body).hexdigest() == digest[7:] for body in bodies)
        assert fake_upstream.registry.count("GET", path_contains=digest) == 1
        assert gate.hits == 1

        async with aiohttp.ClientSession() as client:
            hit = await client.get(f"{mirror.url}/v2/team/app/blobs/{digest}")
            assert hit.headers["X-Cache"] == "HIT"
            assert await hit.read() == data
            metrics = await (await client.get(f"{mirror.url}/metrics")).text()
        # Every worker's requests and its share of the budget add up on one /metrics.
        assert "registry_proxy_cache_budget_bytes 1.073741824e+09" in metrics
        served = [
            line for line in metrics.splitlines()
            if line.startswith('registry_proxy_served_bytes_total{source="upstream"}')
        ]  # fmt: skip
        assert float(served[0].split()[-1]) == 50 * len(data)
        # The owner's clients were sent the bytes by the owner; the others', by their own
        # worker from the owner's download file, not through the owner.
        assert series(metrics, 'registry_proxy_worker_handoffs_total{via="file"}') == 25
        assert series(metrics, 'registry_proxy_worker_handoffs_total{via="relay"}') == 0


def series(metrics: str, name: str) -> float:
    """A sample's value in a /metrics text, 0 when the series has none yet."""
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def metrics_of(mirror: Mirror) -> str:
    async with aiohttp.ClientSession() as client, client.get(f"{mirror.url}/metrics") as got:
        return await got.text()


@contextlib.asynccontextmanager
async def through_worker_1(
    workdir: Path, upstream: str
) -> AsyncIterator[tuple[Mirror, aiohttp.ClientSession]]:
    """Two workers, and a session to worker 1 (a client of the blobs `owned_by(0, ...)`)."""
    mirror = Mirror(workdir, upstream, "--workers", str(WORKERS))
    async with started(mirror):
        await wait_for_workers(mirror, mirror.pid)
        async with unix_session(mirror, 1) as session:
            yield mirror, session


@pytest.mark.parametrize("fault", ["lie_about_digest", "truncate"])
async def test_a_worker_following_another_workers_download_never_completes_a_bad_blob(
    fake_upstream: FakeUpstreamServer, tmp_path: Path, fault: str
) -> None:
    registry = fake_upstream.registry
    registry.add_image("team/app", "1.0", [b"x"])
    data = owned_by(0, 1024 * 1024)
    digest = registry.add_blob(data)
    if fault == "lie_about_digest":
        registry.lie_about_digest.add(digest)  # one byte flipped: only the hash can tell
    else:
        registry.truncate[digest] = 700_000
    async with through_worker_1(tmp_path, fake_upstream.url) as (mirror, worker_1):
        url = f"http://mirror/v2/team/app/blobs/{digest}"
        async with worker_1.get(url) as bad:
            assert bad.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await bad.read()
        registry.lie_about_digest.clear()
        registry.truncate.clear()
        async with worker_1.get(url) as good:
            assert await good.read() == data
        metrics = await metrics_of(mirror)
    assert series(metrics, 'registry_proxy_worker_handoffs_total{via="file"}') == 2
    assert series(metrics, 'registry_proxy_aborted_responses_total{cause="upstream"}') == 1


async def test_a_herd_larger_than_a_connection_pool_gets_its_first_bytes_from_another_worker(
    fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> None:
    """Each client of a blob another worker downloads holds a connection to that worker for its
    whole transfer: a herd of them must not queue behind a pool limit (aiohttp's is 100)."""
    registry = fake_upstream.registry
    registry.add_image("team/app", "1.0", [b"x"])
    data = owned_by(0, 2 * 1024 * 1024)
    digest = registry.add_blob(data)
    gate = registry.gate[digest] = Gate(after_bytes=1024 * 1024)
    herd = 150
    async with through_worker_1(tmp_path, fake_upstream.url) as (mirror, _):
        socket_path = mirror.cache_dir / "run" / "worker-1.sock"
        unlimited = aiohttp.UnixConnector(path=str(socket_path), limit=0)
        async with aiohttp.ClientSession(connector=unlimited) as client:
            url = f"http://mirror/v2/team/app/blobs/{digest}"
            try:
                # Bounded: behind a pool limit the last 50 would wait for the first 100 to end,
                # which needs the upstream bytes the gate holds.
                async with asyncio.timeout(30):
                    responses = await asyncio.gather(*(client.get(url) for _ in range(herd)))
                    firsts = await asyncio.gather(*(got.content.readany() for got in responses))
            finally:
                gate.release.set()
            assert all(got.status == 200 for got in responses)
            assert all(firsts)
            for got, first in zip(responses, firsts, strict=True):
                assert first + await got.read() == data
    assert registry.count("GET", f"/blobs/{digest}") == 1


async def test_a_worker_following_a_download_that_fills_the_disk_still_sends_the_whole_blob(
    fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> None:
    """The owner's cache write fails part way: the worker following it gets the rest of the
    blob from the owner, which carries on from upstream and verifies the whole."""
    registry = fake_upstream.registry
    registry.add_image("team/app", "1.0", [b"x"])
    data = owned_by(0, 24 * 1024 * 1024)
    digest = registry.add_blob(data)
    gate = registry.gate[digest] = Gate(after_bytes=1024 * 1024)
    workdir = tmp_path / "mirror"
    workdir.mkdir()
    with tmpfs(workdir / "cache", "12m"):
        async with through_worker_1(workdir, fake_upstream.url) as (mirror, worker_1):
            url = f"http://mirror/v2/team/app/blobs/{digest}"
            async with worker_1.get(url) as got:
                assert got.status == 200
                # Bytes from the file before the disk fills: this worker is following.
                first = await got.content.readany()
                gate.release.set()
                assert first + await got.read() == data
            metrics = await metrics_of(mirror)
            blob = mirror.cache_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]
            assert not blob.exists()
    assert series(metrics, 'registry_proxy_worker_handoffs_total{via="file"}') == 1
    assert registry.count("GET", f"/blobs/{digest}") >= 2  # the rest came from upstream


async def test_a_crashed_worker_is_restarted_and_the_mirror_keeps_serving(
    fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> None:
    data = os.urandom(100_000)
    fake_upstream.registry.add_image("team/app", "1.0", [b"x"])
    digest = fake_upstream.registry.add_blob(data)
    mirror = Mirror(tmp_path, fake_upstream.url, "--workers", str(WORKERS))
    async with started(mirror):
        supervisor = mirror.pid
        before = await wait_for_workers(mirror, supervisor)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while True:  # the supervisor notices and forks a replacement
            after = worker_pids(supervisor)
            if len(after) == WORKERS and victim not in after:
                break
            assert time.monotonic() < deadline, f"worker not restarted: {after}"
            await asyncio.sleep(0.05)
        await wait_for_workers(mirror, supervisor)
        async with aiohttp.ClientSession() as client:
            for _ in range(10):
                response = await client.get(f"{mirror.url}/v2/team/app/blobs/{digest}")
                assert response.status == 200
                assert await response.read() == data


async def test_workers_serve_on_an_ipv6_address(
    fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> None:
    data = os.urandom(10_000)
    fake_upstream.registry.add_image("team/app", "1.0", [b"x"])
    digest = fake_upstream.registry.add_blob(data)
    port = free_port()
    command = serve_command(port, tmp_path / "cache", "--upstream", fake_upstream.url)
    command[command.index("--listen") + 1] = f"[::1]:{port}"
    with (tmp_path / "mirror.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *command, "--workers", str(WORKERS), stdout=log, stderr=log
        )
    try:
        async with aiohttp.ClientSession() as client:
            await wait_for_answer(client, f"http://[::1]:{port}/v2/", "the mirror on [::1]", proc)
            async with client.get(f"http://[::1]:{port}/v2/team/app/blobs/{digest}") as answer:
                assert await answer.read() == data
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
async def test_no_worker_outlives_its_supervisor(
    fake_upstream: FakeUpstreamServer, tmp_path: Path, signum: int
) -> None:
    mirror = Mirror(tmp_path, fake_upstream.url, "--workers", str(WORKERS))
    await asyncio.to_thread(mirror.start)
    workers = await wait_for_workers(mirror, mirror.pid)
    mirror.signal(signum)
    await asyncio.to_thread(mirror.wait, 30)
    deadline = time.monotonic() + 30
    while any_alive(workers):  # reaped by init once gone
        assert time.monotonic() < deadline, "workers survived their supervisor"
        await asyncio.sleep(0.05)
    await asyncio.to_thread(mirror.stop)


@pytest.mark.parametrize(
    "size",
    [300_000, 1_500_000],
    ids=["small: hashed by the worker serving it", "large: vouched for by its owner"],
)
async def test_a_blob_corrupted_while_stopped_is_never_served_by_any_worker(
    fake_upstream: FakeUpstreamServer, tmp_path: Path, size: int
) -> None:
    assert (size <= HASHED_HERE) == (size == 300_000)
    data = os.urandom(size)
    fake_upstream.registry.add_image("team/app", "1.0", [b"x"])
    digest = fake_upstream.registry.add_blob(data)
    mirror = Mirror(tmp_path, fake_upstream.url, "--workers", str(WORKERS))
    async with started(mirror), aiohttp.ClientSession() as client:
        response = await client.get(f"{mirror.url}/v2/team/app/blobs/{digest}")
        assert await response.read() == data
    final = mirror.cache_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]
    damaged = bytearray(final.read_bytes())
    damaged[size // 2] ^= 0x04
    final.write_bytes(bytes(damaged))

    async with started(mirror):
        await wait_for_workers(mirror, mirror.pid)
        owner = int(digest[7:15], 16) % WORKERS  # as BlobStore.owner_of splits digests
        # The other worker first: it must ask the owner, which finds the damage.
        order = [(owner + 1) % WORKERS, owner]
        sessions = [unix_session(mirror, i) for i in order]
        try:
            for session in sessions:
                async with session.get(f"http://mirror/v2/team/app/blobs/{digest}") as response:
                    assert await response.read() == data
        finally:
            for session in sessions:
                await session.close()
    assert final.read_bytes() == data  # refetched, verified, in place again


def owned_by(index: int, size: int) -> bytes:
    """Random bytes whose digest worker `index` owns (as `ShardedStore.owner_of` splits them)."""
    while True:
        data = os.urandom(size)
        if int(hashlib.sha256(data).hexdigest()[:8], 16) % WORKERS == index:
            return data


async def test_the_admin_api_of_worker_0_reaches_the_blobs_and_memory_of_every_worker(
    fake_upstream: FakeUpstreamServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Evict, verify, invalidate and the cache statistics act on every worker's share, not on
    worker 0's alone: an evicted manifest is served from no worker's memory afterwards."""
    monkeypatch.setenv("REGISTRY_PROXY_PREFETCH", "false")  # what is cached is what was pulled
    registry = fake_upstream.registry
    blobs = [owned_by(index, 200_000) for index in range(WORKERS)]
    digests = [registry.add_blob(data) for data in blobs]
    image = registry.add_image("team/app", "1.0", [b"x"])
    port = free_port()
    flags = ("--workers", str(WORKERS), "--admin-listen", f"127.0.0.1:{port}")
    mirror = Mirror(tmp_path, fake_upstream.url, *flags)
    admin = f"http://127.0.0.1:{port}"
    by_digest = f"http://mirror/v2/team/app/manifests/{image.manifest_digest}"
    by_tag = "http://mirror/v2/team/app/manifests/1.0"
    async with started(mirror), aiohttp.ClientSession() as client:
        await wait_for_workers(mirror, mirror.pid)
        await wait_for_admin(client, admin)
        sessions = [unix_session(mirror, index) for index in range(WORKERS)]
        try:
            for digest, data in zip(digests, blobs, strict=True):
                async with sessions[0].get(f"http://mirror/v2/team/app/blobs/{digest}") as got:
                    assert await got.read() == data
            for session in sessions:  # each worker answers the manifests from its memory
                for url in (by_digest, by_digest, by_digest, by_tag, by_tag):
                    async with session.get(url) as got:
                        assert got.status == 200

            stats = await (await client.get(f"{admin}/stats")).json()
            assert stats["entries"] == len(blobs) + 1
            assert stats["size"] == sum(map(len, blobs)) + len(image.manifest_bytes)
            assert stats["budget"] == 1024**3

            fetched = registry.count("GET", f"/manifests/{image.manifest_digest}")
            for digest in (*digests, image.manifest_digest):
                async with client.post(f"{admin}/evict", json={"digest": digest}) as evicted:
                    assert evicted.status == 200, await evicted.text()
            for session in sessions:
                async with session.get(by_digest) as got:
                    assert got.headers["X-Cache"] == "MISS"
            refetched = registry.count("GET", f"/manifests/{image.manifest_digest}")
            assert refetched == fetched + WORKERS
            for digest, data in zip(digests, blobs, strict=True):
                async with sessions[1].get(f"http://mirror/v2/team/app/blobs/{digest}") as got:
                    assert got.headers["X-Cache"] == "MISS"
                    assert await got.read() == data

            damaged = digests[1]  # worker 1's
            path = mirror.cache_dir / "blobs" / "sha256" / damaged[7:9] / damaged[7:]
            path.write_bytes(b"bit rot" * 100)
            verified = await (await client.post(f"{admin}/verify")).json()
            assert verified["checked"] == len(blobs) + 1
            assert verified["corrupt"] == [damaged]

            # Without Redis each worker keeps its own resolution of the tag: each is made stale.
            retagged = registry.add_image("team/app", "1.0", [b"y"])
            invalidated = await client.post(
                f"{admin}/invalidate", json={"repository": "team/app", "tag": "1.0"}
            )
            assert (await invalidated.json())["invalidated"] == 1  # tags, not workers
            for session in sessions:
                async with session.get(by_tag) as got:
                    assert got.headers["Docker-Content-Digest"] == retagged.manifest_digest
        finally:
            for session in sessions:
                await session.close()


async def test_pins_set_through_the_admin_api_hold_in_every_worker_or_in_none(
    fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> None:
    """Each worker keeps its share of the pinned blobs within its share of the budget: pins set
    through worker 0 reach every worker, and when one worker cannot hold its share, none keeps
    the new pins."""
    registry = fake_upstream.registry
    small = registry.add_image("team/small", "1", [owned_by(1, 10_000)])
    registry.add_image("team/huge", "1", [owned_by(1, 300_000)])  # over worker 1's 256 KiB
    port = free_port()
    flags = ("--workers", str(WORKERS), "--admin-listen", f"127.0.0.1:{port}")
    mirror = Mirror(tmp_path, fake_upstream.url, *flags, "--cache-max-size", "512KiB")
    admin = f"http://127.0.0.1:{port}"
    host = fake_upstream.host
    async with started(mirror), aiohttp.ClientSession() as client:
        await wait_for_workers(mirror, mirror.pid)
        await wait_for_admin(client, admin)
        pins = {"references": [f"{host}/team/small:1"]}
        async with client.put(f"{admin}/pins", json=pins) as answer:
            assert answer.status == 200, await answer.text()
        layer = small.layer_digests[0]
        async with client.get(f"{mirror.url}/v2/team/small/blobs/{layer}") as got:
            assert got.status == 200
            await got.read()
        async with client.get(f"{admin}/pins") as listing:
            [pin] = (await listing.json())["pins"]
        assert pin["cached_bytes"] >= 10_000  # worker 1's layer, counted by worker 0
        async with client.post(f"{admin}/evict", json={"digest": layer}) as evicted:
            assert evicted.status == 409  # worker 1, which owns the layer, has it pinned

        huge = {"references": [f"{host}/team/huge:1"]}
        async with client.put(f"{admin}/pins", json=huge) as refused:
            assert refused.status == 422
            assert (await refused.json())["error"].startswith("pins refused: ")
        async with client.get(f"{admin}/pins") as listing:
            assert [pin["reference"] for pin in (await listing.json())["pins"]] == pins[
                "references"
            ]
        async with client.post(f"{admin}/evict", json={"digest": layer}) as evicted:
            assert evicted.status == 409


async def test_an_image_served_by_one_worker_has_every_blob_prefetched_by_its_owner(
    fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> None:
    """A worker prefetches the blobs it owns; those of an image it served that other workers
    own are prefetched by them, each once, before the client asks."""
    registry = fake_upstream.registry
    layers = [owned_by(index, 50_000) for index in range(WORKERS)]
    image = registry.add_image("team/app", "1.0", layers)
    mirror = Mirror(tmp_path, fake_upstream.url, "--workers", str(WORKERS))
    async with started(mirror):
        await wait_for_workers(mirror, mirror.pid)
        worker_0 = unix_session(mirror, 0)
        try:
            url = f"http://mirror/v2/team/app/manifests/{image.manifest_digest}"
            async with worker_0.get(url) as served:
                assert served.status == 200
        finally:
            await worker_0.close()
        blobs = [image.config_digest, *image.layer_digests]
        paths = [mirror.cache_dir / "blobs" / "sha256" / d[7:9] / d[7:] for d in blobs]
        deadline = time.monotonic() + 20
        while not all(path.exists() for path in paths):  # the owners' downloads: no event here
            assert time.monotonic() < deadline, "not every blob was prefetched"
            await asyncio.sleep(0.05)
        worker_1 = unix_session(mirror, 1)
        try:
            for digest, data in zip(image.layer_digests, layers, strict=True):
                async with worker_1.get(f"http://mirror/v2/team/app/blobs/{digest}") as got:
                    assert got.headers["X-Cache"] == "HIT"
                    assert await got.read() == data
        finally:
            await worker_1.close()
    for digest in blobs:
        assert registry.count("GET", f"/blobs/{digest}") == 1


async def test_the_workers_own_route_is_not_reachable_by_clients(
    fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> None:
    """Workers ask each other to evict over their private sockets; over TCP, even with the relay
    header, that route does not exist."""
    data = os.urandom(100_000)
    digest = fake_upstream.registry.add_blob(data)
    fake_upstream.registry.add_image("team/app", "1.0", [b"x"])
    mirror = Mirror(tmp_path, fake_upstream.url, "--workers", str(WORKERS))
    async with started(mirror), aiohttp.ClientSession() as client:
        await wait_for_workers(mirror, mirror.pid)
        blob = f"{mirror.url}/v2/team/app/blobs/{digest}"
        assert await (await client.get(blob)).read() == data
        for _ in range(2 * WORKERS):  # whichever worker accepts the connection
            attempt = await client.post(
                f"{mirror.url}/_worker/evict",
                json={"digest": digest},
                headers={"X-Registry-Proxy-Relay": "1"},
            )
            assert attempt.status == 404
            assert (await attempt.json())["errors"][0]["code"] == "NAME_UNKNOWN"
        async with client.get(blob) as again:
            assert again.headers["X-Cache"] == "HIT"
        assert fake_upstream.registry.count("GET", path_contains=digest) == 1


async def test_workers_sharing_a_pipe_for_their_log_never_cut_a_line(tmp_path: Path) -> None:
    """In a container stderr is a pipe, which every worker writes its log to: no line may come
    out cut in two by another worker's write (a write of more than PIPE_BUF bytes to a pipe is
    not kept whole), so every line read is a whole JSON object."""
    port = free_port()
    cache = tmp_path / "cache"
    command = serve_command(port, cache, "--upstream", "http://127.0.0.1:9", "--workers", "2")
    process = await asyncio.create_subprocess_exec(
        *command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=REPO_ROOT
    )
    lines: list[bytes] = []

    async def read(stderr: asyncio.StreamReader) -> None:
        while line := await stderr.readline():
            lines.append(line)

    assert process.stderr is not None
    reading = asyncio.create_task(read(process.stderr))
    try:
        sockets = [cache / "run" / f"worker-{index}.sock" for index in range(WORKERS)]
        deadline = time.monotonic() + 20
        while not all(path.exists() for path in sockets):  # another process: nothing to await
            assert time.monotonic() < deadline, "workers did not start"
            await asyncio.sleep(0.05)
        # Long lines, so that each worker's batches are many pipe pages long.
        agent = {"User-Agent": "containerd/" + "x" * 1500}
        sessions = [unix_session_at(path) for path in sockets]

        async def pings(session: aiohttp.ClientSession) -> None:
            for _ in range(200):
                async with session.get("http://mirror/v2/", headers=agent) as answer:
                    assert answer.status == 200

        try:
            await asyncio.gather(*(pings(sessions[n % WORKERS]) for n in range(40)))
        finally:
            for session in sessions:
                await session.close()
    finally:
        process.terminate()
        await process.wait()
        await reading
    records = [json.loads(line) for line in lines]  # raises on a line cut by another's write
    access = [record for record in records if record["logger"] == "registry_proxy.access"]
    assert len(access) == 40 * 200


def mode(path: Path) -> int:
    return path.lstat().st_mode & 0o777


async def test_worker_sockets_and_cache_files_are_private_to_the_mirror_user(
    fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> None:
    """A relay is trusted as coming from a sibling worker, and cached images may be private:
    neither the sockets nor the files may be open to other local users, whatever the umask."""
    data = os.urandom(300_000)
    fake_upstream.registry.add_image("team/app", "1.0", [b"x"])
    digest = fake_upstream.registry.add_blob(data)
    mirror = Mirror(tmp_path, fake_upstream.url, "--workers", str(WORKERS))
    previous = os.umask(0o022)  # the usual default, which the mirror must not rely on
    try:
        async with started(mirror):
            await wait_for_workers(mirror, mirror.pid)
            async with aiohttp.ClientSession() as client:
                for _ in range(2):  # a miss into the cache, then a hit from it
                    response = await client.get(f"{mirror.url}/v2/team/app/blobs/{digest}")
                    assert await response.read() == data
            run = mirror.cache_dir / "run"
            assert mode(run) == 0o700
            assert mode(run / "metrics") == 0o700
            for index in range(WORKERS):
                assert mode(run / f"worker-{index}.sock") == 0o600
            for directory in ("blobs", "tmp"):
                assert mode(mirror.cache_dir / directory) == 0o700
            blob = mirror.cache_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]
            assert blob.read_bytes() == data
            assert mode(blob) == 0o600
            assert mode(blob.parent) == mode(blob.parent.parent) == 0o700
    finally:
        os.umask(previous)


def test_workers_opening_the_provenance_record_at_once_all_keep_it(tmp_path: Path) -> None:
    """SQLite answers "locked" at once, not after its busy timeout, to a second process switching
    a new file to WAL: every worker still ends up with the shared file, none in memory only."""
    for attempt in range(100):
        cache_dir = tmp_path / str(attempt)
        records = [Provenance(cache_dir) for _ in range(2)]
        opening = [threading.Thread(target=record.open) for record in records]
        for thread in opening:
            thread.start()
        for thread in opening:
            thread.join()
        assert all(record.persistent for record in records), attempt
        for record in records:
            record.close()


async def test_a_worker_that_does_not_answer_is_reported_not_waited_for(tmp_path: Path) -> None:
    """Worker 0's admin API says which worker it could not reach (one restarting, or stopped
    with its socket still accepting) instead of hanging or claiming the work done."""
    worker = Worker(0, 3, tmp_path)
    relay = OwnerRelay(worker)
    siblings = Siblings(worker, relay)
    evict = {"digest": "sha256:" + "0" * 64}
    try:
        with pytest.raises(SiblingUnreachable, match="worker 1 is unreachable") as failed:
            await siblings.run("evict", evict)  # no sockets: restarting
        assert "worker 2 is unreachable" in str(failed.value)  # every one named, not the first
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stopped:
            stopped.bind(str(worker.socket_path(1)))
            stopped.listen()  # accepts into its backlog, never answers
            with (
                mock.patch("proxy.workers.siblings.ANSWER_SECONDS", 0.2),
                pytest.raises(SiblingUnreachable, match="worker 1 is unreachable"),
            ):
                await siblings.run("evict", evict)
    finally:
        await relay.close()


def test_a_followed_download_is_opened_by_its_inode_under_either_name(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.create()
    digest = Digest.of(b"blob")
    layout.temp_path(digest).write_bytes(b"blo")
    written = identity(os.stat(layout.temp_path(digest)))
    with open_followed(layout, digest, written) as fd:
        assert fd is not None
        assert os.pread(fd, 10, 0) == b"blo"
    layout.make_shard_dir(digest)
    os.rename(layout.temp_path(digest), layout.blob_path(digest))  # committed meanwhile
    with open_followed(layout, digest, written) as fd:
        assert fd is not None
    # Another file under the name (evicted and fetched again): not the one the feed is about.
    held = os.open(layout.blob_path(digest), os.O_RDONLY)  # its inode number stays taken
    try:
        layout.blob_path(digest).unlink()
        layout.temp_path(digest).write_bytes(b"blob")
        with open_followed(layout, digest, written) as fd:
            assert fd is None
    finally:
        os.close(held)
