"""Tags: fresh within their TTL, revalidated by HEAD, served stale while the upstream fails."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from fakeupstream import (
    ACCEPT_ALL_MANIFESTS,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    FakeUpstreamServer,
)
from harness.mirror import StartMirror
from yarl import URL

from proxy.config import UpstreamSettings
from proxy.server import keys as state

Client = TestClient[web.Request, web.Application]
ACCEPT = {"Accept": ACCEPT_ALL_MANIFESTS}


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings for the tag cache: in memory, and on a real Redis server."""
    if request.param == "memory":
        return {}
    return {"redis_url": request.getfixturevalue("redis_url")}


def manifest_calls(upstream: FakeUpstreamServer, method: str | None = None) -> int:
    return upstream.registry.count(method, path_contains="/manifests/")


async def age_resolution(client: Client, repository: str, tag: str) -> None:
    """Make a cached resolution stale, as time passing (or an operator invalidating it) would."""
    assert await client.app[state.TAGS].invalidate("fake", repository, tag) == 1


async def test_within_the_ttl_no_upstream_request_is_made(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, backend: dict[str, Any]
) -> None:
    image = fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    client = await mirror(**backend)
    first = await client.get("/v2/team/app/manifests/1.0", headers=ACCEPT)
    assert first.headers["X-Cache"] == "MISS"
    calls = manifest_calls(fake_upstream)

    for method in ("GET", "HEAD", "GET"):
        again = await client.request(method, "/v2/team/app/manifests/1.0", headers=ACCEPT)
        assert again.status == 200
        assert again.headers["X-Cache"] == "HIT"
        assert again.headers["Docker-Content-Digest"] == image.manifest_digest
    assert await again.read() == image.manifest_bytes
    assert manifest_calls(fake_upstream) == calls


async def test_a_stale_tag_is_revalidated_by_one_head_and_refetched_only_when_it_moved(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, backend: dict[str, Any]
) -> None:
    registry = fake_upstream.registry
    old = registry.add_image("team/app", "latest", [b"old layer"])
    client = await mirror(**backend)
    await client.get("/v2/team/app/manifests/latest", headers=ACCEPT)

    await age_resolution(client, "team/app", "latest")
    before_get, before_head = (
        manifest_calls(fake_upstream, "GET"),
        manifest_calls(fake_upstream, "HEAD"),
    )
    same = await client.get("/v2/team/app/manifests/latest", headers=ACCEPT)
    assert await same.read() == old.manifest_bytes
    assert manifest_calls(fake_upstream, "HEAD") == before_head + 1
    assert manifest_calls(fake_upstream, "GET") == before_get

    new = registry.add_image("team/app", "latest", [b"new layer"])  # the tag moves upstream
    await age_resolution(client, "team/app", "latest")
    moved = await client.get("/v2/team/app/manifests/latest", headers=ACCEPT)
    assert await moved.read() == new.manifest_bytes
    assert moved.headers["Docker-Content-Digest"] == new.manifest_digest
    assert manifest_calls(fake_upstream, "HEAD") == before_head + 2
    assert manifest_calls(fake_upstream, "GET") == before_get + 1


