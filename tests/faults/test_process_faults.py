"""The mirror process killed with SIGKILL while it evicts, and while it rebuilds its index.

The mirror runs as a subprocess (`harness.mirror.Mirror`) in front of the in-process fake
upstream, so a kill is a real `kill -9` and the restart reads the directory the dead process left.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import time
from pathlib import Path

import aiohttp
from fakeupstream import FakeUpstreamServer, Gate
from harness.digests import sha256_digest
from harness.mirror import Mirror
from harness.ports import free_port

from faults.support import assert_cache_sound, audit_cache, final_path

REPOSITORY = "team/app"
KIB = 1024
# An external process gives no event to wait on: these bound the polling of its log and its dir.
POLL_SECONDS = 0.005
DEADLINE_SECONDS = 20.0


async def pull(session: aiohttp.ClientSession, url: str, data: bytes) -> bool:
    """True when the exact bytes arrived, False when the transfer failed; never wrong bytes."""
    try:
        async with session.get(url) as response:
            assert response.status == 200, response.status
            body = await response.read()
    except aiohttp.ClientError:
        return False
    assert body == data, "a complete body that is not the blob"
    return True


async def wait_until_tmp_is_empty(cache_dir: Path) -> None:
    """Deletions of evicted blobs run in threads after start-up; poll them out, bounded."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        left = audit_cache(cache_dir).temp
        if not left:
            return
        assert time.monotonic() < deadline, f"tmp/ still holds {left[:5]}"
        await asyncio.sleep(POLL_SECONDS)


async def test_a_mirror_killed_while_a_herd_forces_evictions_restarts_with_a_sound_cache(
    fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> None:
    registry = fake_upstream.registry
    registry.add_image(REPOSITORY, "1.0", [b"x"])
    budget = 512 * KIB
    blobs = [os.urandom(64 * KIB - n) for n in range(26)]
    digests = [registry.add_blob(data) for data in blobs]
    gated = digests[:2]  # held mid-body, so downloads are in flight at the kill
    gates = {digest: Gate(after_bytes=16 * KIB) for digest in gated}
    registry.gate.update(gates)
    mirror = Mirror(tmp_path, fake_upstream.url, "--cache-max-size", f"{budget // KIB}K")
    await asyncio.to_thread(mirror.start)
    try:
        async with aiohttp.ClientSession() as session:

            def url(digest: str) -> str:
                return f"{mirror.url}/v2/{REPOSITORY}/blobs/{digest}"

            # Fill the budget: every later blob evicts one.
            for digest, data in zip(digests[2:10], blobs[2:10], strict=True):
                assert await pull(session, url(digest), data)

            completed = asyncio.Semaphore(0)

            async def pull_and_count(digest: str, data: bytes) -> bool:
                done = await pull(session, url(digest), data)
                if done:
                    completed.release()
                return done

            herd = [
                asyncio.create_task(pull_and_count(digest, data))
                for digest, data in zip(digests, blobs, strict=True)
                if digest not in digests[2:10]
                for _ in range(3)
            ]
            await asyncio.gather(*(gate.reached.wait() for gate in gates.values()))
            for _ in range(6):
                await completed.acquire()  # evictions are happening
            await asyncio.to_thread(mirror.kill)
            await asyncio.gather(*herd)  # each one exact or failed, never wrong bytes

            # What the dead process left: maybe files in tmp/, never a partial at a final path.
            assert audit_cache(mirror.cache_dir).problems == []

            for gate in gates.values():
                gate.release.set()
            await asyncio.to_thread(mirror.start)
            await wait_until_tmp_is_empty(mirror.cache_dir)
            assert assert_cache_sound(mirror.cache_dir).size <= budget
            for digest, data in zip(digests, blobs, strict=True):
                assert await pull(session, url(digest), data)
            await wait_until_tmp_is_empty(mirror.cache_dir)
            audit = assert_cache_sound(mirror.cache_dir)
            assert 0 < audit.size <= budget
    finally:
        await asyncio.to_thread(mirror.stop)


def populate(cache_dir: Path, count: int) -> tuple[dict[str, bytes], list[Path]]:
    """`count` valid small blobs in the documented layout (oldest first), plus junk.

    Returns the blobs by digest and the junk paths the mirror is expected to leave alone.
    """
    blobs: dict[str, bytes] = {}
    for n in range(count):
        data = os.urandom(50 + n % 100)
        digest = sha256_digest(data)
        path = final_path(cache_dir, digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (1_700_000_000 + n, 1_700_000_000 + n))  # a defined LRU order
        blobs[digest] = data
    sha = cache_dir / "blobs" / "sha256"
    some = hashlib.sha256(b"misplaced").hexdigest()
    wrong_shard = "00" if not some.startswith("00") else "01"
    junk = [
        cache_dir / "blobs" / "stray.txt",
        sha / "README",
        sha / "ab" / "not-a-digest",
        sha / wrong_shard / some,  # a digest name in the wrong shard
        sha / some[:2] / some.upper(),  # upper-case hex is not a digest
        sha / some[:2] / f"{some}.partial",
        sha / "cd" / ("cd" + "0" * 62),  # a directory where a blob would be
        cache_dir / "blobs" / "md5" / "aa" / ("a" * 32),
    ]
    for path in junk:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name.startswith("cd"):
            path.mkdir()
        else:
            path.write_bytes(b"junk")
    (cache_dir / "tmp").mkdir(parents=True, exist_ok=True)
    a_blob = next(iter(blobs.values()))
    partial = os.urandom(4 * KIB)
    (cache_dir / "tmp" / f"sha256-{sha256_digest(partial)[7:]}").write_bytes(partial[:1000])
    (cache_dir / "tmp" / "evicted-999-0").write_bytes(a_blob)
    (cache_dir / "tmp" / f"sha256-{sha256_digest(a_blob)[7:]}.999.small").write_bytes(a_blob)
    return blobs, junk


ANSWERING = "<answers GET /v2/>"


async def start_and_kill(mirror: Mirror, marker: str | None) -> None:
    """Start the mirror process and SIGKILL it as soon as its log shows `marker` (None: at once;
    `ANSWERING`: once it answers `GET /v2/`)."""
    if mirror.port == 0:
        mirror.port = free_port()
    log_size = mirror.log_path.stat().st_size if mirror.log_path.exists() else 0
    with mirror.log_path.open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            *mirror.command(),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + DEADLINE_SECONDS
        while marker is not None and process.returncode is None:
            if await _has_reached(mirror, marker, log_size):
                break
            assert time.monotonic() < deadline, f"the mirror never reached {marker!r}"
            await asyncio.sleep(POLL_SECONDS)
        assert process.returncode is None, "the mirror exited by itself during start-up"
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def _has_reached(mirror: Mirror, marker: str, log_size: int) -> bool:
    if marker == ANSWERING:
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://{mirror.host}/v2/") as response,
            ):
                return response.status == 200
        except aiohttp.ClientError:
            return False
    with mirror.log_path.open("rb") as log:
        log.seek(log_size)
        return marker.encode() in log.read()


