"""The provenance record (proxy.cache.provenance) stays in proportion to the cache: what is
evicted is forgotten, and so is what a mirror finds recorded at start-up but no longer cached."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiohttp
from fakeupstream import FakeUpstreamServer
from harness.mirror import StartMirror

from proxy.cache.provenance import FILE_NAME, Provenance
from proxy.oci import Digest
from proxy.server import keys as state

KIB = 1024


def recorded(cache_dir: Path) -> set[str]:
    with sqlite3.connect(cache_dir / FILE_NAME) as connection:
        return {digest for (digest,) in connection.execute("SELECT digest FROM seen")}


async def test_an_evicted_blob_is_forgotten_and_a_cached_one_kept(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> None:
    # Room for two of the three layers: the third pull evicts the first.
    layers = [bytes([n]) * 40 * KIB for n in range(3)]
    image = fake_upstream.registry.add_image("team/app", "1", layers)
    client = await mirror(cache_max_size=100 * KIB)
    # One connection: the mirror takes a request only once it has finished the one before
    # (recorded its digest), and the ping last is taken once the third has.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        for path in [*(f"/v2/team/app/blobs/{d}" for d in image.layer_digests), "/v2/"]:
            async with session.get(client.make_url(path)) as response:
                assert response.status == 200
                await response.read()
    store = client.app[state.STORE]
    first, *kept = (Digest.parse(d) for d in image.layer_digests)
    assert first not in store
    assert all(digest in store for digest in kept)

    await store.idle()
    await client.app[state.PROVENANCE].idle()

    assert recorded(tmp_path / "cache") == {str(digest) for digest in kept}


async def test_at_start_up_digests_no_longer_cached_are_forgotten(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> None:
    image = fake_upstream.registry.add_image("team/app", "1", [b"layer"])
    layer = image.layer_digests[0]
    client = await mirror()
    await (await client.get(f"/v2/team/app/blobs/{layer}")).read()
    await client.close()  # the mirror's cleanup waits for its writes
    # Left by an older release, or by an eviction the process did not live to record.
    gone = "sha256:" + "ab" * 32
    record = Provenance(tmp_path / "cache")
    record.open()
    record._insert(gone, ("fake", "team/old"))
    record._insert("not-a-digest", ("fake", "team/old"))
    record.close()
    assert recorded(tmp_path / "cache") == {layer, gone, "not-a-digest"}

    again = await mirror()
    await again.close()  # and for the pruning it started

    assert recorded(tmp_path / "cache") == {layer}
