"""Passing clients' own credentials on: the mirror challenges where real clients look.

skopeo, podman and dockerd decide from `GET /v2/` whether to send credentials; containerd
reacts to a 401 on the resource. A Bearer challenge naming the mirror's `/auth/token` lets both
kinds send credentials, and lets clients without any carry on anonymously (REFERENCE.md, "Who
sends credentials when"; dockerd gives up on an anonymous Basic challenge).
"""

from __future__ import annotations

import base64

import pytest
from fakeupstream import ACCEPT_ALL_MANIFESTS, FakeUpstreamServer, Image
from harness.mirror import StartMirror
from yarl import URL

from proxy.config import UpstreamSettings
from proxy.server.passthrough import client_credentials


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def private(fake_upstream: FakeUpstreamServer) -> tuple[Image, Image]:
    registry = fake_upstream.registry
    registry.auth = "bearer"
    registry.users = {"alice": "wonderland"}
    registry.private_repos = {"corp/app"}
    return (
        registry.add_image("corp/app", "1.0", [b"private layer"]),
        registry.add_image("lib/tool", "1.0", [b"public layer"]),
    )


def passing(server: FakeUpstreamServer) -> UpstreamSettings:
    return UpstreamSettings("fake", URL(server.url), pass_client_credentials=True)


async def test_the_ping_challenges_anonymous_clients_and_welcomes_any_credentials(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    client = await mirror(upstreams=(passing(fake_upstream),))
    ping = await client.get("/v2/")
    assert ping.status == 401
    realm = client.make_url("/auth/token")
    assert ping.headers["WWW-Authenticate"] == f'Bearer realm="{realm}",service="registry-proxy"'
    assert (await ping.json())["errors"][0]["code"] == "UNAUTHORIZED"
    for authorization in (basic("alice", "wonderland"), "Bearer rp1."):
        assert (await client.get("/v2/", headers={"Authorization": authorization})).status == 200


async def test_without_pass_through_upstreams_the_ping_needs_nothing(
    mirror: StartMirror,
) -> None:
    client = await mirror()
    assert (await client.get("/v2/")).status == 200
    assert (await client.get("/auth/token")).status == 404


async def test_a_token_from_the_mirror_carries_the_clients_credentials_upstream(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, private: tuple[Image, Image]
) -> None:
    secret, _ = private
    client = await mirror(upstreams=(passing(fake_upstream),))
    # Docker and containers/image: GET with Basic credentials.
    got = await client.get(
        "/auth/token",
        params={"service": "registry-proxy", "scope": "repository:corp/app:pull"},
        headers={"Authorization": basic("alice", "wonderland")},
    )
    # containerd: the OAuth2 password grant.
    posted = await client.post(
        "/auth/token",
        data={"grant_type": "password", "username": "alice", "password": "wonderland",
              "service": "registry-proxy", "client_id": "containerd-client"},
    )  # fmt: skip
    for answer in (got, posted):
        assert answer.status == 200
        document = await answer.json()
        assert document["token"] == document["access_token"]
        assert document["expires_in"] > 0
        pulled = await client.get(
            "/v2/corp/app/manifests/1.0",
            headers={
                "Authorization": f"Bearer {document['token']}",
                "Accept": ACCEPT_ALL_MANIFESTS,
            },
        )
        assert pulled.status == 200
        assert await pulled.read() == secret.manifest_bytes


async def test_anonymous_clients_pull_public_content_and_get_a_challenge_for_private(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, private: tuple[Image, Image]
) -> None:
    secret, public = private
    client = await mirror(upstreams=(passing(fake_upstream),))
    anonymous_token = (await (await client.get("/auth/token")).json())["token"]
    for authorization in (None, "Basic Og==", f"Bearer {anonymous_token}"):
        headers = {"Accept": ACCEPT_ALL_MANIFESTS}
        if authorization is not None:
            headers["Authorization"] = authorization
        tool = await client.get("/v2/lib/tool/manifests/1.0", headers=headers)
        assert tool.status == 200, authorization
        assert await tool.read() == public.manifest_bytes
        refused = await client.get("/v2/corp/app/manifests/1.0", headers=headers)
        assert refused.status == 401, authorization
        assert refused.headers["WWW-Authenticate"].startswith("Bearer realm=")
    wrong = await client.get(
        f"/v2/corp/app/blobs/{secret.layer_digests[0]}",
        headers={"Authorization": basic("alice", "guess")},
    )
    assert wrong.status == 401


def test_client_credentials_are_read_from_basic_and_from_the_mirrors_tokens() -> None:
    alice = basic("alice", "wonderland")
    token = "rp1." + base64.urlsafe_b64encode(b"alice:wonderland").decode().rstrip("=")
    assert client_credentials(alice) == alice
    assert client_credentials(f"Bearer {token}") == alice
    for anonymous in (None, "", "Basic Og==", "Bearer rp1.", "Bearer someone-elses", "Basic !!"):
        assert client_credentials(anonymous) is None, anonymous
