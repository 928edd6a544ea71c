"""The pull API in front of the fake upstream: headers, negotiation, auth, redirects, errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import pytest
from fakeupstream import (
    ACCEPT_ALL_MANIFESTS,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    FakeUpstreamServer,
)
from harness.mirror import StartMirror

API_VERSION = "Docker-Distribution-API-Version"


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


async def raw_request(host: str, port: int, method: str, target: str) -> RawResponse:
    """Send one request line exactly as given and read the whole response."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    )
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip()] = value.strip()
    return RawResponse(int(status_line.split()[1]), headers, body)


def error_code(body: Any) -> str:
    return str(body["errors"][0]["code"])


async def test_ping_answers_locally_with_the_api_version(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    client = await mirror()
    for path in ("/v2/", "/v2"):
        response = await client.get(path)
        assert response.status == 200
        assert response.headers[API_VERSION] == "registry/2.0"
        assert await response.json() == {}
    head = await client.head("/v2/")
    assert head.status == 200
    assert fake_upstream.registry.count() == 0


async def test_manifest_by_tag_is_the_upstream_bytes_with_its_headers(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    image = fake_upstream.registry.add_image("team/app", "1.0", [b"layer-one", b"layer-two"])
    client = await mirror()

    response = await client.get(
        "/v2/team/app/manifests/1.0", headers={"Accept": ACCEPT_ALL_MANIFESTS}
    )
    assert response.status == 200
    assert await response.read() == image.manifest_bytes
    assert response.headers["Content-Type"] == OCI_MANIFEST
    assert response.headers["Docker-Content-Digest"] == image.manifest_digest
    assert response.headers["Content-Length"] == str(len(image.manifest_bytes))
    assert response.headers["ETag"] == f'"{image.manifest_digest}"'
    assert response.headers[API_VERSION] == "registry/2.0"

    head = await client.head("/v2/team/app/manifests/1.0", headers={"Accept": OCI_MANIFEST})
    assert head.status == 200
    assert head.headers["Docker-Content-Digest"] == image.manifest_digest
    assert head.headers["Content-Length"] == str(len(image.manifest_bytes))
    assert await head.read() == b""


async def test_a_manifest_fetched_once_by_digest_is_served_from_the_cache(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    image = fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    client = await mirror()
    path = f"/v2/team/app/manifests/{image.manifest_digest}"
    first = await client.get(path, headers={"Accept": OCI_MANIFEST})
    assert first.headers["X-Cache"] == "MISS"
    upstream_calls = fake_upstream.registry.count(path_contains="/manifests/")

    second = await client.get(path, headers={"Accept": OCI_MANIFEST})
    assert second.headers["X-Cache"] == "HIT"
    assert await second.read() == image.manifest_bytes
    assert second.headers["Content-Type"] == OCI_MANIFEST
    assert fake_upstream.registry.count(path_contains="/manifests/") == upstream_calls

    conditional = await client.get(path, headers={"If-None-Match": f'"{image.manifest_digest}"'})
    assert conditional.status == 304


async def test_several_accept_lines_are_all_passed_on(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    amd64 = fake_upstream.registry.add_image("multi", None, [b"amd"], platform="linux/amd64")
    arm64 = fake_upstream.registry.add_image("multi", None, [b"arm"], platform="linux/arm64")
    index = fake_upstream.registry.add_index(
        "multi", "latest", {"linux/amd64": amd64, "linux/arm64": arm64}
    )
    client = await mirror()

    # containers/image sends one Accept line per type; every line counts.
    lines = [("Accept", t) for t in (OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX)]
    response = await client.get("/v2/multi/manifests/latest", headers=lines)
    assert response.status == 200
    assert response.headers["Docker-Content-Digest"] == index
    assert response.headers["Content-Type"] == OCI_INDEX


async def test_a_client_that_does_not_accept_indexes_never_gets_one(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    amd64 = fake_upstream.registry.add_image("multi", None, [b"amd"], platform="linux/amd64")
    arm64 = fake_upstream.registry.add_image("multi", None, [b"arm"], platform="linux/arm64")
    fake_upstream.registry.add_index(
        "multi", "latest", {"linux/amd64": amd64, "linux/arm64": arm64}
    )
    client = await mirror()

    response = await client.get(
        "/v2/multi/manifests/latest", headers={"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"}
    )
    assert response.status == 200
    assert response.headers["Content-Type"] == OCI_MANIFEST
    assert response.headers["Docker-Content-Digest"] == amd64.manifest_digest


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v2/Upper/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/a/manifests/bad!tag", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/a/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/a/manifests/sha256:totallywrong", 400, "DIGEST_INVALID"),
        ("GET", "/v2/a/blobs/sha256:abc", 400, "DIGEST_INVALID"),
        ("GET", "/v2/a/blobs/md5:" + "0" * 32, 400, "DIGEST_INVALID"),
        ("GET", "/v2/%2e%2e/%2e%2e/etc/manifests/passwd", 400, "NAME_INVALID"),
        ("GET", "/v2/../etc/blobs/sha256:" + "0" * 64, 400, "NAME_INVALID"),
        ("GET", "/v2/_catalog", 405, "UNSUPPORTED"),
        ("PUT", "/v2/a/manifests/latest", 405, "UNSUPPORTED"),
        ("DELETE", "/v2/a/manifests/latest", 405, "UNSUPPORTED"),
        ("POST", "/v2/a/blobs/uploads/", 405, "UNSUPPORTED"),
        ("PATCH", "/v2/a/blobs/uploads/some-uuid", 405, "UNSUPPORTED"),
        ("GET", "/v2/a/nonsense", 404, "UNSUPPORTED"),
    ],
)
async def test_bad_input_gets_an_oci_error_before_any_upstream_call(
    mirror: StartMirror,
    fake_upstream: FakeUpstreamServer,
    method: str,
    path: str,
    status: int,
    code: str,
) -> None:
    client = await mirror()
    assert client.port is not None
    # A raw request line: an HTTP client library would normalise `..` and `%2e` away.
    response = await raw_request(client.host, client.port, method, path)
    assert response.status == status
    assert response.headers[API_VERSION] == "registry/2.0"
    assert error_code(json.loads(response.body)) == code
    assert fake_upstream.registry.count() == 0


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v2/team/app/manifests/missing", "MANIFEST_UNKNOWN"),
        ("/v2/team/app/blobs/sha256:" + "a" * 64, "BLOB_UNKNOWN"),
        ("/v2/nobody/tags/list", "NAME_UNKNOWN"),
    ],
)
async def test_upstream_not_found_becomes_the_matching_oci_error(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, path: str, code: str
) -> None:
    fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    client = await mirror()
    response = await client.get(path)
    assert response.status == 404
    assert error_code(await response.json()) == code


