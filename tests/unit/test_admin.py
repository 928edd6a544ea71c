"""The admin API and `registry-proxy cache`: authentication, statistics, tag listing and
invalidation, eviction, verification, and pins that survive eviction or are refused."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from fakeupstream import FakeUpstreamServer, Image
from harness.mirror import StartMirror, proxy_command
from harness.ports import free_port
from rich.console import Console
from yarl import URL

from proxy.cli.warm import warm_images
from proxy.cli.warmer import Platform
from proxy.config import UpstreamSettings
from proxy.oci import Digest
from proxy.oci.references import ImageReference
from proxy.server import keys as state
from proxy.server.keys import PINS

TOKEN = "s3cret-admin-token"
TIMEOUT = 30
KIB = 1024


@dataclass
class Admin:
    """A mirror with its admin API, and a session that sends the right token."""

    mirror: TestClient[web.Request, web.Application]
    url: URL
    token_file: Path
    session: aiohttp.ClientSession
    upstream: FakeUpstreamServer

    @property
    def app(self) -> web.Application:
        return self.mirror.app

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with self.session.request(
            method, self.url.with_path(path), headers=headers, **kwargs
        ) as response:
            return response.status, await response.json()

    async def pull(self, path: str, **headers: str) -> aiohttp.ClientResponse:
        response = await self.mirror.get(path, headers=headers)
        await response.read()
        return response

    async def warm(self, *references: str) -> None:
        reports = await warm_images(
            list(references),
            mirror=URL(str(self.mirror.make_url("/"))).with_path(""),
            platforms=frozenset({Platform("linux", "amd64")}),
            console=Console(file=io.StringIO()),
        )
        assert all(report.ok for report in reports), [r.failure for r in reports]


@pytest.fixture
async def start_admin(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Admin]]]:
    """Start the mirror with its admin API on a free port, protected by `TOKEN`."""
    sessions: list[aiohttp.ClientSession] = []

    async def start(**overrides: object) -> Admin:
        token_file = tmp_path / "admin-token"
        token_file.write_text(TOKEN + "\n")
        port = free_port()
        upstream = UpstreamSettings(fake_upstream.host, URL(fake_upstream.url))
        options: dict[str, object] = {
            "upstreams": (upstream,),
            "admin_listen": ("127.0.0.1", port),
            "admin_token_file": token_file,
        }
        client = await mirror(**(options | overrides))
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT))
        sessions.append(session)
        url = URL(f"http://127.0.0.1:{port}")
        return Admin(client, url, token_file, session, fake_upstream)

    yield start
    for session in sessions:
        await session.close()


@pytest.fixture
async def admin(start_admin: Callable[..., Awaitable[Admin]]) -> Admin:
    return await start_admin()


def digests_of(image: Image) -> list[Digest]:
    return [
        Digest.parse(d) for d in (image.manifest_digest, image.config_digest, *image.layer_digests)
    ]


# --- authentication


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Basic {TOKEN}", "Bearer"])
async def test_without_the_right_token_every_endpoint_answers_401_in_json(
    admin: Admin, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in [("GET", "/stats"), ("POST", "/evict"), ("PUT", "/pins"), ("GET", "/nope")]:
        async with admin.session.request(
            method, admin.url.with_path(path), headers=headers
        ) as response:
            assert response.status == 401, (method, path)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            body = await response.json()
            assert set(body) == {"error"}
            assert "token" in body["error"].lower()


async def test_with_the_token_the_api_answers(admin: Admin) -> None:
    status, stats = await admin.call("GET", "/stats")
    assert status == 200
    assert stats["budget"] == 1024**3


# --- statistics


async def test_stats_report_size_hit_ratio_and_the_top_repositories_by_bytes_served(
    admin: Admin,
) -> None:
    registry = admin.upstream.registry
    big = registry.add_image("team/big", "1", [b"b" * 40 * KIB, b"c" * 30 * KIB])
    small = registry.add_image("team/small", "1", [b"s" * KIB])
    host = admin.upstream.host
    await admin.warm(f"{host}/team/big:1", f"{host}/team/small:1")
    await admin.warm(f"{host}/team/big:1")  # everything a hit this time

    status, stats = await admin.call("GET", "/stats", params={"top": "1"})

    assert status == 200
    cached = {digest: size for digest, size, _ in admin.app[state.STORE].entries()}
    assert stats["size"] == sum(cached.values())
    assert stats["entries"] == len(digests_of(big)) + len(digests_of(small))
    # First round: 2 tag + 5 blob misses; second: 1 tag + 3 blob hits.
    assert stats["lookups"]["miss"] == 7
    assert stats["lookups"]["hit"] == 4
    assert stats["hit_ratio"] == round(4 / 11, 4)
    [top] = stats["top_repositories"]
    assert top["repository"] == f"{host}/team/big"
    assert top["bytes"] > 2 * 70 * KIB  # served twice
    assert top["requests"] == 8  # a manifest and three blobs, twice


# --- tags: listing and invalidation


async def test_ls_lists_cached_tags_with_digest_and_age(admin: Admin) -> None:
    image = admin.upstream.registry.add_image("team/app", "1.0", [b"layer"])
    await admin.pull(f"/v2/{admin.upstream.host}/team/app/manifests/1.0")

    status, answer = await admin.call(
        "GET", "/tags", params={"repository": f"{admin.upstream.host}/team/app"}
    )

    assert status == 200
    [row] = answer["tags"]
    assert (row["tag"], row["digest"], row["fresh"], row["cached"]) == (
        "1.0",
        image.manifest_digest,
        True,
        True,
    )
    assert 0 <= row["age_seconds"] < TIMEOUT


async def test_an_unmirrored_registry_is_a_404_and_a_bad_name_a_400(admin: Admin) -> None:
    status, answer = await admin.call("GET", "/tags", params={"repository": "quay.io/org/app"})
    assert (status, answer["error"]) == (404, "registry quay.io is not mirrored here")
    status, answer = await admin.call("GET", "/tags", params={"repository": "app:1"})
    assert status == 400


async def test_invalidating_a_tag_costs_exactly_one_upstream_revalidation(admin: Admin) -> None:
    registry = admin.upstream.registry
    registry.add_image("team/app", "1.0", [b"layer"])
    path = f"/v2/{admin.upstream.host}/team/app/manifests/1.0"
    accept = "application/vnd.oci.image.manifest.v1+json"
    first = await admin.pull(path, Accept=accept)
    assert first.headers["X-Cache"] == "MISS"
    assert (await admin.pull(path, Accept=accept)).headers["X-Cache"] == "HIT"
    assert registry.count("HEAD", "/manifests/1.0") == 0

    status, answer = await admin.call(
        "POST", "/invalidate", json={"repository": f"{admin.upstream.host}/team/app", "tag": "1.0"}
    )
    assert (status, answer["invalidated"]) == (200, 1)
    gets_before = registry.count("GET", "/manifests/")
    pulls = await asyncio.gather(*(admin.pull(path, Accept=accept) for _ in range(5)))
    again = await admin.pull(path, Accept=accept)

    assert all(response.status == 200 for response in [*pulls, again])
    assert registry.count("HEAD", "/manifests/1.0") == 1
    assert registry.count("GET", "/manifests/") == gets_before  # the digest did not move
    assert again.headers["X-Cache"] == "HIT"


async def test_invalidating_a_repository_reaches_every_tag(admin: Admin) -> None:
    registry = admin.upstream.registry
    for tag in ("1.0", "2.0"):
        registry.add_image("team/app", tag, [tag.encode()])
        await admin.pull(f"/v2/{admin.upstream.host}/team/app/manifests/{tag}")

    status, answer = await admin.call(
        "POST", "/invalidate", json={"repository": f"{admin.upstream.host}/team/app"}
    )
    assert (status, answer["invalidated"]) == (200, 2)
    _, listing = await admin.call(
        "GET", "/tags", params={"repository": f"{admin.upstream.host}/team/app"}
    )
    assert [(row["tag"], row["fresh"], row["age_seconds"]) for row in listing["tags"]] == [
        ("1.0", False, None),
        ("2.0", False, None),
    ]


# --- eviction and verification


async def test_evict_removes_a_blob_and_the_next_pull_fetches_it_again(admin: Admin) -> None:
    registry = admin.upstream.registry
    image = registry.add_image("team/app", "1", [b"layer" * 1000])
    layer = image.layer_digests[0]
    blob_path = f"/v2/{admin.upstream.host}/team/app/blobs/{layer}"
    await admin.pull(blob_path)
    store = admin.app[state.STORE]
    assert Digest.parse(layer) in store

    status, answer = await admin.call("POST", "/evict", json={"digest": layer})

    assert (status, answer) == (200, {"digest": layer, "evicted": True})
    assert Digest.parse(layer) not in store
    again = await admin.pull(blob_path)
    assert again.headers["X-Cache"] == "MISS"
    assert registry.count("GET", f"/blobs/{layer}") == 2


async def test_an_evicted_manifest_is_not_served_from_memory_afterwards(admin: Admin) -> None:
    """Eviction is how an operator takes content out of the mirror: neither the in-memory copy
    of a hot manifest nor a prepared repeat of it may outlive the file."""
    registry = admin.upstream.registry
    image = registry.add_image("team/app", "1", [b"layer"])
    by_digest = f"/v2/{admin.upstream.host}/team/app/manifests/{image.manifest_digest}"
    by_tag = f"/v2/{admin.upstream.host}/team/app/manifests/1"
    for path in (by_digest, by_digest, by_digest, by_tag, by_tag, by_tag):
        assert (await admin.pull(path)).status == 200
    assert len(admin.app[state.PREPARED]) == 2

    status, _ = await admin.call("POST", "/evict", json={"digest": image.manifest_digest})

    assert status == 200
    assert len(admin.app[state.PREPARED]) == 0
    again = await admin.pull(by_digest)
    assert again.headers["X-Cache"] == "MISS"
    assert registry.count("GET", f"/manifests/{image.manifest_digest}") == 2


async def test_evicting_what_is_not_cached_is_a_404_and_a_bad_digest_a_400(admin: Admin) -> None:
    status, answer = await admin.call("POST", "/evict", json={"digest": "sha256:" + "0" * 64})
    assert status == 404
    assert "not in the cache" in answer["error"]
    status, _ = await admin.call("POST", "/evict", json={"digest": "sha256:nope"})
    assert status == 400


async def test_verify_finds_a_file_corrupted_on_disk_and_evicts_it(admin: Admin) -> None:
    image = admin.upstream.registry.add_image("team/app", "1", [b"good" * 1000, b"fine" * 1000])
    await admin.warm(f"{admin.upstream.host}/team/app:1")
    store = admin.app[state.STORE]
    victim = Digest.parse(image.layer_digests[1])
    store.blob_path(victim).write_bytes(b"bit rot" * 100)

    status, answer = await admin.call("POST", "/verify")

    assert status == 200
    assert answer["checked"] == len(digests_of(image))
    assert answer["corrupt"] == [str(victim)]
    assert victim not in store
    assert all(digest in store for digest in digests_of(image) if digest != victim)


# --- pins


def add_images(upstream: FakeUpstreamServer, *names: str, layer_size: int) -> dict[str, Image]:
    """Images `team/<name>:1` of four distinct layers each."""
    images = {}
    for name in names:
        layers = [(f"{name} layer {n} ".encode() * layer_size)[:layer_size] for n in range(4)]
        images[name] = upstream.registry.add_image(f"team/{name}", "1", layers)
    return images


async def test_pinned_images_survive_eviction_pressure(
    start_admin: Callable[..., Awaitable[Admin]], fake_upstream: FakeUpstreamServer
) -> None:
    images = add_images(fake_upstream, "pinned", "a", "b", "c", layer_size=10 * KIB)
    host = fake_upstream.host
    # Room for about three images: warming four evicts.
    admin: Admin = await start_admin(
        cache_max_size=150 * KIB, pins=(ImageReference.parse(f"{host}/team/pinned:1"),)
    )
    await asyncio.wait_for(admin.app[PINS].settled.wait(), TIMEOUT)
    store = admin.app[state.STORE]
    pinned = frozenset(digests_of(images["pinned"]))
    assert store.pinned == pinned

    for name in ("pinned", "a", "b", "c"):
        await admin.warm(f"{host}/team/{name}:1")
    await admin.warm(f"{host}/team/a:1")  # and back: a was evicted, b or c go now

    assert store.evictions > 0
    assert all(digest in store for digest in pinned)
    assert store.stats().size <= store.budget
    status, answer = await admin.call("GET", "/pins")
    assert status == 200
    [pin] = answer["pins"]
    assert (pin["reference"], pin["digest"]) == (
        f"{host}/team/pinned:1",
        images["pinned"].manifest_digest,
    )
    assert pin["bytes"] == pin["cached_bytes"] == answer["pinned_bytes"]
    layer = images["pinned"].layer_digests[0]
    status, refused = await admin.call("POST", "/evict", json={"digest": layer})
    assert status == 409
    assert "pinned" in refused["error"]


async def test_a_pin_set_larger_than_the_budget_is_refused_and_the_old_one_stays(
    start_admin: Callable[..., Awaitable[Admin]], fake_upstream: FakeUpstreamServer
) -> None:
    images = add_images(fake_upstream, "small", "huge-a", "huge-b", layer_size=20 * KIB)
    host = fake_upstream.host
    admin: Admin = await start_admin(cache_max_size=100 * KIB)
    status, answer = await admin.call("PUT", "/pins", json={"references": [f"{host}/team/small:1"]})
    assert status == 200
    assert answer["pins"][0]["digest"] == images["small"].manifest_digest

    too_many = [f"{host}/team/huge-a:1", f"{host}/team/huge-b:1"]
    status, answer = await admin.call("PUT", "/pins", json={"references": too_many})

    assert status == 422
    assert answer["error"].startswith("pins refused: 2 pinned images need ")
    assert answer["error"].endswith(f"more than the cache budget of {100 * KIB} bytes")
    assert admin.app[state.STORE].pinned == frozenset(digests_of(images["small"]))
    _, listing = await admin.call("GET", "/pins")
    assert [pin["reference"] for pin in listing["pins"]] == [f"{host}/team/small:1"]


async def test_a_pin_that_cannot_be_resolved_is_listed_with_the_reason(admin: Admin) -> None:
    missing = f"{admin.upstream.host}/team/missing:1"
    status, answer = await admin.call("PUT", "/pins", json={"references": [missing]})
    assert status == 200
    [pin] = answer["pins"]
    assert pin["digest"] is None
    assert "manifest unknown" in pin["error"]


# --- the `registry-proxy cache` command line


async def cache_cli(
    admin: Admin, *args: str, token_file: Path | None = None
) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_PROXY_")}
    process = await asyncio.create_subprocess_exec(
        *proxy_command("cache", "--admin", str(admin.url),
                       "--token-file", str(token_file or admin.token_file), *args),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**env, "COLUMNS": "160"},
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), TIMEOUT)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_the_cache_command_prints_stats_tags_and_pins_as_tables(admin: Admin) -> None:
    image = admin.upstream.registry.add_image("team/app", "1.0", [b"layer" * 1000])
    host = admin.upstream.host
    await admin.warm(f"{host}/team/app:1.0")

    code, stats, _ = await cache_cli(admin, "stats")
    assert code == 0
    assert "hit ratio" in stats
    assert f"{host}/team/app" in stats
    code, tags, _ = await cache_cli(admin, "ls", f"{host}/team/app")
    assert code == 0
    assert "1.0" in tags
    assert image.manifest_digest[:19] in tags  # sha256: and 12 hex digits
    assert "fresh" in tags
    code, invalidated, _ = await cache_cli(admin, "invalidate", f"{host}/team/app:1.0")
    assert code == 0
    assert "invalidated tag 1.0 of" in invalidated
    code, verified, _ = await cache_cli(admin, "verify")
    assert (code, verified.strip()) == (0, verified.strip())
    assert "verified 3 files" in verified
    assert "0 corrupt" in verified
    code, evicted, _ = await cache_cli(admin, "evict", image.layer_digests[0])
    assert (code, evicted.strip()) == (0, f"evicted {image.layer_digests[0]}")
    code, pins, _ = await cache_cli(admin, "pins", "set", f"{host}/team/app:1.0")
    assert code == 0
    assert f"{host}/team/app:1.0" in pins


async def test_the_cache_command_says_why_it_failed(
    start_admin: Callable[..., Awaitable[Admin]], fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> None:
    add_images(fake_upstream, "huge", layer_size=40 * KIB)
    admin: Admin = await start_admin(cache_max_size=100 * KIB)
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-it")

    code, _, stderr = await cache_cli(admin, "stats", token_file=wrong)
    assert (code, stderr.strip()) == (1, "registry-proxy cache stats: HTTP 401: invalid token")
    code, _, stderr = await cache_cli(admin, "pins", "set", f"{fake_upstream.host}/team/huge:1")
    assert code == 1
    assert stderr.startswith("registry-proxy cache pins: HTTP 422: pins refused: 1 pinned images")
    assert "more than the cache budget" in stderr
