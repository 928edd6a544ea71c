"""A cache hit is served only to whom may pull it from a repository it was fetched for.

Digests are not secrets (they show in pod status, pinned manifests, CI logs), so knowing one
must not be enough to read cached content through another repository, another upstream, the
default upstream or `?ns=`. Each test plays the attack against fake upstreams that, like
Distribution, serve a blob only through the repositories it was pushed to (`link_blobs`).
"""

from __future__ import annotations

import base64
from pathlib import Path

import bcrypt
import pytest
from fakeupstream import ACCEPT_ALL_MANIFESTS, FakeUpstreamServer, Image
from harness.mirror import StartMirror
from yarl import URL

from proxy.config import AccessRule, UpstreamSettings


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


ALICE = basic("alice", "wonderland")
BOB = basic("bob", "builder")


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    lines = [
        f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}"
        for user, password in (("alice", "wonderland"), ("bob", "builder"))
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


async def pull(client: object, prefix: str, image: Image, headers: dict[str, str]) -> None:
    """Fetch a manifest by digest and every blob of `image` as an authorised client would."""
    get = client.get  # type: ignore[attr-defined]
    accept = {"Accept": ACCEPT_ALL_MANIFESTS}
    response = await get(
        f"{prefix}/manifests/{image.manifest_digest}", headers={**headers, **accept}
    )
    assert response.status == 200
    for digest in (image.config_digest, *image.layer_digests):
        response = await get(f"{prefix}/blobs/{digest}", headers=headers)
        assert response.status == 200
        await response.read()


async def test_a_denied_user_cannot_read_a_private_image_by_digest_through_an_allowed_repository(
    mirror: StartMirror,
    fake_upstream: FakeUpstreamServer,
    fake_cdn: FakeUpstreamServer,
    htpasswd: Path,
) -> None:
    hub, corp = fake_upstream.registry, fake_cdn.registry
    hub.link_blobs = corp.link_blobs = True
    nginx = hub.add_image("library/nginx", "1.27", [b"public nginx layer", b"shared base layer"])
    secret = corp.add_image("corp/app", "1.0", [b"private layer", b"shared base layer"])
    rules = (
        AccessRule(("*",), ("docker.io/*",)),
        AccessRule(("alice",), ("registry.corp.example/*",)),
    )
    client = await mirror(
        auth_htpasswd=htpasswd,
        access=rules,
        upstreams=(
            UpstreamSettings("docker.io", URL(fake_upstream.url)),
            UpstreamSettings("registry.corp.example", URL(fake_cdn.url)),
        ),
    )
    await pull(client, "/v2/registry.corp.example/corp/app", secret, ALICE)  # now cached

    private = [secret.manifest_digest, secret.config_digest, secret.layer_digests[0]]
    for digest in private:
        kind = "manifests" if digest == secret.manifest_digest else "blobs"
        for path in (
            f"/v2/library/nginx/{kind}/{digest}",  # the default upstream
            f"/v2/docker.io/library/nginx/{kind}/{digest}",  # its path prefix
            f"/v2/any/name/{kind}/{digest}?ns=docker.io",  # containerd's ns
        ):
            for method in ("GET", "HEAD"):
                response = await client.request(
                    method, path, headers={**BOB, "Accept": ACCEPT_ALL_MANIFESTS}
                )
                assert response.status == 404, (method, path)
                assert response.headers.get("X-Cache") is None
                assert b"private layer" not in await response.read()

    # What the allowed repository really holds stays readable, shared layer included.
    for digest in (nginx.manifest_digest, *nginx.layer_digests):
        kind = "manifests" if digest == nginx.manifest_digest else "blobs"
        response = await client.get(
            f"/v2/library/nginx/{kind}/{digest}", headers={**BOB, "Accept": ACCEPT_ALL_MANIFESTS}
        )
        assert response.status == 200, digest
    # And alice still reads her image from the cache.
    await pull(client, "/v2/registry.corp.example/corp/app", secret, ALICE)


