"""Client authentication and allow-lists: no one in who does not belong."""

from __future__ import annotations

import base64
from pathlib import Path

import bcrypt
import pytest
from fakeupstream import ACCEPT_ALL_MANIFESTS, FakeUpstreamServer
from harness.mirror import StartMirror
from yarl import URL

from proxy.config import AccessRule, ConfigError, UpstreamSettings
from proxy.config.load import load_settings


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    lines = [
        f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}"
        for user, password in (("alice", "wonderland"), ("bob", "builder"))
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text("ci-runner s3cr3t-token-value\n")
    return path


async def test_without_credentials_clients_get_a_basic_challenge(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, htpasswd: Path
) -> None:
    fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    client = await mirror(auth_htpasswd=htpasswd)
    for path in ("/v2/", "/v2/team/app/manifests/1.0"):
        response = await client.get(path)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Basic realm="registry-proxy"'
        assert (await response.json())["errors"][0]["code"] == "UNAUTHORIZED"
    wrong = await client.get("/v2/team/app/manifests/1.0", headers=basic("alice", "nope"))
    assert wrong.status == 401
    assert fake_upstream.registry.count(path_contains="/manifests/") == 0


async def test_htpasswd_users_and_static_tokens_pull(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, htpasswd: Path, tokens: Path
) -> None:
    image = fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    client = await mirror(auth_htpasswd=htpasswd, auth_tokens_file=tokens)
    for headers in (
        basic("alice", "wonderland"),
        basic("alice", "wonderland"),  # answered from the verified-password memo
        {"Authorization": "Bearer s3cr3t-token-value"},
    ):
        response = await client.get(
            "/v2/team/app/manifests/1.0", headers={**headers, "Accept": ACCEPT_ALL_MANIFESTS}
        )
        assert response.status == 200
        assert await response.read() == image.manifest_bytes
    bad_token = await client.get("/v2/", headers={"Authorization": "Bearer guess"})
    assert bad_token.status == 401


async def test_allow_lists_keep_private_upstreams_to_their_users(
    mirror: StartMirror,
    fake_upstream: FakeUpstreamServer,
    fake_cdn: FakeUpstreamServer,
    htpasswd: Path,
) -> None:
    public, private = fake_upstream, fake_cdn
    public.registry.add_image("lib/tool", "1.0", [b"public"])
    secret = private.registry.add_image("corp/app", "1.0", [b"private"])
    rules = (
        AccessRule(("*",), ("docker.io/*",)),
        AccessRule(("alice",), ("private.example/corp/*",)),
    )
    client = await mirror(
        auth_htpasswd=htpasswd,
        access=rules,
        upstreams=(
            UpstreamSettings("docker.io", URL(public.url)),
            UpstreamSettings("private.example", URL(private.url)),
        ),
    )
    path = "/v2/private.example/corp/app/manifests/1.0"
    alice = await client.get(path, headers=basic("alice", "wonderland"))
    assert alice.status == 200
    assert await alice.read() == secret.manifest_bytes
    # Bob must not get it, not even from the cache alice just filled.
    for bob_path in (path, f"/v2/private.example/corp/app/blobs/{secret.layer_digests[0]}"):
        bob = await client.get(bob_path, headers=basic("bob", "builder"))
        assert bob.status == 403
        assert (await bob.json())["errors"][0]["code"] == "DENIED"
    both = await client.get("/v2/lib/tool/manifests/1.0", headers=basic("bob", "builder"))
    assert both.status == 200


def test_access_rules_and_bad_auth_files_are_checked_at_start_up(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[[access]]\nidentities = ["alice"]\nallow = ["ghcr.io/corp/*"]\n')
    settings = load_settings(config, environ={})
    assert settings.access == (AccessRule(("alice",), ("ghcr.io/corp/*",)),)

    plain = tmp_path / "plain-htpasswd"
    plain.write_text("alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
    with pytest.raises(ConfigError, match="auth_htpasswd"):
        load_settings(environ={}, flags={"auth_htpasswd": str(plain)})


async def test_with_client_credentials_passed_on_the_cache_serves_only_whom_upstream_accepts(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    registry = fake_upstream.registry
    registry.auth = "bearer"
    registry.users = {"alice": "wonderland", "bob": "builder"}
    registry.private_repos = {"corp/app"}
    secret = registry.add_image("corp/app", "1.0", [b"private layer"])
    public = registry.add_image("lib/tool", "1.0", [b"public layer"])
    upstream = UpstreamSettings("fake", URL(fake_upstream.url), pass_client_credentials=True)
    client = await mirror(upstreams=(upstream,))
    blob = f"/v2/corp/app/blobs/{secret.layer_digests[0]}"

    anonymous = await client.get("/v2/corp/app/manifests/1.0")
    assert anonymous.status == 401
    realm = client.make_url("/auth/token")
    assert anonymous.headers["WWW-Authenticate"] == (
        f'Bearer realm="{realm}",service="registry-proxy",scope="repository:corp/app:pull"'
    )

    alice = basic("alice", "wonderland")
    for path in ("/v2/corp/app/manifests/1.0", blob):
        response = await client.get(path, headers=alice)
        assert response.status == 200, path
    assert await (await client.get(blob, headers=alice)).read() == b"private layer"
    fetched = registry.count("GET", path_contains=secret.layer_digests[0])

    # Now cached, yet still refused to those the upstream refuses.
    assert (await client.get(blob)).status == 401
    assert (await client.get(blob, headers=basic("alice", "wrong"))).status in (401, 403)
    assert registry.count("GET", path_contains=secret.layer_digests[0]) == fetched
    # Public content needs no credentials.
    open_pull = await client.get("/v2/lib/tool/manifests/1.0")
    assert open_pull.status == 200
    assert await open_pull.read() == public.manifest_bytes


async def test_an_access_decision_is_remembered_briefly_not_asked_on_every_request(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    registry = fake_upstream.registry
    registry.auth = "bearer"
    registry.users = {"alice": "wonderland"}
    registry.private_repos = {"corp/app"}
    image = registry.add_image("corp/app", "1.0", [b"a", b"b", b"c"])
    upstream = UpstreamSettings("fake", URL(fake_upstream.url), pass_client_credentials=True)
    client = await mirror(upstreams=(upstream,))
    alice = basic("alice", "wonderland")
    for digest in image.layer_digests:
        assert (await client.get(f"/v2/corp/app/blobs/{digest}", headers=alice)).status == 200
    probes = registry.count("HEAD")
    for digest in image.layer_digests:
        assert (await client.get(f"/v2/corp/app/blobs/{digest}", headers=alice)).status == 200
    assert registry.count("HEAD") == probes
