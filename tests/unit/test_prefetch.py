"""Prefetch: serving an image manifest starts its missing blobs' downloads in the background,
the same single-flight downloads clients join, after clients, within the budget."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from fakeupstream import ACCEPT_ALL_MANIFESTS, FakeUpstreamServer, Gate, Image
from harness.mirror import StartMirror
from yarl import URL

from proxy.cache.store import BlobStore
from proxy.config import ConfigError, UpstreamSettings
from proxy.config.load import load_settings
from proxy.oci import Digest
from proxy.server import keys

Client = TestClient[web.Request, web.Application]
ACCEPT = {"Accept": ACCEPT_ALL_MANIFESTS}
KIB = 1024


def blobs_of(image: Image) -> list[str]:
    return [image.config_digest, *image.layer_digests]


def blob_gets(upstream: FakeUpstreamServer) -> list[str]:
    return [r.path.rsplit("/", 1)[1] for r in upstream.registry.requests if "/blobs/" in r.path]


async def settled(client: Client) -> None:
    await client.app[keys.PREFETCH].settled()


async def test_a_client_joins_the_download_prefetch_started(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    layer = b"L" * 64 * KIB
    image = fake_upstream.registry.add_image("team/app", "1.0", [layer, b"other" * 100])
    digest = image.layer_digests[0]
    gate = fake_upstream.registry.gate[digest] = Gate(after_bytes=16 * KIB)
    client = await mirror(prefetch=True)

    assert (await client.get("/v2/team/app/manifests/1.0", headers=ACCEPT)).status == 200
    await gate.reached.wait()  # prefetch is fetching it, nobody asked yet

    response = await client.get(f"/v2/team/app/blobs/{digest}")
    assert response.status == 200
    assert response.headers["X-Cache"] == "COALESCED"
    gate.release.set()
    assert await response.read() == layer
    await settled(client)
    assert blob_gets(fake_upstream).count(digest) == 1
    assert sorted(blob_gets(fake_upstream)) == sorted(blobs_of(image))

    metrics = (await (await client.get("/metrics")).text()).splitlines()
    assert "registry_proxy_prefetched_blobs_total 3.0" in metrics
    total = sum(len(b) for b in (image.config_bytes, layer, b"other" * 100))
    assert f"registry_proxy_prefetched_bytes_total {float(total)}" in metrics
    assert "registry_proxy_prefetch_used_blobs_total 1.0" in metrics


async def test_only_the_platform_the_client_asked_for_is_prefetched(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    registry = fake_upstream.registry
    amd64 = registry.add_image("team/app", None, [b"amd64 layer"], platform="linux/amd64")
    arm64 = registry.add_image("team/app", None, [b"arm64 layer"], platform="linux/arm64")
    registry.add_index("team/app", "1.0", {"linux/amd64": amd64, "linux/arm64": arm64})
    client = await mirror(prefetch=True)

    assert (await client.get("/v2/team/app/manifests/1.0", headers=ACCEPT)).status == 200
    await settled(client)
    assert blob_gets(fake_upstream) == []  # an index: which platform is the client's to say

    url = f"/v2/team/app/manifests/{arm64.manifest_digest}"
    assert (await client.get(url, headers=ACCEPT)).status == 200
    await settled(client)
    assert sorted(blob_gets(fake_upstream)) == sorted(blobs_of(arm64))
    store = client.app[keys.STORE]
    assert all(Digest.parse(d) in store for d in blobs_of(arm64))
    assert not any(Digest.parse(d) in store for d in blobs_of(amd64))


async def test_switched_off_globally_or_for_the_upstream_nothing_is_fetched_in_the_background(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    fake_upstream.registry.add_image("team/app", "1.0", [b"layer one", b"layer two"])
    off = UpstreamSettings("fake", URL(fake_upstream.url), prefetch=False)
    for settings in ({"prefetch": False}, {"prefetch": True, "upstreams": (off,)}):
        client = await mirror(**settings)
        assert (await client.get("/v2/team/app/manifests/1.0", headers=ACCEPT)).status == 200
        await settled(client)
        assert blob_gets(fake_upstream) == []
        await client.close()


async def test_prefetch_leaves_a_quarter_of_the_download_slots_to_clients(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    registry = fake_upstream.registry
    layers = [bytes([n]) * 32 * KIB for n in range(6)]
    image = registry.add_image("team/app", "1.0", layers)
    gates = {d: Gate(after_bytes=KIB) for d in image.layer_digests}
    registry.gate.update(gates)
    # 4 slots: prefetch takes at most 3, whatever its own concurrency.
    client = await mirror(prefetch=True, prefetch_concurrency=8, max_downloads_per_upstream=4)

    assert (await client.get("/v2/team/app/manifests/1.0", headers=ACCEPT)).status == 200
    first_three = [gates[d] for d in image.layer_digests[:3]]
    await asyncio.gather(*(gate.reached.wait() for gate in first_three))
    assert [d for d in blob_gets(fake_upstream) if d in gates] == image.layer_digests[:3]

    # The slot left over is a client's: its request goes upstream at once.
    last = image.layer_digests[-1]
    response = await client.get(f"/v2/team/app/blobs/{last}")
    assert response.headers["X-Cache"] == "MISS"
    await gates[last].reached.wait()
    for gate in gates.values():
        gate.release.set()
    assert await response.read() == layers[-1]
    await settled(client)
    assert sorted(blob_gets(fake_upstream)) == sorted(blobs_of(image))


async def test_with_a_budget_smaller_than_the_image_prefetch_keeps_it_and_spares_readers(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    registry = fake_upstream.registry
    read = registry.add_image("team/read", "1.0", [b"r" * 20 * KIB])
    layers = [bytes([n]) * 20 * KIB for n in range(8)]  # 160 KiB of layers
    image = registry.add_image("team/app", "1.0", layers)
    budget = 100 * KIB
    client = await mirror(prefetch=True, cache_max_size=budget)
    store: BlobStore = client.app[keys.STORE]
    reading = Digest.parse(read.layer_digests[0])
    assert await (await client.get(f"/v2/team/read/blobs/{reading}")).read() == b"r" * 20 * KIB

    # The budget holds whenever a download reserves its room.
    peaks: list[int] = []
    reserve = store.eviction.reserve

    async def watched(size: int) -> int:
        reserved = await reserve(size)
        eviction = store.eviction
        peaks.append(store.index.size + eviction.reserved + eviction.deleting)
        return reserved

    store.eviction.reserve = watched  # type: ignore[method-assign]

    with store.open_blob(reading) as opened:  # a client in the middle of reading it
        assert opened is not None
        assert (await client.get("/v2/team/app/manifests/1.0", headers=ACCEPT)).status == 200
        await settled(client)
        assert reading in store

    assert peaks
    assert max(peaks) <= budget
    assert store.evictions == 0  # it fetched what fit, and evicted nothing for it
    prefetched = [d for d in image.layer_digests if Digest.parse(d) in store]
    assert 0 < len(prefetched) < len(layers)
    metrics = await (await client.get("/metrics")).text()
    assert 'registry_proxy_prefetch_skipped_blobs_total{reason="no_room"}' in metrics
    assert 'registry_proxy_prefetch_skipped_blobs_total{reason="no_room"} 0.0' not in metrics

    # The client's own pull still gets every layer, evicting as the budget needs.
    for digest, layer in zip(image.layer_digests, layers, strict=True):
        response = await client.get(f"/v2/team/app/blobs/{digest}")
        assert await response.read() == layer
    assert max(peaks) <= budget


def test_prefetch_and_quota_settings_load_globally_and_per_upstream(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        "prefetch = true\nprefetch_concurrency = 2\nquota_reserve = 0\n"
        '[[upstreams]]\nurl = "https://ghcr.io"\nprefetch = false\n'
        '[[upstreams]]\nurl = "https://quay.io"\n'
    )
    settings = load_settings(config, environ={})
    assert (settings.prefetch, settings.prefetch_concurrency, settings.quota_reserve) == (
        True,
        2,
        0,
    )
    ghcr, quay = settings.upstreams
    assert not settings.prefetch_for(ghcr)
    assert settings.prefetch_for(quay)
    off = load_settings(config, environ={"REGISTRY_PROXY_PREFETCH": "false"})
    assert not off.prefetch_for(off.upstreams[1])
    with pytest.raises(ConfigError, match="quota_reserve"):
        load_settings(None, environ={"REGISTRY_PROXY_QUOTA_RESERVE": "-1"})


async def test_a_manifest_served_again_is_looked_over_again_once_a_second(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    image = fake_upstream.registry.add_image("team/app", "1.0", [b"layer" * 100])
    client = await mirror(prefetch=True)
    prefetch = client.app[keys.PREFETCH]
    now = [1000.0]
    prefetch.clock = lambda: now[0]
    await client.get("/v2/team/app/manifests/1.0", headers=ACCEPT)
    await settled(client)
    layer = Digest.parse(image.layer_digests[0])
    assert client.app[keys.STORE].evict(layer)

    # A hot tag is served over and over: the blobs' presence is not looked up every time.
    for _ in range(3):
        await client.get("/v2/team/app/manifests/1.0", headers=ACCEPT)
    await settled(client)
    assert blob_gets(fake_upstream).count(str(layer)) == 1
    now[0] += 1.0
    await client.get("/v2/team/app/manifests/1.0", headers=ACCEPT)
    await settled(client)
    assert blob_gets(fake_upstream).count(str(layer)) == 2