async def test_tag_list_passes_pagination_and_the_link_header(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    for tag in ("a", "b", "c"):
        fake_upstream.registry.add_image("team/app", tag, [tag.encode()])
    client = await mirror()
    response = await client.get("/v2/team/app/tags/list", params={"n": "2"})
    assert response.status == 200
    assert (await response.json())["tags"] == ["a", "b"]
    assert "last=b" in response.headers["Link"]
    assert response.headers["Link"].startswith("</v2/team/app/tags/list?")
    rest = await client.get("/v2/team/app/tags/list", params={"n": "2", "last": "b"})
    assert (await rest.json())["tags"] == ["c"]


async def test_a_blob_is_served_byte_exact_with_its_digest(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    data = os.urandom(300_000)
    digest = fake_upstream.registry.add_blob(data)
    fake_upstream.registry.add_image("team/app", "1.0", [b"x"])
    client = await mirror()
    # A client offering compression must still get the exact stored bytes.
    response = await client.get(
        f"/v2/team/app/blobs/{digest}", headers={"Accept-Encoding": "zstd, gzip"}
    )
    assert response.status == 200
    body = await response.read()
    assert hashlib.sha256(body).hexdigest() == digest.split(":")[1]
    assert response.headers["Docker-Content-Digest"] == digest
    assert "Content-Encoding" not in response.headers
    assert response.headers["Accept-Ranges"] == "bytes"


async def test_pulls_work_behind_bearer_token_auth_anonymously_and_with_credentials(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, tmp_path: Any
) -> None:
    from yarl import URL

    from proxy.config import Secret, UpstreamSettings

    registry = fake_upstream.registry
    registry.auth = "bearer"
    public = registry.add_image("public/app", "1.0", [b"public layer"])
    private = registry.add_image("private/app", "1.0", [b"private layer"])
    registry.private_repos = {"private/app"}
    registry.users = {"alice": "s3cret"}

    anonymous = await mirror()
    response = await anonymous.get("/v2/public/app/manifests/1.0")
    assert response.status == 200
    assert await response.read() == public.manifest_bytes
    denied = await anonymous.get("/v2/private/app/manifests/1.0")
    assert denied.status == 401
    assert error_code(await denied.json()) == "UNAUTHORIZED"

    upstream = UpstreamSettings(
        "fake", URL(fake_upstream.url), username="alice", password=Secret("s3cret")
    )
    authorised = await mirror(upstreams=(upstream,), cache_dir=tmp_path / "other")
    response = await authorised.get("/v2/private/app/manifests/1.0")
    assert response.status == 200
    assert await response.read() == private.manifest_bytes
    blob = await authorised.get(f"/v2/private/app/blobs/{private.layer_digests[0]}")
    assert await blob.read() == b"private layer"
    # Tokens are cached per scope: the second request reused the first token.
    tokens = registry.tokens_issued
    await authorised.get(f"/v2/private/app/blobs/{private.config_digest}")
    assert registry.tokens_issued == tokens


async def test_pulls_work_with_basic_auth(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    from yarl import URL

    from proxy.config import Secret, UpstreamSettings

    fake_upstream.registry.auth = "basic"
    fake_upstream.registry.users = {"bob": "pw"}
    image = fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    upstream = UpstreamSettings("fake", URL(fake_upstream.url), "bob", Secret("pw"))
    client = await mirror(upstreams=(upstream,))
    response = await client.get("/v2/team/app/manifests/1.0")
    assert await response.read() == image.manifest_bytes


async def test_blob_redirects_are_followed_without_forwarding_credentials(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, fake_cdn: FakeUpstreamServer
) -> None:
    from yarl import URL

    from proxy.config import Secret, UpstreamSettings

    registry = fake_upstream.registry
    registry.auth = "bearer"
    registry.users = {"alice": "s3cret"}
    data = os.urandom(100_000)
    image = registry.add_image("team/app", "1.0", [data])
    fake_cdn.registry.add_blob(data)
    registry.blob_redirect_to = fake_cdn.url

    upstream = UpstreamSettings("fake", URL(fake_upstream.url), "alice", Secret("s3cret"))
    client = await mirror(upstreams=(upstream,))
    response = await client.get(f"/v2/team/app/blobs/{image.layer_digests[0]}")
    assert response.status == 200
    assert await response.read() == data
    assert fake_cdn.registry.count(path_contains="/cdn/") == 1
    assert not fake_cdn.registry.cdn_saw_authorization


async def test_a_redirect_loop_ends_in_a_clean_error(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    image = fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    fake_upstream.registry.redirect_loop = True
    client = await mirror()
    response = await client.get(f"/v2/team/app/blobs/{image.layer_digests[0]}")
    assert response.status == 502
    assert error_code(await response.json()) == "UNAVAILABLE"


async def test_docker_hub_single_component_names_get_library_prefix(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    from yarl import URL

    from proxy.config import UpstreamSettings

    image = fake_upstream.registry.add_image("library/nginx", "1.27", [b"layer"])
    hub = UpstreamSettings("docker.io", URL(fake_upstream.url))
    client = await mirror(upstreams=(hub,))
    response = await client.get("/v2/nginx/manifests/1.27")
    assert response.status == 200
    assert await response.read() == image.manifest_bytes
    assert fake_upstream.registry.count(path_contains="/v2/library/nginx/manifests/1.27") == 1


async def test_an_unreachable_upstream_fails_fast_with_502(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    client = await mirror()
    await fake_upstream.stop()
    response = await client.get("/v2/team/app/manifests/1.0")
    assert response.status == 502
    body = await response.json()
    assert error_code(body) == "UNAVAILABLE"
    assert "Traceback" not in json.dumps(body)


async def test_an_upstream_that_never_answers_times_out_with_504(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    fake_upstream.registry.black_hole = True
    client = await mirror(read_timeout=0.5)
    response = await client.get("/v2/team/app/manifests/1.0")
    assert response.status == 504
    assert error_code(await response.json()) == "UNAVAILABLE"


@pytest.mark.parametrize("status", [500, 503])
async def test_upstream_server_errors_become_502(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, status: int
) -> None:
    fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    fake_upstream.registry.fail_next("/manifests/", status, times=5)
    client = await mirror()
    response = await client.get("/v2/team/app/manifests/1.0")
    assert response.status == 502


async def test_upstream_rate_limit_is_passed_on_with_retry_after(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    fake_upstream.registry.fail_next("/manifests/", 429, headers={"Retry-After": "17"})
    client = await mirror()
    response = await client.get("/v2/team/app/manifests/1.0")
    assert response.status == 429
    assert response.headers["Retry-After"] == "17"
    assert error_code(await response.json()) == "TOOMANYREQUESTS"


async def test_a_manifest_whose_bytes_do_not_match_its_digest_is_refused(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    image = fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    fake_upstream.registry.lie_about_digest.add(image.manifest_digest)
    client = await mirror()
    response = await client.get(f"/v2/team/app/manifests/{image.manifest_digest}")
    assert response.status == 502
    again = await client.get("/v2/team/app/manifests/1.0")
    assert again.status == 502
