"""Cached files damaged on disk while the mirror was stopped are never served as complete.

The mirror is stopped (its app closed), a cached blob and a cached manifest are damaged in place,
and a new mirror starts on the same directory, as after a reboot with a bad disk sector.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from fakeupstream import FakeUpstreamServer, Image
from harness.mirror import StartMirror

from faults.support import (
    REPOSITORY,
    Client,
    assert_cache_sound,
    assert_exact_or_broken,
    fetch,
    final_path,
    settle,
)


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "one bit flipped":
        data[len(data) // 2] ^= 0x01
    elif how == "truncated":
        del data[-1]
    else:  # "grown"
        data += b"\0"
    # Keep the modification time: recency must not be what gives the damage away.
    stat = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


async def warm(client: Client, image: Image) -> None:
    for path in (
        f"/v2/{REPOSITORY}/manifests/1.0",
        f"/v2/{REPOSITORY}/blobs/{image.layer_digests[1]}",
    ):
        assert (await fetch(client, path)).status == 200
    await settle(client)


@pytest.mark.parametrize("how", ["one bit flipped", "truncated", "grown"])
async def test_a_blob_damaged_on_disk_is_refetched_never_served_as_complete(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image, tmp_path: Path, how: str
) -> None:
    cache_dir = tmp_path / "cache"
    digest = image.layer_digests[1]
    data = fake_upstream.registry.blobs[digest]
    first = await mirror(cache_dir=cache_dir)
    await warm(first, image)
    await first.close()
    damage(final_path(cache_dir, digest), how)

    client = await mirror(cache_dir=cache_dir)
    url = f"/v2/{REPOSITORY}/blobs/{digest}"
    # The first reads after the start, all at once: whole bodies, a range, a HEAD.
    outcomes = await asyncio.gather(
        *(fetch(client, url) for _ in range(10)),
        fetch(client, url, headers={"Range": "bytes=100-2099"}),
    )
    for outcome in outcomes[:10]:
        assert_exact_or_broken(outcome, data)
    assert_exact_or_broken(outcomes[10], data[100:2100])
    head = await fetch(client, url, method="HEAD")
    assert head.headers["Content-Length"] == str(len(data))
    await settle(client)

    again = await fetch(client, url)
    assert again.headers["X-Cache"] == "HIT"
    assert again.body == data
    assert fake_upstream.registry.count("GET", path_contains=digest) == 2  # refetched once
    assert_cache_sound(cache_dir)


async def test_a_manifest_damaged_on_disk_is_refetched_never_served(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    first = await mirror(cache_dir=cache_dir)
    await warm(first, image)
    await first.close()
    damage(final_path(cache_dir, image.manifest_digest), "one bit flipped")

    client = await mirror(cache_dir=cache_dir)
    for reference in (image.manifest_digest, "1.0", image.manifest_digest):
        outcome = await fetch(client, f"/v2/{REPOSITORY}/manifests/{reference}")
        assert outcome.status == 200
        assert outcome.body == image.manifest_bytes
    head = await fetch(client, f"/v2/{REPOSITORY}/manifests/{image.manifest_digest}", method="HEAD")
    assert head.headers["Content-Length"] == str(len(image.manifest_bytes))
    assert_cache_sound(cache_dir)
