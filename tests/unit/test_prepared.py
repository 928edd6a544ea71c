"""Prepared answers (proxy.server.prepared): a repeated manifest hit is answered from a table,
exactly as the first hit was, and only while the cache would give that same answer."""

from __future__ import annotations

import time
from pathlib import Path

import bcrypt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from fakeupstream import ACCEPT_ALL_MANIFESTS, DOCKER_MANIFEST, FakeUpstreamServer
from harness.mirror import StartMirror
from multidict import CIMultiDict

from proxy.server import keys as state

Client = TestClient[web.Request, web.Application]
ACCEPT = {"Accept": ACCEPT_ALL_MANIFESTS}
TAG_PATH = "/v2/team/app/manifests/1.0"
LATEST_PATH = "/v2/team/app/manifests/latest"
SAME_HEADERS = (
    "Content-Type",
    "Content-Length",
    "Docker-Content-Digest",
    "ETag",
    "X-Cache",
    "Docker-Distribution-API-Version",
)


def prepared(client: Client) -> int:
    return len(client.app[state.PREPARED])


def hits(client: Client, kind: str) -> float:
    registry = client.app[state.METRICS].registry
    labels = {"kind": kind, "result": "hit"}
    return registry.get_sample_value("registry_proxy_cache_requests_total", labels) or 0.0


async def test_a_repeated_hit_is_the_same_response_counted_the_same_way(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    image = fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    client = await mirror()
    assert (await client.get(TAG_PATH, headers=ACCEPT)).headers["X-Cache"] == "MISS"
    first_hit = await client.get(TAG_PATH, headers=ACCEPT)
    assert prepared(client) == 1
    repeat = await client.get(TAG_PATH, headers=ACCEPT)
    assert repeat.status == first_hit.status == 200
    assert await repeat.read() == await first_hit.read() == image.manifest_bytes
    for name in SAME_HEADERS:
        assert repeat.headers[name] == first_hit.headers[name], name

    heads = [await client.head(TAG_PATH, headers=ACCEPT) for _ in range(2)]
    assert prepared(client) == 2
    for head in heads:
        assert head.headers["Content-Length"] == str(len(image.manifest_bytes))
        assert await head.read() == b""
    by_digest = f"/v2/team/app/manifests/{image.manifest_digest}"
    for _ in range(2):
        again = await client.get(by_digest, headers=ACCEPT)
        assert await again.read() == image.manifest_bytes
    assert prepared(client) == 3

    assert fake_upstream.registry.count(path_contains="/manifests/") == 1
    assert hits(client, "tag") == 4  # every request after the first
    assert hits(client, "manifest") == 2
    [(repository, served)] = client.app[state.TRAFFIC].top(1)
    assert (repository, served.requests) == ("fake/team/app", 7)


async def test_a_tag_moved_upstream_is_answered_anew_once_revalidated(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = fake_upstream.registry
    old = registry.add_image("team/app", "latest", [b"old"])
    new = registry.add_image("team/app", None, [b"new"])
    client = await mirror(tag_ttl=60)
    for _ in range(3):
        await client.get(LATEST_PATH, headers=ACCEPT)
    assert prepared(client) == 1

    registry.tag("team/app", "latest", new.manifest_digest)
    # An operator's invalidation is a change of the tag cache: no repeat survives it.
    assert await client.app[state.TAGS].invalidate("fake", "team/app", "latest") == 1
    moved = await client.get(LATEST_PATH, headers=ACCEPT)
    assert moved.headers["Docker-Content-Digest"] == new.manifest_digest
    again = await client.get(LATEST_PATH, headers=ACCEPT)
    assert again.headers["Docker-Content-Digest"] == new.manifest_digest

    # Time passing beyond the tag's TTL (no rule for `latest`): the repeat makes way for a
    # revalidation.
    registry.tag("team/app", "latest", old.manifest_digest)
    later = time.time() + 61
    monkeypatch.setattr(time, "time", lambda: later)
    back = await client.get(LATEST_PATH, headers=ACCEPT)
    assert back.headers["Docker-Content-Digest"] == old.manifest_digest


async def test_a_conditional_request_or_another_accept_list_is_decided_afresh(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    image = fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    client = await mirror()
    for _ in range(3):
        await client.get(TAG_PATH, headers=ACCEPT)

    etag = f'"{image.manifest_digest}"'
    unchanged = await client.get(TAG_PATH, headers={**ACCEPT, "If-None-Match": etag})
    assert unchanged.status == 304
    # An OCI manifest is not what a client accepting only Docker's schema 2 may get.
    docker_only = await client.get(TAG_PATH, headers={"Accept": DOCKER_MANIFEST})
    assert docker_only.status == 404
    assert prepared(client) == 1


async def test_accept_lines_in_another_order_are_the_same_repeat(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    """dockerd sends one Accept line per media type, in a new order on every request."""
    fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    client = await mirror()
    lines = [line.strip() for line in ACCEPT_ALL_MANIFESTS.split(",")]
    assert len(lines) > 2
    for shift in range(3):
        order = lines[shift:] + lines[:shift]
        headers = CIMultiDict(("Accept", line) for line in order)
        assert (await client.head(TAG_PATH, headers=headers)).status == 200
    assert prepared(client) == 1
    assert hits(client, "tag") == 2


async def test_with_access_control_every_request_is_checked(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> None:
    fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    htpasswd = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"wonderland", bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"alice:{hashed}\n")
    client = await mirror(auth_htpasswd=htpasswd)
    alice = {**ACCEPT, "Authorization": "Basic YWxpY2U6d29uZGVybGFuZA=="}
    for _ in range(3):
        assert (await client.get(TAG_PATH, headers=alice)).status == 200
    assert prepared(client) == 0
    anonymous = await client.get(TAG_PATH, headers=ACCEPT)
    assert anonymous.status == 401
