"""An upstream that is slow, lies about lengths, loops on auth, rate-limits or fails in bursts.

Each case checks the same four things: a client gets the exact bytes or a transfer it sees break,
never a partial or corrupt file lands at a final cache path, the status and OCI error code are
the documented ones, and the mirror answers a good request afterwards.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from fakeupstream import FakeUpstreamServer, Image
from harness.mirror import StartMirror
from yarl import URL

from faults.support import (
    REPOSITORY,
    Client,
    assert_cache_sound,
    fetch,
    final_path,
    settle,
)
from proxy.config import Secret, UpstreamSettings
from proxy.oci import Digest
from proxy.server import keys as state

# Blob cases twice: bodies read through aiohttp's parser, and from the socket.
BOTH_BODY_READINGS = pytest.mark.usefixtures("body_reading")


def blob_url(digest: str) -> str:
    return f"/v2/{REPOSITORY}/blobs/{digest}"


def manifest_url(reference: str) -> str:
    return f"/v2/{REPOSITORY}/manifests/{reference}"


def cache_dir(client: Client) -> Path:
    return client.app[state.SETTINGS].cache_dir


def clear_injected_faults(upstream: FakeUpstreamServer) -> None:
    # `fail_next(times=...)` has no public way to be called off early; an outage ends here.
    upstream.registry._faults.clear()


async def wait_for_breaker_cooldown(client: Client) -> None:
    """The breaker reopens to one trial request at a known instant; wait exactly until then."""
    breaker = client.app[state.UPSTREAMS].default.breaker
    await asyncio.sleep(max(breaker.open_until - time.monotonic(), 0.0))


def with_credentials(upstream: FakeUpstreamServer) -> tuple[UpstreamSettings, ...]:
    return (UpstreamSettings("fake", URL(upstream.url), "alice", Secret("s3cret")),)


# --------------------------------------------------------------------------- slow upstreams


@BOTH_BODY_READINGS
async def test_a_slow_upstream_that_keeps_sending_completes_and_is_cached(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    registry = fake_upstream.registry
    registry.chunk_size = 4096
    data = os.urandom(5 * 4096)
    digest = registry.add_blob(data)
    registry.slow[digest] = 0.1  # a chunk every 100 ms, well inside the read timeout
    client = await mirror(read_timeout=1.0)

    started = time.monotonic()
    outcome = await fetch(client, blob_url(digest))
    assert outcome.status == 200
    assert outcome.body == data
    assert time.monotonic() - started >= 0.4  # it really was trickled
    await settle(client)
    assert assert_cache_sound(cache_dir(client)).blobs == {digest: len(data)}
    hit = await fetch(client, blob_url(digest))
    assert hit.headers["X-Cache"] == "HIT"
    assert hit.body == data


@BOTH_BODY_READINGS
async def test_an_upstream_stalling_past_the_read_timeout_is_resumed_where_it_stalled(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    registry = fake_upstream.registry
    registry.chunk_size = 4096
    data = os.urandom(4 * 4096)
    digest = registry.add_blob(data)
    registry.slow[digest] = 5.0  # far more than the read timeout between two chunks
    client = await mirror(read_timeout=0.3, resume_backoff=0.01)

    started = time.monotonic()
    outcome = await fetch(client, blob_url(digest))
    assert outcome.status == 200
    assert outcome.body == data  # each connection brought one chunk before it stalled
    assert time.monotonic() - started < 4.0
    ranges = [r.get("Range") for r in registry.requests if digest in r.path]
    assert ranges == [None, "bytes=4096-", "bytes=8192-", "bytes=12288-"]
    await settle(client)
    assert assert_cache_sound(cache_dir(client)).blobs == {digest: len(data)}


@BOTH_BODY_READINGS
async def test_an_upstream_slower_than_the_read_timeout_breaks_the_transfer_without_resumes(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    registry = fake_upstream.registry
    registry.chunk_size = 4096
    data = os.urandom(4 * 4096)
    digest = registry.add_blob(data)
    registry.slow[digest] = 5.0  # far more than the read timeout between two chunks
    client = await mirror(read_timeout=0.3, resume_attempts=0)

    started = time.monotonic()
    outcome = await fetch(client, blob_url(digest))
    assert outcome.status == 200  # the headers went out with the first chunk
    assert outcome.broken
    assert time.monotonic() - started < 2.0
    await settle(client)
    assert Digest.parse(digest) not in client.app[state.STORE]
    assert assert_cache_sound(cache_dir(client)).blobs == {}

    del registry.slow[digest]
    retry = await fetch(client, blob_url(digest))
    assert retry.status == 200
    assert retry.body == data
    assert registry.count("GET", path_contains=digest) == 2


# ------------------------------------------------------------------- lying Content-Length


async def test_a_blob_with_a_wrong_content_length_is_never_served_complete_nor_cached(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    registry = fake_upstream.registry
    data = os.urandom(300_000)  # several chunks: the response is streaming when the lie shows
    digest = registry.add_blob(data)
    registry.wrong_content_length.add(digest)
    client = await mirror()

    outcome = await fetch(client, blob_url(digest))
    assert outcome.status == 200
    assert outcome.broken  # the last byte is held back until the digest verifies; it never does
    await settle(client)
    assert not final_path(cache_dir(client), digest).exists()
    assert_cache_sound(cache_dir(client))

    registry.wrong_content_length.clear()
    assert (await fetch(client, blob_url(digest))).body == data


@pytest.mark.parametrize("fault", ["wrong_content_length", "lie_about_digest"])
async def test_a_small_blob_with_bad_upstream_bytes_gets_a_502_or_a_broken_transfer(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image, fault: str
) -> None:
    registry = fake_upstream.registry
    data = os.urandom(2000)  # one chunk: verification fails before the response is prepared
    digest = registry.add_blob(data)
    getattr(registry, fault).add(digest)
    client = await mirror()

    outcome = await fetch(client, blob_url(digest))
    await settle(client)
    assert_cache_sound(cache_dir(client))
    getattr(registry, fault).clear()
    assert (await fetch(client, blob_url(digest))).body == data
    # The upstream sent bad bytes: that is a bad gateway, which clients retry, not a 4xx.
    assert outcome.broken or (outcome.status, outcome.code) == (502, "UNAVAILABLE"), outcome


async def test_a_manifest_with_a_wrong_content_length_is_refused_with_502_and_not_cached(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    registry = fake_upstream.registry
    registry.wrong_content_length.add(image.manifest_digest)
    client = await mirror()

    for reference in ("1.0", image.manifest_digest):
        outcome = await fetch(client, manifest_url(reference))
        assert (outcome.status, outcome.code) == (502, "UNAVAILABLE")
    assert assert_cache_sound(cache_dir(client)).blobs == {}

    registry.wrong_content_length.clear()
    good = await fetch(client, manifest_url("1.0"))
    assert good.status == 200
    assert good.body == image.manifest_bytes


# --------------------------------------------------------------------------------- auth


@pytest.mark.parametrize("refusal", ["every token is rejected", "the credentials are rejected"])
async def test_an_upstream_that_rejects_every_token_gets_a_clean_401_after_one_retry(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image, refusal: str
) -> None:
    registry = fake_upstream.registry
    registry.auth = "bearer"
    registry.allow_anonymous = False
    if refusal == "every token is rejected":
        registry.users = {"alice": "s3cret"}
        registry.token_expires_in = 0  # each token is dead on arrival
    else:
        registry.users = {"alice": "another password"}
    client = await mirror(upstreams=with_credentials(fake_upstream))

    paths = [
        manifest_url("1.0"),
        manifest_url(image.manifest_digest),
        blob_url(image.config_digest),
    ]
    started = time.monotonic()
    for path in paths:
        for method in ("GET", "HEAD"):
            outcome = await fetch(client, path, method=method)
            assert outcome.status == 401, (method, path)
            if method == "GET":
                assert outcome.code == "UNAUTHORIZED"
    assert time.monotonic() - started < 3.0
    requests = 2 * len(paths)
    # Bounded: per client request at most one try, one token and one retry with a new token.
    assert registry.count(path_contains=f"/v2/{REPOSITORY}/") <= 2 * requests
    assert registry.count(path_contains="/token") <= requests
    assert assert_cache_sound(cache_dir(client)).blobs == {}

    registry.users = {"alice": "s3cret"}
    registry.token_expires_in = 300
    recovered = await fetch(client, manifest_url("1.0"))
    assert recovered.status == 200
    assert recovered.body == image.manifest_bytes


async def test_a_token_endpoint_that_is_down_fails_fast_with_502(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    registry = fake_upstream.registry
    registry.auth = "bearer"
    registry.token_endpoint_down = True
    client = await mirror(upstreams=with_credentials(fake_upstream))

    started = time.monotonic()
    paths = [manifest_url("1.0"), blob_url(image.layer_digests[0])] * 10
    outcomes = await asyncio.gather(*(fetch(client, path) for path in paths))
    assert time.monotonic() - started < 2.0
    assert {(o.status, o.code) for o in outcomes} == {(502, "UNAVAILABLE")}
    assert registry.count(path_contains="/token") <= len(paths)
    assert assert_cache_sound(cache_dir(client)).blobs == {}

    registry.token_endpoint_down = False
    registry.users = {"alice": "s3cret"}
    recovered = await fetch(client, blob_url(image.layer_digests[0]))
    assert recovered.status == 200
    assert recovered.body is not None
    assert Digest.of(recovered.body) == Digest.parse(image.layer_digests[0])


# ------------------------------------------------------------------ 429 storms, 500 bursts


async def test_a_429_storm_gets_every_client_a_429_with_retry_after_or_a_stale_answer(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    registry = fake_upstream.registry
    fresh_layer = registry.add_blob(os.urandom(40_000))
    client = await mirror()
    # Warm: the tag resolved once, one layer cached; then the resolution goes stale.
    assert (await fetch(client, manifest_url("1.0"))).status == 200
    cached_layer = image.layer_digests[0]
    assert (await fetch(client, blob_url(cached_layer))).status == 200
    await settle(client)
    assert await client.app[state.TAGS].invalidate("fake", REPOSITORY, "1.0") == 1
    registry.add_image(REPOSITORY, "2.0", [b"never cached"])

    registry.fail_next("/v2/", 429, times=1_000_000, headers={"Retry-After": "7"})
    kinds = {
        "stale tag": (manifest_url("1.0"), 200),
        "new tag": (manifest_url("2.0"), 429),
        "uncached blob": (blob_url(fresh_layer), 429),
        "cached blob": (blob_url(cached_layer), 200),
    }
    requests = [(kind, path) for kind, (path, _) in kinds.items() for _ in range(50)]
    outcomes = await asyncio.gather(*(fetch(client, path) for _, path in requests))

    for (kind, _), outcome in zip(requests, outcomes, strict=True):
        assert outcome.status == kinds[kind][1], (kind, outcome)
        if outcome.status == 429:
            assert outcome.code == "TOOMANYREQUESTS"
            assert outcome.headers["Retry-After"] == "7"
    by_kind = dict(zip((kind for kind, _ in requests), outcomes, strict=False))
    assert by_kind["stale tag"].headers["X-Cache"] == "STALE"
    assert by_kind["stale tag"].body == image.manifest_bytes
    assert by_kind["cached blob"].headers["X-Cache"] == "HIT"
    # Each herd shares one upstream call per key (a 429 does not trip the breaker).
    assert registry.count(path_contains=fresh_layer) <= 50
    assert_cache_sound(cache_dir(client))

    clear_injected_faults(fake_upstream)
    after = await fetch(client, blob_url(fresh_layer))
    assert after.status == 200
    assert after.body is not None
    assert Digest.of(after.body) == Digest.parse(fresh_layer)


async def test_a_burst_of_500s_gets_502s_trips_the_breaker_and_the_mirror_recovers(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    registry = fake_upstream.registry
    blobs = {registry.add_blob(os.urandom(10_000 + n)): n for n in range(10)}
    client = await mirror(breaker_failures=5, breaker_cooldown=0.5)
    cached = image.layer_digests[0]
    assert (await fetch(client, blob_url(cached))).status == 200
    await settle(client)

    registry.fail_next("/v2/", 500, times=1_000_000)
    before = registry.count()
    uncached = [blob_url(d) for d in blobs] * 2 + [manifest_url("1.0")] * 5
    outcomes = await asyncio.gather(*(fetch(client, path) for path in uncached))
    assert {(o.status, o.code) for o in outcomes} == {(502, "UNAVAILABLE")}
    assert registry.count() - before <= len(uncached)
    await settle(client)

    # The breaker is open now: the next miss fails at once without calling the upstream...
    calls = registry.count()
    started = time.monotonic()
    fast = await fetch(client, manifest_url(image.manifest_digest))
    assert (fast.status, fast.code) == (502, "UNAVAILABLE")
    assert time.monotonic() - started < 0.5
    assert registry.count() == calls
    # ...while what is cached is still served.
    hit = await fetch(client, blob_url(cached))
    assert hit.headers["X-Cache"] == "HIT"
    assert_cache_sound(cache_dir(client))

    clear_injected_faults(fake_upstream)
    await wait_for_breaker_cooldown(client)
    for digest in blobs:
        outcome = await fetch(client, blob_url(digest))
        assert outcome.status == 200
        assert outcome.body is not None
        assert Digest.of(outcome.body) == Digest.parse(digest)
    await settle(client)
    assert set(assert_cache_sound(cache_dir(client)).blobs) == {cached, *blobs}


# ---------------------------------------------------------------------------- redirects


@pytest.mark.parametrize("auth", ["bearer", "basic"])
@pytest.mark.parametrize("cdn", ["another server", "the same port under another host name"])
async def test_a_redirect_to_another_host_never_carries_the_credentials(
    mirror: StartMirror,
    fake_upstream: FakeUpstreamServer,
    fake_cdn: FakeUpstreamServer,
    auth: str,
    cdn: str,
) -> None:
    registry = fake_upstream.registry
    registry.auth = "bearer" if auth == "bearer" else "basic"
    registry.users = {"alice": "s3cret"}
    data = os.urandom(200_000)
    image = registry.add_image(REPOSITORY, "1.0", [data])
    target = fake_cdn if cdn == "another server" else fake_upstream
    target.registry.add_blob(data)
    # "localhost" and "127.0.0.1" are one server but two origins (RFC 6454): still "another host".
    registry.blob_redirect_to = (
        fake_cdn.url if cdn == "another server" else f"http://localhost:{fake_upstream.port}"
    )
    client = await mirror(upstreams=with_credentials(fake_upstream))

    digest = image.layer_digests[0]
    whole = await fetch(client, blob_url(digest))
    await settle(client)
    ranged = await fetch(client, blob_url(digest), headers={"Range": "bytes=1000-1999"})
    assert whole.status == 200
    assert whole.body == data
    assert ranged.body == data[1000:2000]
    assert target.registry.count(path_contains="/cdn/") == 1
    assert target.registry.cdn_authorization_count == 0
    assert not target.registry.cdn_saw_authorization
    # The credentials did go where they belong.
    authorised = [r for r in registry.requests if r.get("Authorization") and "/v2/" in r.path]
    assert authorised
    assert_cache_sound(cache_dir(client))
