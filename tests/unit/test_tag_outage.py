"""A tag the mirror has resolved keeps answering every kind of client while the upstream fails.

Each client spells Accept its own way (REFERENCE.md); what a resolution depends on is the set
of manifest types it admits. A black-holed upstream (accepts, never answers) is bounded:
`revalidate_timeout` for a cached tag, `response_timeout` for anything never seen.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from fakeupstream import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    FakeUpstreamServer,
)
from harness.mirror import StartMirror
from yarl import URL

from proxy.cli.warmer import ACCEPT as WARM_ACCEPT
from proxy.config import UpstreamSettings
from proxy.server import keys as state

Client = TestClient[web.Request, web.Application]
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"

# Accept as each client sends it on a tag: header lines, in the client's own order.
DOCKERD = [
    DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX, SCHEMA1, "application/json",
]  # fmt: skip
CONTAINERD = [f"{DOCKER_MANIFEST}, {DOCKER_MANIFEST_LIST}, {OCI_MANIFEST}, {OCI_INDEX}, */*"]
CONTAINERS_IMAGE = [
    OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, SCHEMA1,
    "application/vnd.docker.distribution.manifest.v1+json",
]  # fmt: skip
WARM = [WARM_ACCEPT]
CLIENTS = {"dockerd": DOCKERD, "containerd": CONTAINERD, "containers-image": CONTAINERS_IMAGE}
IMAGES_ONLY = [DOCKER_MANIFEST, OCI_MANIFEST]


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings for the tag cache: in memory, and on a real Redis server (JSON entries)."""
    if request.param == "memory":
        return {}
    return {"redis_url": request.getfixturevalue("redis_url")}


def accept(lines: list[str]) -> list[tuple[str, str]]:
    return [("Accept", line) for line in lines]


def manifest_gets(upstream: FakeUpstreamServer) -> int:
    return upstream.registry.count("GET", path_contains="/manifests/")


async def make_stale(client: Client, repository: str, tag: str) -> None:
    assert await client.app[state.TAGS].invalidate("fake", repository, tag) == 1


async def fail(upstream: FakeUpstreamServer, how: str) -> None:
    if how == "refused":
        await upstream.stop()
    elif how == "black_hole":
        upstream.registry.black_hole = True
    else:
        upstream.registry.fail_next("/", int(how), times=1000)


@pytest.mark.parametrize("resolver", ["warm", *CLIENTS])
@pytest.mark.parametrize("failure", ["refused", "black_hole", "503", "429"])
async def test_a_tag_resolved_by_one_client_is_served_to_every_client_while_upstream_fails(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, resolver: str, failure: str
) -> None:
    image = fake_upstream.registry.add_image("library/hello", "latest", [b"layer"])
    client = await mirror(revalidate_timeout=0.5, response_timeout=30.0, read_timeout=30.0)
    lines = WARM if resolver == "warm" else CLIENTS[resolver]
    first = await client.get("/v2/library/hello/manifests/latest", headers=accept(lines))
    assert first.status == 200
    await make_stale(client, "library/hello", "latest")
    await fail(fake_upstream, failure)

    started = time.monotonic()
    for name, lines in CLIENTS.items():
        for method in ("HEAD", "GET"):
            response = await client.request(
                method, "/v2/library/hello/manifests/latest", headers=accept(lines)
            )
            assert response.status == 200, (name, method, await response.text())
            assert response.headers["X-Cache"] == "STALE"
            assert response.headers["Docker-Content-Digest"] == image.manifest_digest
            if method == "GET":
                assert await response.read() == image.manifest_bytes
    # Never the 30 s timeouts: each revalidation gives up after revalidate_timeout.
    assert time.monotonic() - started < 6 * 0.5 + 2


