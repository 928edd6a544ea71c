"""Upstream quota: Docker Hub's rate-limit headers read, exported, and respected.

Below `quota_reserve` requests left (or after a 429), a cached tag is served without asking
the upstream (STALE) until the window resets; new tags still go upstream. The quota's clock is
injected, so a window "passes" without sleeping.
"""

from __future__ import annotations

import logging

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from fakeupstream import ACCEPT_ALL_MANIFESTS, FakeUpstreamServer, RateLimit
from harness.mirror import StartMirror
from harness.ports import free_port
from prometheus_client.parser import text_string_to_metric_families

from proxy.server import keys
from proxy.upstream.quota import Quota, parse_ratelimit, parse_retry_after
from proxy.upstream.quota import RateLimit as Parsed

Client = TestClient[web.Request, web.Application]
ACCEPT = {"Accept": ACCEPT_ALL_MANIFESTS}
WINDOW = 3600


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ratelimit_values_are_read_as_docker_hub_and_the_draft_write_them() -> None:
    assert parse_ratelimit("76;w=21600") == Parsed(76, 21600.0)
    assert parse_ratelimit(" 100 ; w=60 ") == Parsed(100, 60.0)
    assert parse_ratelimit("5") == Parsed(5, None)
    assert parse_ratelimit("76;w=21600, 1000;w=86400") == Parsed(76, 21600.0)
    for bad in (None, "", "many", "-1;w=5", "1.5"):
        assert parse_ratelimit(bad) is None
    assert parse_retry_after("120", 0.0) == 120.0
    assert parse_retry_after("Thu, 01 Jan 1970 00:02:00 GMT", 60.0) == 60.0
    assert parse_retry_after("soon", 0.0) is None


def test_credentials_not_applied_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    quota = Quota("docker.io", credentials=True)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            quota.observe(200, {"docker-ratelimit-source": "198.51.100.4"})
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "credentials were not applied" in caplog.records[0].message
    caplog.clear()
    applied = Quota("docker.io", credentials=True)
    anonymous = Quota("docker.io", credentials=False)
    with caplog.at_level(logging.WARNING):
        applied.observe(200, {"docker-ratelimit-source": "8a7c6f2e-4b1d-4e3a-9f0a-2d5c7b9e1f30"})
        anonymous.observe(200, {"docker-ratelimit-source": "198.51.100.4"})
    assert caplog.records == []


async def start(mirror: StartMirror, **settings: object) -> tuple[Client, Clock]:
    # A tag is never fresh: every request would revalidate, unless the quota says not to.
    client = await mirror(tag_ttls=(), tag_ttl=1e-9, quota_reserve=10, **settings)
    clock = Clock()
    client.app[keys.UPSTREAMS].default.quota.clock = clock
    return client, clock


def gauges(text: str) -> dict[str, float]:
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("registry_proxy_upstream_quota")
        and sample.labels.get("upstream") == "fake"
    }


async def test_the_gauges_show_what_the_upstream_said(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    registry = fake_upstream.registry
    registry.add_image("team/app", "latest", [b"layer"])
    registry.rate_limit = RateLimit(limit=100, remaining=77, window=21600)
    client, _ = await start(mirror)

    assert (await client.get("/v2/team/app/manifests/latest", headers=ACCEPT)).status == 200

    values = gauges(await (await client.get("/metrics")).text())
    assert values == {
        "registry_proxy_upstream_quota_limit": 100,
        "registry_proxy_upstream_quota_remaining": 76,  # this GET spent one
        "registry_proxy_upstream_quota_window_seconds": 21600,
        "registry_proxy_upstream_quota_saving": 0,
    }


async def test_below_the_reserve_a_cached_tag_is_served_stale_until_the_window_resets(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    registry = fake_upstream.registry
    image = registry.add_image("team/app", "latest", [b"layer"])
    registry.rate_limit = RateLimit(limit=100, remaining=12, window=WINDOW)
    client, clock = await start(mirror)
    url = "/v2/team/app/manifests/latest"

    first = await client.get(url, headers=ACCEPT)  # a GET: 11 left
    assert first.headers["X-Cache"] == "MISS"
    registry.rate_limit.remaining = 10
    second = await client.get(url, headers=ACCEPT)  # revalidated by HEAD, which says 10 left
    assert second.headers["X-Cache"] == "HIT"
    assert registry.count("HEAD", "/manifests/latest") == 1

    registry.clear_requests()
    for _ in range(3):
        stale = await client.get(url, headers=ACCEPT)
        assert stale.status == 200
        assert stale.headers["X-Cache"] == "STALE"
        assert stale.headers["Warning"].startswith("110 ")
        assert stale.headers["Docker-Content-Digest"] == image.manifest_digest
        assert await stale.read() == image.manifest_bytes
    assert registry.requests == []
    values = gauges(await (await client.get("/metrics")).text())
    assert values["registry_proxy_upstream_quota_saving"] == 1

    # A tag the mirror never saw still goes upstream.
    registry.add_image("team/app", "edge", [b"other"])
    new = await client.get("/v2/team/app/manifests/edge", headers=ACCEPT)
    assert new.status == 200
    assert registry.count("GET", "/manifests/edge") == 1

    # Not a moment before the window ends...
    clock.now += WINDOW - 1
    registry.clear_requests()
    assert (await client.get(url, headers=ACCEPT)).headers["X-Cache"] == "STALE"
    assert registry.requests == []

    # ...and after it, with the quota back, revalidation resumes, and goes on.
    clock.now += 1
    registry.rate_limit.remaining = 100
    for _ in range(2):
        resumed = await client.get(url, headers=ACCEPT)
        assert resumed.headers["X-Cache"] == "HIT"
    assert registry.count("HEAD", "/manifests/latest") == 2
    values = gauges(await (await client.get("/metrics")).text())
    assert values["registry_proxy_upstream_quota_saving"] == 0


async def test_a_429_stops_revalidation_for_its_retry_after(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    registry = fake_upstream.registry
    registry.add_image("team/app", "latest", [b"layer"])
    client, clock = await start(mirror)
    url = "/v2/team/app/manifests/latest"
    assert (await client.get(url, headers=ACCEPT)).headers["X-Cache"] == "MISS"

    registry.fail_next("/manifests/latest", 429, headers={"Retry-After": "120"})
    limited = await client.get(url, headers=ACCEPT)
    assert limited.headers["X-Cache"] == "STALE"
    registry.clear_requests()
    assert (await client.get(url, headers=ACCEPT)).headers["X-Cache"] == "STALE"
    assert registry.requests == []

    clock.now += 120
    assert (await client.get(url, headers=ACCEPT)).headers["X-Cache"] == "HIT"
    assert registry.count("HEAD", "/manifests/latest") == 1


async def test_cache_stats_show_each_upstreams_quota(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    registry = fake_upstream.registry
    registry.add_image("team/app", "latest", [b"layer"])
    registry.rate_limit = RateLimit(limit=200, remaining=8, window=WINDOW, source="198.51.100.4")
    port = free_port()
    client, _ = await start(mirror, admin_listen=("127.0.0.1", port))
    await client.get("/v2/team/app/manifests/latest", headers=ACCEPT)

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/stats") as answer,
    ):
        stats = await answer.json()
    assert stats["quota"] == {
        "fake": {
            "limit": 200,
            "remaining": 7,
            "window_seconds": WINDOW,
            "source": "198.51.100.4",
            "saving": True,
            "saving_for_seconds": WINDOW,
        }
    }