async def test_a_recorded_repository_keeps_serving_from_the_cache_while_the_upstream_is_down(
    mirror: StartMirror,
    fake_upstream: FakeUpstreamServer,
    fake_cdn: FakeUpstreamServer,
    htpasswd: Path,
) -> None:
    corp = fake_cdn.registry
    corp.link_blobs = True
    secret = corp.add_image("corp/app", "1.0", [b"private layer"])
    rules = (AccessRule(("alice",), ("registry.corp.example/*",)),)
    client = await mirror(
        auth_htpasswd=htpasswd,
        access=rules,
        upstreams=(
            UpstreamSettings("docker.io", URL(fake_upstream.url)),
            UpstreamSettings("registry.corp.example", URL(fake_cdn.url)),
        ),
    )
    await pull(client, "/v2/registry.corp.example/corp/app", secret, ALICE)
    await fake_cdn.stop()
    await pull(client, "/v2/registry.corp.example/corp/app", secret, ALICE)


def passthrough_upstream(server: FakeUpstreamServer, name: str = "fake") -> UpstreamSettings:
    return UpstreamSettings(name, URL(server.url), pass_client_credentials=True)


def private_registry(server: FakeUpstreamServer) -> tuple[Image, Image]:
    registry = server.registry
    registry.auth = "bearer"
    registry.users = {"alice": "wonderland"}
    registry.private_repos = {"corp/app"}
    registry.link_blobs = True
    secret = registry.add_image("corp/app", "1.0", [b"private layer"])
    public = registry.add_image("lib/tool", "1.0", [b"public layer"])
    return secret, public


async def test_an_anonymous_client_cannot_read_private_cached_blobs_through_a_public_repository(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    secret, public = private_registry(fake_upstream)
    client = await mirror(upstreams=(passthrough_upstream(fake_upstream),))
    await pull(client, "/v2/corp/app", secret, ALICE)
    await pull(client, "/v2/lib/tool", public, {})  # the public repository is readable

    for digest in (secret.manifest_digest, secret.config_digest, secret.layer_digests[0]):
        kind = "manifests" if digest == secret.manifest_digest else "blobs"
        response = await client.get(
            f"/v2/lib/tool/{kind}/{digest}", headers={"Accept": ACCEPT_ALL_MANIFESTS}
        )
        assert response.status == 404, digest
        assert b"private layer" not in await response.read()
    # The private repository itself still asks for credentials, cached or not.
    assert (await client.get(f"/v2/corp/app/blobs/{secret.layer_digests[0]}")).status == 401


async def test_an_anonymous_client_cannot_read_private_cached_blobs_through_the_default_upstream(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, fake_cdn: FakeUpstreamServer
) -> None:
    secret, _ = private_registry(fake_cdn)
    hub = fake_upstream.registry
    hub.link_blobs = True
    hub.add_image("library/nginx", "1.27", [b"public nginx layer"])
    client = await mirror(
        upstreams=(
            UpstreamSettings("docker.io", URL(fake_upstream.url)),
            passthrough_upstream(fake_cdn, "corp.example"),
        )
    )
    await pull(client, "/v2/corp.example/corp/app", secret, ALICE)

    for digest in (secret.manifest_digest, secret.layer_digests[0]):
        kind = "manifests" if digest == secret.manifest_digest else "blobs"
        for path in (
            f"/v2/library/nginx/{kind}/{digest}",
            f"/v2/whatever/{kind}/{digest}?ns=docker.io",
        ):
            response = await client.get(path, headers={"Accept": ACCEPT_ALL_MANIFESTS})
            assert response.status == 404, path
            assert b"private layer" not in await response.read()


async def test_an_anonymous_404_does_not_erase_a_tag_resolution_authorised_users_rely_on(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    secret, _ = private_registry(fake_upstream)
    fake_upstream.registry.hide_private = True  # anonymous clients get 404, not 401
    client = await mirror(upstreams=(passthrough_upstream(fake_upstream),))
    tag = "/v2/corp/app/manifests/1.0"
    accept = {"Accept": ACCEPT_ALL_MANIFESTS}
    assert (await client.get(tag, headers={**ALICE, **accept})).status == 200

    anonymous = await client.get(tag, headers=accept)
    assert anonymous.status == 404
    assert b"schemaVersion" not in await anonymous.read()

    # The resolution alice's pulls rely on is still there: served even with the upstream gone.
    await fake_upstream.stop()
    again = await client.get(tag, headers={**ALICE, **accept})
    assert again.status == 200
    assert await again.read() == secret.manifest_bytes