async def test_a_fresh_tag_resolved_with_one_accept_list_is_a_hit_for_every_other(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    registry = fake_upstream.registry
    amd64 = registry.add_image("multi", None, [b"amd"], platform="linux/amd64")
    arm64 = registry.add_image("multi", None, [b"arm"], platform="linux/arm64")
    index = registry.add_index("multi", "latest", {"linux/amd64": amd64, "linux/arm64": arm64})
    client = await mirror()
    await client.get("/v2/multi/manifests/latest", headers=accept(DOCKERD))
    calls = registry.count(path_contains="/manifests/")
    for lines in (CONTAINERD, CONTAINERS_IMAGE, WARM, []):
        response = await client.head("/v2/multi/manifests/latest", headers=accept(lines))
        assert response.headers["X-Cache"] == "HIT"
        assert response.headers["Docker-Content-Digest"] == index
        assert response.headers["Content-Type"] == OCI_INDEX
    assert registry.count(path_contains="/manifests/") == calls


async def test_an_index_tag_refused_to_an_images_only_client_still_serves_index_clients(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, backend: dict[str, Any]
) -> None:
    registry = fake_upstream.registry
    registry.index_fallback = False  # Distribution: OCI index + no index in Accept -> 404
    repository = f"refused/multi-{len(backend)}"
    amd64 = registry.add_image(repository, None, [b"amd"], platform="linux/amd64")
    index = registry.add_index(repository, "latest", {"linux/amd64": amd64})
    client = await mirror(negative_ttl=60.0, **backend)
    path = f"/v2/{repository}/manifests/latest"

    old = await client.get(path, headers=accept(IMAGES_ONLY))
    assert old.status == 404
    for lines in (CONTAINERD, DOCKERD, CONTAINERS_IMAGE):
        response = await client.get(path, headers=accept(lines))
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == index
    calls = registry.count(path_contains="/manifests/")
    again = await client.get(path, headers=accept(IMAGES_ONLY))
    assert again.status == 404  # remembered for that set only
    assert registry.count(path_contains="/manifests/") == calls


async def test_an_images_only_404_after_the_index_was_cached_does_not_hide_the_index(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    registry = fake_upstream.registry
    registry.index_fallback = False
    amd64 = registry.add_image("library/multi", None, [b"amd"], platform="linux/amd64")
    index = registry.add_index("library/multi", "latest", {"linux/amd64": amd64})
    client = await mirror(negative_ttl=60.0)
    await client.get("/v2/library/multi/manifests/latest", headers=accept(CONTAINERD))
    old = await client.get("/v2/library/multi/manifests/latest", headers=accept(IMAGES_ONLY))
    assert old.status == 404
    await make_stale(client, "library/multi", "latest")
    response = await client.get("/v2/library/multi/manifests/latest", headers=accept(DOCKERD))
    assert response.status == 200
    assert response.headers["Docker-Content-Digest"] == index


async def test_a_tag_that_does_not_exist_is_one_upstream_call_for_every_client(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    fake_upstream.registry.add_image("library/hello", "latest", [b"layer"])
    client = await mirror(negative_ttl=60.0)
    for lines in (CONTAINERD, DOCKERD, CONTAINERS_IMAGE, IMAGES_ONLY, [OCI_INDEX]):
        response = await client.get("/v2/library/hello/manifests/nope", headers=accept(lines))
        assert response.status == 404
        assert (await response.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert fake_upstream.registry.count(path_contains="/manifests/") == 1


async def test_an_accept_header_that_admits_no_manifest_type_gets_a_404_without_upstream(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    fake_upstream.registry.add_image("library/hello", "latest", [b"layer"])
    client = await mirror()
    response = await client.get(
        "/v2/library/hello/manifests/latest", headers={"Accept": "text/html"}
    )
    assert response.status == 404
    assert (await response.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert fake_upstream.registry.count(path_contains="/manifests/") == 0


async def test_two_thousand_accept_spellings_cost_one_upstream_get_and_a_bounded_entry(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    image = fake_upstream.registry.add_image("library/hello", "latest", [b"layer"])
    client = await mirror()
    chooser = random.Random(13)
    known = [DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX, SCHEMA1]
    for n in range(2000):
        types = [OCI_MANIFEST, *chooser.sample(known, chooser.randint(0, 4))]
        types += [f"application/x-junk-{n}", f"text/x-{n};q=0.{n % 10}"]
        chooser.shuffle(types)
        spelled = [t.upper() if chooser.random() < 0.2 else t for t in types]
        lines = [", ".join(spelled)] if n % 2 else spelled
        response = await client.get("/v2/library/hello/manifests/latest", headers=accept(lines))
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == image.manifest_digest
    assert manifest_gets(fake_upstream) == 1
    # A client taking other index types may be told something else (an index): one HEAD
    # (not a pull) for each combination of index types, at most.
    assert fake_upstream.registry.count("HEAD", path_contains="/manifests/") <= 4
    tags = client.app[state.TAGS]
    assert len(await tags.resolutions("fake", "library/hello", "latest")) == 1
    stored = await tags.backend.get("tag:fake/library/hello:latest")
    assert len(json.dumps(stored)) < 1000


async def test_a_tag_entry_written_by_the_previous_version_is_still_served(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, redis_url: str
) -> None:
    registry = fake_upstream.registry
    amd64 = registry.add_image("legacy/multi", None, [b"amd"], platform="linux/amd64")
    index = registry.add_index("legacy/multi", "latest", {"linux/amd64": amd64})
    client = await mirror(redis_url=redis_url)
    body = await (await client.get(f"/v2/legacy/multi/manifests/{index}")).read()
    # The previous version's entry: {hash of the raw Accept set: resolution}.
    legacy = {
        "5f2b0e7c1a9d3e44": {
            "digest": index, "media_type": OCI_INDEX, "size": len(body), "checked": time.time(),
        }
    }  # fmt: skip
    await client.app[state.TAGS].backend.set("tag:fake/legacy/multi:latest", legacy)
    await make_stale(client, "legacy/multi", "latest")
    await fake_upstream.stop()

    for lines in (CONTAINERD, DOCKERD):
        response = await client.get("/v2/legacy/multi/manifests/latest", headers=accept(lines))
        assert response.status == 200
        assert response.headers["X-Cache"] == "STALE"
        assert await response.read() == body


@pytest.fixture
async def black_hole() -> AsyncIterator[URL]:
    """A TCP server that accepts connections and never sends a byte."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    sock: socket.socket = server.sockets[0]
    port = sock.getsockname()[1]
    try:
        yield URL(f"http://127.0.0.1:{port}")
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_black_holed_upstream_fails_what_was_never_seen_within_the_response_timeout(
    mirror: StartMirror, black_hole: URL
) -> None:
    client = await mirror(
        upstreams=(UpstreamSettings("fake", black_hole),),
        response_timeout=0.5,
        read_timeout=60.0,
        breaker_failures=3,
        breaker_cooldown=60.0,
    )
    digest = "sha256:" + "ab" * 32
    paths = [
        "/v2/library/hello/manifests/never-seen",
        f"/v2/library/hello/manifests/{digest}",
        f"/v2/library/hello/blobs/{digest}",
    ]
    for path in paths:
        started = time.monotonic()
        response = await client.get(path, headers=accept(CONTAINERD))
        assert response.status == 504, path
        assert (await response.json())["errors"][0]["code"] == "UNAVAILABLE"
        assert time.monotonic() - started < 2, path
    # Three timeouts opened the breaker: the next miss fails at once.
    started = time.monotonic()
    response = await client.get("/v2/library/other/manifests/1.0", headers=accept(CONTAINERD))
    assert response.status == 502
    assert time.monotonic() - started < 0.4


async def test_a_black_holed_revalidation_is_abandoned_by_clients_but_counted_by_the_breaker(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    image = fake_upstream.registry.add_image("library/hello", "latest", [b"layer"])
    client = await mirror(
        revalidate_timeout=0.3, response_timeout=1.0, breaker_failures=1, breaker_cooldown=60.0
    )
    await client.get("/v2/library/hello/manifests/latest", headers=accept(DOCKERD))
    await make_stale(client, "library/hello", "latest")
    fake_upstream.registry.black_hole = True

    started = time.monotonic()
    response = await client.get("/v2/library/hello/manifests/latest", headers=accept(CONTAINERD))
    assert response.headers["X-Cache"] == "STALE"
    assert time.monotonic() - started < 1.0
    upstream = client.app[state.UPSTREAMS].get("fake")
    assert upstream is not None
    assert not upstream.breaker.is_open
    # The revalidation goes on behind the client's back until the response timeout ...
    await client.app[state.MANIFESTS].settled()
    assert upstream.breaker.is_open
    # ... after which stale answers need no wait at all.
    started = time.monotonic()
    response = await client.get("/v2/library/hello/manifests/latest", headers=accept(DOCKERD))
    assert response.headers["X-Cache"] == "STALE"
    assert response.headers["Docker-Content-Digest"] == image.manifest_digest
    assert time.monotonic() - started < 0.2
