"""The fake upstream registry itself: it must behave like Distribution before it can judge the
mirror, and each fault must really happen on the wire."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest
from fakeupstream import (
    ACCEPT_ALL_MANIFESTS,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    FakeRegistry,
    FakeUpstreamServer,
    Gate,
)
from harness.digests import sha256_digest
from multidict import CIMultiDict

BLOB_2048 = bytes(range(256)) * 8


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def registry(fake_upstream: FakeUpstreamServer) -> FakeRegistry:
    return fake_upstream.registry


def accept_lines(*media_types: str) -> CIMultiDict[str]:
    """One Accept header line per type, as containers/image and dockerd send them."""
    headers: CIMultiDict[str] = CIMultiDict()
    for media_type in media_types:
        headers.add("Accept", media_type)
    return headers


def basic_auth(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def error_code(resp: aiohttp.ClientResponse) -> str:
    body = json.loads(await resp.read())
    code: str = body["errors"][0]["code"]
    return code


async def test_ping_answers_empty_json_with_the_api_version_header(
    fake_upstream: FakeUpstreamServer, session: aiohttp.ClientSession
) -> None:
    async with session.get(f"{fake_upstream.url}/v2/") as resp:
        assert resp.status == 200
        assert await resp.json() == {}
        assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_manifest_by_tag_is_served_byte_exact_with_digest_headers(
    fake_upstream: FakeUpstreamServer, registry: FakeRegistry, session: aiohttp.ClientSession
) -> None:
    image = registry.add_image("library/alpine", "3.20", [b"layer-one", b"layer-two"])
    url = f"{fake_upstream.url}/v2/library/alpine/manifests/3.20"
    async with session.get(url, headers={"Accept": OCI_MANIFEST}) as resp:
        body = await resp.read()
        assert resp.status == 200
        assert body == image.manifest_bytes
        assert sha256_digest(body) == image.manifest_digest
        assert resp.headers["Content-Type"] == OCI_MANIFEST
        assert resp.headers["Docker-Content-Digest"] == image.manifest_digest
        assert resp.headers["Content-Length"] == str(len(body))
        assert resp.headers["ETag"] == f'"{image.manifest_digest}"'
    manifest = json.loads(body)
    assert [layer["digest"] for layer in manifest["layers"]] == image.layer_digests
    assert manifest["config"]["digest"] == image.config_digest
    async with session.head(url, headers={"Accept": OCI_MANIFEST}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(image.manifest_bytes))
        assert await resp.read() == b""


async def test_index_tag_resolves_to_amd64_when_the_client_does_not_accept_indexes(
    fake_upstream: FakeUpstreamServer, registry: FakeRegistry, session: aiohttp.ClientSession
) -> None:
    amd64 = registry.add_image("app", None, [b"amd64"], platform="linux/amd64")
    arm64 = registry.add_image("app", None, [b"arm64"], platform="linux/arm64/v8")
    index = registry.add_index("app", "latest", {"linux/arm64/v8": arm64, "linux/amd64": amd64})
    url = f"{fake_upstream.url}/v2/app/manifests/latest"

    # Several Accept lines: the index type is on the last one, so reading one line is not enough.
    headers = accept_lines(DOCKER_MANIFEST, OCI_MANIFEST, OCI_INDEX)
    async with session.get(url, headers=headers) as resp:
        assert resp.headers["Content-Type"] == OCI_INDEX
        assert resp.headers["Docker-Content-Digest"] == index
        entries = json.loads(await resp.read())["manifests"]
        assert [e["platform"].get("variant") for e in entries] == ["v8", None]

    async with session.get(url, headers=accept_lines(DOCKER_MANIFEST, OCI_MANIFEST)) as resp:
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == amd64.manifest_digest
        assert await resp.read() == amd64.manifest_bytes

    # By digest the bytes must match the digest asked for, so there is no substitution.
    by_digest = f"{fake_upstream.url}/v2/app/manifests/{index}"
    async with session.get(by_digest, headers={"Accept": OCI_MANIFEST}) as resp:
        assert resp.status == 404
        assert await error_code(resp) == "MANIFEST_UNKNOWN"


async def test_manifest_nobody_accepts_is_manifest_unknown(
    fake_upstream: FakeUpstreamServer, registry: FakeRegistry, session: aiohttp.ClientSession
) -> None:
    image = registry.add_image("docker", None, [b"x"], media_type=DOCKER_MANIFEST)
    registry.add_index("docker", "v1", {"linux/amd64": image}, media_type=DOCKER_MANIFEST_LIST)
    url = f"{fake_upstream.url}/v2/docker/manifests/v1"
    async with session.get(url, headers={"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}) as resp:
        assert resp.status == 404
        assert await error_code(resp) == "MANIFEST_UNKNOWN"
    async with session.get(url, headers={"Accept": ACCEPT_ALL_MANIFESTS}) as resp:
        assert resp.headers["Content-Type"] == DOCKER_MANIFEST_LIST


async def test_unknown_names_manifests_and_blobs_get_oci_error_codes(
    fake_upstream: FakeUpstreamServer, registry: FakeRegistry, session: aiohttp.ClientSession
) -> None:
    registry.add_image("known", "v1", [b"x"])
    base = f"{fake_upstream.url}/v2"
    cases = {
        f"{base}/unknown/manifests/v1": "NAME_UNKNOWN",
        f"{base}/known/manifests/v2": "MANIFEST_UNKNOWN",
        f"{base}/known/blobs/{sha256_digest(b'missing')}": "BLOB_UNKNOWN",
        f"{base}/known/manifests/sha256:totallywrong": "DIGEST_INVALID",
    }
    for url, code in cases.items():
        async with session.get(url) as resp:
            assert resp.status in (400, 404), url
            assert await error_code(resp) == code, url


@pytest.mark.parametrize(
    ("range_header", "status", "content_range", "first", "last"),
    [
        ("bytes=500-1499", 206, "bytes 500-1499/2048", 500, 1499),
        ("bytes=500-", 206, "bytes 500-2047/2048", 500, 2047),
        ("bytes=-500", 206, "bytes 1548-2047/2048", 1548, 2047),
        ("bytes=2000-5000", 206, "bytes 2000-2047/2048", 2000, 2047),
        ("bytes=500-0", 416, "bytes */2048", 0, -1),
        ("bytes=5000-10000", 416, "bytes */2048", 0, -1),
    ],
)
async def test_blob_range_requests_follow_the_conformance_cases(
    fake_upstream: FakeUpstreamServer,
    registry: FakeRegistry,
    session: aiohttp.ClientSession,
    range_header: str,
    status: int,
    content_range: str,
    first: int,
    last: int,
) -> None:
    registry.add_image("r", "v1", [])
    digest = registry.add_blob(BLOB_2048)
    url = f"{fake_upstream.url}/v2/r/blobs/{digest}"
    async with session.get(url, headers={"Range": range_header}) as resp:
        body = await resp.read()
        assert resp.status == status
        assert resp.headers["Content-Range"] == content_range
        if status == 206:
            assert body == BLOB_2048[first : last + 1]
            assert resp.headers["Content-Length"] == str(last - first + 1)


async def test_blob_without_range_is_whole_and_advertises_ranges(
    fake_upstream: FakeUpstreamServer, registry: FakeRegistry, session: aiohttp.ClientSession
) -> None:
    registry.add_image("r", "v1", [])
    digest = registry.add_blob(BLOB_2048)
    url = f"{fake_upstream.url}/v2/r/blobs/{digest}"
    # The mirror will ask upstream with Accept-Encoding; a blob must never come back encoded.
    async with session.get(url, headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.status == 200
        assert await resp.read() == BLOB_2048
        assert resp.headers["Accept-Ranges"] == "bytes"
        assert resp.headers["Docker-Content-Digest"] == digest
        assert "Content-Encoding" not in resp.headers
    async with session.head(url) as resp:
        assert resp.headers["Content-Length"] == "2048"


async def test_tags_list_is_sorted_and_paginated_with_link(
    fake_upstream: FakeUpstreamServer, registry: FakeRegistry, session: aiohttp.ClientSession
) -> None:
    image = registry.add_image("p", "c", [b"x"])
    for tag in ("a", "e", "b", "d"):
        registry.tag("p", tag, image.manifest_digest)
    url = f"{fake_upstream.url}/v2/p/tags/list?n=2"
    pages = []
    while True:
        async with session.get(url) as resp:
            pages.append((await resp.json())["tags"])
            link = resp.headers.get("Link")
        if link is None:
            break
        url = fake_upstream.url + link.split(";")[0].strip("<>")
    assert pages == [["a", "b"], ["c", "d"], ["e"]]


async def test_bearer_flow_challenges_issues_a_scoped_token_and_then_serves(
    fake_upstream: FakeUpstreamServer, registry: FakeRegistry, session: aiohttp.ClientSession
) -> None:
    registry.auth = "bearer"
    image = registry.add_image("library/nginx", "1.27", [b"x"])
    realm = f"{fake_upstream.url}/token"

    async with session.get(f"{fake_upstream.url}/v2/") as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == (
            f'Bearer realm="{realm}",service="fake-registry"'
        )
    url = f"{fake_upstream.url}/v2/library/nginx/manifests/1.27"
    async with session.get(url) as resp:
        assert resp.status == 401
        assert await error_code(resp) == "UNAUTHORIZED"
        assert 'scope="repository:library/nginx:pull"' in resp.headers["WWW-Authenticate"]

    params = {"service": "fake-registry", "scope": "repository:library/nginx:pull"}
    async with session.get(realm, params=params) as resp:
        grant = await resp.json()
    assert grant["token"] == grant["access_token"]
    assert grant["expires_in"] == registry.token_expires_in
    assert registry.tokens_issued == 1

    auth = {"Authorization": f"Bearer {grant['token']}"}
    async with session.get(url, headers=auth) as resp:
        assert resp.status == 200
        assert await resp.read() == image.manifest_bytes

    # A token is for its scope only, and stops working once expired.
    registry.add_image("library/other", "1", [b"y"])
    other = f"{fake_upstream.url}/v2/library/other/manifests/1"
    async with session.get(other, headers=auth) as resp:
        assert resp.status == 401
    registry.expire_tokens()
    async with session.get(url, headers=auth) as resp:
        assert resp.status == 401
        assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]


async def test_private_repository_needs_credentials_on_the_token_request(
    fake_upstream: FakeUpstreamServer, registry: FakeRegistry, session: aiohttp.ClientSession
) -> None:
    registry.auth = "bearer"
    registry.users = {"alice": "s3cret"}
    registry.private_repos = {"team/private"}
    registry.add_image("team/private", "v1", [b"x"])
    token_url = f"{fake_upstream.url}/token"
    params = {"service": "fake-registry", "scope": "repository:team/private:pull"}
    url = f"{fake_upstream.url}/v2/team/private/manifests/v1"

    async with session.get(token_url, params=params) as resp:
        anonymous = (await resp.json())["token"]
    async with session.get(url, headers={"Authorization": f"Bearer {anonymous}"}) as resp:
        assert resp.status == 401
        assert 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]

    wrong = basic_auth("alice", "wrong")
    async with session.get(token_url, params=params, headers=wrong) as resp:
        assert resp.status == 401

    right = basic_auth("alice", "s3cret")
    async with session.get(token_url, params=params, headers=right) as resp:
        token = (await resp.json())["token"]
    async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200

    registry.token_endpoint_down = True
    async with session.get(token_url, params=params, headers=right) as resp:
        assert resp.status == 503
    assert registry.tokens_issued == 2


async def test_basic_auth_mode_challenges_and_accepts_known_users(
    fake_upstream: FakeUpstreamServer, registry: FakeRegistry, session: aiohttp.ClientSession
) -> None:
    registry.auth = "basic"
    registry.users = {"bob": "pw"}
    async with session.get(f"{fake_upstream.url}/v2/") as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="fake-registry"'
    async with session.get(f"{fake_upstream.url}/v2/", headers=basic_auth("bob", "pw")) as resp:
        assert resp.status == 200
    async with session.get(f"{fake_upstream.url}/v2/", headers=basic_auth("bob", "no")) as resp:
        assert resp.status == 401


async def test_blob_redirect_reaches_the_cdn_which_records_authorization(
    fake_upstream: FakeUpstreamServer,
    fake_cdn: FakeUpstreamServer,
    registry: FakeRegistry,
    session: aiohttp.ClientSession,
) -> None:
    image = registry.add_image("r", "v1", [b"layer-bytes"])
    layer = image.layer_digests[0]
    fake_cdn.registry.add_blob(b"layer-bytes")
    registry.blob_redirect_to = fake_cdn.url
    url = f"{fake_upstream.url}/v2/r/blobs/{layer}"

    async with session.get(url, allow_redirects=False) as resp:
        assert resp.status == 307
        assert resp.headers["Location"].startswith(f"{fake_cdn.url}/cdn/{layer}?sig=")
    async with session.get(url) as resp:
        assert resp.status == 200
        assert await resp.read() == b"layer-bytes"
    assert fake_cdn.registry.count("GET", f"/cdn/{layer}") == 1
    assert fake_cdn.registry.cdn_saw_authorization is False

    # The recorder itself must be able to see a leaked header.
    cdn_url = f"{fake_cdn.url}/cdn/{layer}"
    async with session.get(cdn_url, headers={"Authorization": "Bearer leaked"}) as resp:
        assert resp.status == 200
    assert fake_cdn.registry.cdn_saw_authorization is True
    assert fake_cdn.registry.cdn_authorization_count == 1


async def test_redirect_loop_never_ends(
    fake_upstream: FakeUpstreamServer, registry: FakeRegistry, session: aiohttp.ClientSession
) -> None:
    image = registry.add_image("r", "v1", [b"x"])
    registry.redirect_loop = True
    url = f"{fake_upstream.url}/v2/r/blobs/{image.layer_digests[0]}"
    with pytest.raises(aiohttp.TooManyRedirects):
        async with session.get(url, max_redirects=5):
            pass
    assert registry.count("GET", "/blobs/") == 5


async def test_gate_pauses_the_body_until_released(
    fake_upstream: FakeUpstreamServer, registry: FakeRegistry, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(300_000)
    image = registry.add_image("r", "v1", [data])
    digest = image.layer_digests[0]
    gate = Gate(after_bytes=100_000)
    registry.gate[digest] = gate
    registry.chunk_size = 16 * 1024

    async with session.get(f"{fake_upstream.url}/v2/r/blobs/{digest}") as resp:
        head = await resp.content.readexactly(100_000)
        await gate.reached.wait()
        assert gate.hits == 1
        # Nothing past the gate was sent: the stream is still open with nothing buffered.
        assert not resp.content.at_eof()
        assert resp.content.total_bytes == 100_000
        gate.release.set()
        rest = await resp.read()
    assert head + rest == data


async def test_body_faults_happen_on_the_wire(
    fake_upstream: FakeUpstreamServer, registry: FakeRegistry, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(200_000)
    image = registry.add_image("r", "v1", [data])
    digest = image.layer_digests[0]
    url = f"{fake_upstream.url}/v2/r/blobs/{digest}"

    registry.lie_about_digest.add(digest)
    async with session.get(url) as resp:
        body = await resp.read()
        assert resp.headers["Docker-Content-Digest"] == digest
    assert len(body) == len(data)
    assert "sha256:" + hashlib.sha256(body).hexdigest() != digest
    registry.lie_about_digest.clear()

    registry.wrong_content_length.add(digest)
    async with session.get(url) as resp:
        assert len(await resp.read()) == len(data) - 1
    registry.wrong_content_length.clear()

    registry.truncate[digest] = 70_000
    async with session.get(url) as resp:
        assert resp.headers["Content-Length"] == str(len(data))
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    registry.truncate.clear()

    registry.reset_after[digest] = 1000
    with pytest.raises(aiohttp.ClientError):
        async with session.get(url) as resp:
            await resp.read()
    registry.reset_after.clear()

    async with session.get(url) as resp:
        assert await resp.read() == data


async def test_fail_next_and_down_answer_errors_then_recover(
    fake_upstream: FakeUpstreamServer, registry: FakeRegistry, session: aiohttp.ClientSession
) -> None:
    registry.add_image("r", "v1", [b"x"])
    url = f"{fake_upstream.url}/v2/r/manifests/v1"
    registry.fail_next("/manifests/", 429, times=2, headers={"Retry-After": "7"})
    for _ in range(2):
        async with session.get(url) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "7"
            assert await error_code(resp) == "TOOMANYREQUESTS"
    async with session.get(url) as resp:
        assert resp.status == 200
    registry.fail_next("/manifests/", 404, method="HEAD")
    async with session.get(url) as resp:
        assert resp.status == 200
    async with session.head(url) as resp:
        assert resp.status == 404
    registry.fail_next("/manifests/", 404)
    async with session.get(url) as resp:
        assert await error_code(resp) == "MANIFEST_UNKNOWN"

    registry.down = True
    async with session.get(f"{fake_upstream.url}/v2/") as resp:
        assert resp.status == 503
    registry.down = False
    async with session.get(f"{fake_upstream.url}/v2/") as resp:
        assert resp.status == 200


async def test_count_filters_recorded_requests_by_method_and_path(
    fake_upstream: FakeUpstreamServer, registry: FakeRegistry, session: aiohttp.ClientSession
) -> None:
    image = registry.add_image("r", "v1", [b"x"])
    base = f"{fake_upstream.url}/v2/r"
    async with session.head(f"{base}/manifests/v1"):
        pass
    async with session.get(f"{base}/manifests/v1", headers=accept_lines("a/b", "c/d")):
        pass
    async with session.get(f"{base}/blobs/{image.layer_digests[0]}?ns=docker.io"):
        pass
    assert registry.count() == 3
    assert registry.count("HEAD") == 1
    assert registry.count("get", "/manifests/") == 1
    assert registry.count(path_contains="/blobs/") == 1
    assert registry.requests[1].get_all("accept") == ["a/b", "c/d"]
    assert registry.requests[2].query == {"ns": "docker.io"}


async def test_black_hole_holds_the_request_until_the_server_stops(
    fake_upstream: FakeUpstreamServer, registry: FakeRegistry, session: aiohttp.ClientSession
) -> None:
    registry.black_hole = True

    async def ping() -> int:
        async with session.get(f"{fake_upstream.url}/v2/") as resp:
            return resp.status

    task = asyncio.create_task(ping())
    await registry.black_hole_reached.wait()
    assert not task.done()
    await fake_upstream.stop()
    # aiohttp retries an idempotent request once after a disconnect; that retry is refused.
    with pytest.raises(aiohttp.ClientError):
        await task
    assert registry.count("GET", "/v2/") == 1


async def test_stopped_server_refuses_connections_and_can_come_back(
    fake_upstream: FakeUpstreamServer, session: aiohttp.ClientSession
) -> None:
    url = f"{fake_upstream.url}/v2/"
    await fake_upstream.stop()
    with pytest.raises(aiohttp.ClientConnectorError) as excinfo:
        async with session.get(url):
            pass
    assert isinstance(excinfo.value.os_error, ConnectionRefusedError)
    await fake_upstream.start()
    async with session.get(url) as resp:
        assert resp.status == 200