async def test_a_mirror_killed_again_and_again_during_start_up_then_serves_a_sound_cache(
    fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> None:
    registry = fake_upstream.registry
    registry.add_image(REPOSITORY, "1.0", [b"x"])
    new_blob = os.urandom(10 * KIB)
    new_digest = registry.add_blob(new_blob)
    budget = 200 * KIB  # below the ~300 KiB planted: start-up itself evicts
    mirror = Mirror(tmp_path, fake_upstream.url, "--cache-max-size", f"{budget // KIB}K")
    blobs, junk = populate(mirror.cache_dir, 3000)

    # At once; as the app is built; mid-scan (the scan logs the junk); right after the rebuild
    # (start-up evictions are still being deleted); and once it answers.
    markers = [None, "serving on", "ignoring stray file", "cache index rebuilt", ANSWERING]
    for marker in markers:
        await start_and_kill(mirror, marker)
        assert audit_cache(mirror.cache_dir, junk=junk).problems == []

    await asyncio.to_thread(mirror.start)
    try:
        await wait_until_tmp_is_empty(mirror.cache_dir)
        audit = assert_cache_sound(mirror.cache_dir, junk=junk)
        assert 0 < audit.size <= budget
        for path in junk:
            assert path.exists()  # junk is ignored, not deleted and not served
        survivors = sorted(audit.blobs)
        assert survivors
        async with aiohttp.ClientSession() as session:
            base = f"{mirror.url}/v2/{REPOSITORY}/blobs"
            for digest in [*survivors[:20], survivors[-1]]:
                async with session.get(f"{base}/{digest}") as response:
                    assert response.headers["X-Cache"] == "HIT"
                    assert await response.read() == blobs[digest]
            assert await pull(session, f"{base}/{new_digest}", new_blob)
            assert registry.count("GET", path_contains="/blobs/") == 1
        await wait_until_tmp_is_empty(mirror.cache_dir)
        assert_cache_sound(mirror.cache_dir, junk=junk)
    finally:
        await asyncio.to_thread(mirror.stop)
