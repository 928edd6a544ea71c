"""A mirror process killed with SIGKILL mid-download restarts clean and refetches."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest
from fakeupstream import FakeUpstreamServer, Gate
from harness.mirror import Mirror

from faults.support import audit_cache


async def test_a_mirror_killed_mid_download_leaves_no_partial_blob_and_refetches(
    fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> None:
    data = os.urandom(2 * 1024 * 1024)
    fake_upstream.registry.add_image("team/app", "1.0", [b"x"])
    digest = fake_upstream.registry.add_blob(data)
    gate = fake_upstream.registry.gate[digest] = Gate(after_bytes=256 * 1024)
    mirror = Mirror(tmp_path, fake_upstream.url)
    await asyncio.to_thread(mirror.start)
    temp_dir = mirror.cache_dir / "tmp"
    final = mirror.cache_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]
    try:
        async with aiohttp.ClientSession() as session:
            url = f"{mirror.url}/v2/team/app/blobs/{digest}"

            first_bytes = asyncio.Event()

            async def pull() -> bytes:
                async with session.get(url) as response:
                    body = await response.content.readany()
                    first_bytes.set()  # so the mirror has written them to its temporary file
                    return body + await response.read()

            doomed = asyncio.create_task(pull())
            await gate.reached.wait()
            await first_bytes.wait()
            # Read through the audit: the readiness check's write probe (`.ready-*`) comes and
            # goes in tmp/ every few seconds, and a listing may catch it.
            partials = audit_cache(mirror.cache_dir).temp
            assert len(partials) == 1
            assert (temp_dir / partials[0]).stat().st_size > 0
            mirror.kill()
            with pytest.raises(aiohttp.ClientError):
                await doomed

            await asyncio.to_thread(mirror.start)
            restarted = audit_cache(mirror.cache_dir)
            assert restarted.temp == []
            assert restarted.problems == []
            assert not final.exists()

            gate.release.set()
            assert await pull() == data
            assert fake_upstream.registry.count("GET", path_contains=digest) == 2
            assert final.read_bytes() == data
    finally:
        await asyncio.to_thread(mirror.stop)