async def test_a_herd_revalidating_one_stale_tag_makes_one_upstream_request(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    fake_upstream.registry.add_image("team/app", "latest", [b"layer"])
    client = await mirror()
    await client.get("/v2/team/app/manifests/latest", headers=ACCEPT)
    await age_resolution(client, "team/app", "latest")
    calls = manifest_calls(fake_upstream)
    responses = await asyncio.gather(
        *(client.get("/v2/team/app/manifests/latest", headers=ACCEPT) for _ in range(30))
    )
    assert all(response.status == 200 for response in responses)
    assert manifest_calls(fake_upstream) == calls + 1


@pytest.mark.parametrize("failure", ["refused", "black_hole", "500", "429"])
async def test_a_cached_tag_is_served_stale_while_the_upstream_fails(
    mirror: StartMirror,
    fake_upstream: FakeUpstreamServer,
    backend: dict[str, Any],
    failure: str,
) -> None:
    image = fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    client = await mirror(revalidate_timeout=0.5, read_timeout=30.0, **backend)
    await client.get("/v2/team/app/manifests/1.0", headers=ACCEPT)
    await age_resolution(client, "team/app", "1.0")

    if failure == "refused":
        await fake_upstream.stop()
    elif failure == "black_hole":
        fake_upstream.registry.black_hole = True
    else:
        fake_upstream.registry.fail_next("/manifests/", int(failure), times=10)
    started = time.monotonic()
    for method in ("GET", "HEAD"):
        response = await client.request(method, "/v2/team/app/manifests/1.0", headers=ACCEPT)
        assert response.status == 200
        assert response.headers["X-Cache"] == "STALE"
        assert response.headers["Docker-Content-Digest"] == image.manifest_digest
    assert await (await client.get("/v2/team/app/manifests/1.0", headers=ACCEPT)).read() == (
        image.manifest_bytes
    )
    # Each revalidation gives up after revalidate_timeout, never the 30 s read timeout.
    assert time.monotonic() - started < 5


async def test_a_tag_never_seen_fails_fast_with_an_oci_error_when_upstream_is_down(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    client = await mirror()
    await fake_upstream.stop()
    started = time.monotonic()
    response = await client.get("/v2/team/app/manifests/never-seen", headers=ACCEPT)
    assert response.status == 502
    assert (await response.json())["errors"][0]["code"] == "UNAVAILABLE"
    assert time.monotonic() - started < 2


async def test_rate_limiting_without_a_cached_answer_is_passed_on(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    fake_upstream.registry.fail_next("/manifests/", 429, headers={"Retry-After": "30"})
    client = await mirror()
    response = await client.get("/v2/team/app/manifests/1.0", headers=ACCEPT)
    assert response.status == 429
    assert response.headers["Retry-After"] == "30"


async def test_a_missing_tag_is_remembered_for_the_negative_ttl(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    client = await mirror(negative_ttl=60.0)
    for _ in range(3):
        response = await client.get("/v2/team/app/manifests/nope", headers=ACCEPT)
        assert response.status == 404
        assert (await response.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert manifest_calls(fake_upstream) == 1


async def test_clients_with_and_without_index_support_each_get_an_acceptable_type(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, backend: dict[str, Any]
) -> None:
    registry = fake_upstream.registry
    amd64 = registry.add_image("multi", None, [b"amd"], platform="linux/amd64")
    arm64 = registry.add_image("multi", None, [b"arm"], platform="linux/arm64")
    index = registry.add_index("multi", "latest", {"linux/amd64": amd64, "linux/arm64": arm64})
    client = await mirror(**backend)
    single = {"Accept": f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"}

    for _ in range(2):  # the second round is answered from the cache
        with_index = await client.get("/v2/multi/manifests/latest", headers=ACCEPT)
        assert with_index.headers["Content-Type"] == OCI_INDEX
        assert with_index.headers["Docker-Content-Digest"] == index
        without = await client.get("/v2/multi/manifests/latest", headers=single)
        assert without.headers["Content-Type"] == OCI_MANIFEST
        assert without.headers["Docker-Content-Digest"] == amd64.manifest_digest
    assert with_index.headers["X-Cache"] == "HIT"
    assert without.headers["X-Cache"] == "HIT"


async def test_accept_lists_in_any_order_share_one_cache_entry(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    client = await mirror()
    types = [OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, "application/json"]
    await client.get("/v2/team/app/manifests/1.0", headers={"Accept": ", ".join(types)})
    calls = manifest_calls(fake_upstream)
    reordered = [("Accept", t) for t in reversed(types)]
    again = await client.get("/v2/team/app/manifests/1.0", headers=reordered)
    assert again.headers["X-Cache"] == "HIT"
    assert manifest_calls(fake_upstream) == calls


async def test_ns_and_path_prefix_route_to_their_upstream_and_never_mix(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, fake_cdn: FakeUpstreamServer
) -> None:
    hub, ghcr = fake_upstream, fake_cdn  # two independent fake registries
    hub_image = hub.registry.add_image("org/app", "1.0", [b"from docker hub"])
    ghcr_image = ghcr.registry.add_image("org/app", "1.0", [b"from ghcr"])
    client = await mirror(
        upstreams=(
            UpstreamSettings("docker.io", URL(hub.url)),
            UpstreamSettings("ghcr.io", URL(ghcr.url)),
        )
    )
    cases = [
        ("/v2/org/app/manifests/1.0", hub_image),
        ("/v2/org/app/manifests/1.0?ns=docker.io", hub_image),
        ("/v2/org/app/manifests/1.0?ns=ghcr.io", ghcr_image),
        ("/v2/ghcr.io/org/app/manifests/1.0", ghcr_image),
        ("/v2/docker.io/org/app/manifests/1.0", hub_image),
    ]
    for _ in range(2):  # the second round is answered from the cache
        for path, image in cases:
            response = await client.get(path, headers=ACCEPT)
            assert response.status == 200, path
            assert await response.read() == image.manifest_bytes, path
    echoed = await client.get("/v2/org/app/manifests/1.0?ns=ghcr.io", headers=ACCEPT)
    assert echoed.headers["OCI-Namespace"] == "ghcr.io"
    blob = await client.get(f"/v2/ghcr.io/org/app/blobs/{ghcr_image.layer_digests[0]}")
    assert await blob.read() == b"from ghcr"


async def test_an_unknown_ns_gets_a_fast_404_so_containerd_tries_its_next_host(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    client = await mirror()
    response = await client.get("/v2/org/app/manifests/1.0?ns=quay.io", headers=ACCEPT)
    assert response.status == 404
    assert (await response.json())["errors"][0]["code"] == "NAME_UNKNOWN"
    assert fake_upstream.registry.count() == 0


async def test_the_circuit_breaker_stops_calling_a_failing_upstream(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    fake_upstream.registry.fail_next("/manifests/", 503, times=100)
    client = await mirror(breaker_failures=3, breaker_cooldown=60.0)
    for tag in ("a", "b", "c", "d", "e"):
        response = await client.get(f"/v2/team/app/manifests/{tag}", headers=ACCEPT)
        assert response.status == 502
    assert manifest_calls(fake_upstream) == 3


async def test_referrers_are_proxied(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    image = fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    body = (
        b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}'
    )
    fake_upstream.registry.referrers[image.manifest_digest] = body
    client = await mirror()
    response = await client.get(f"/v2/team/app/referrers/{image.manifest_digest}")
    assert response.status == 200
    assert response.headers["Content-Type"] == OCI_INDEX
    assert await response.read() == body
