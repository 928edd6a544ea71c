"""Credentials of one kind never go to another place (issue 18.6).

- The mirror's own users' passwords (`auth_htpasswd`, `auth_tokens_file`) must never be
  forwarded upstream, so that setting together with `pass_client_credentials` is refused at
  start-up with one line.
- The upstream credentials the mirror holds go only to a token realm on the upstream's own host
  (or one configured for it), and never over plain http unless the upstream itself is http.
"""

from __future__ import annotations

from pathlib import Path

import bcrypt
import pytest
from fakeupstream import ACCEPT_ALL_MANIFESTS, FakeUpstreamServer
from harness.mirror import StartMirror
from yarl import URL

from proxy.config import ConfigError, Secret, UpstreamSettings
from proxy.config.load import load_settings
from proxy.upstream.client import Upstream


def test_htpasswd_with_pass_through_credentials_is_refused_at_start_up(tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{bcrypt.hashpw(b'pw', bcrypt.gensalt(rounds=4)).decode()}\n")
    tokens = tmp_path / "tokens"
    tokens.write_text("ci s3cr3t\n")
    config = tmp_path / "config.toml"
    config.write_text(
        '[[upstreams]]\nname = "corp"\nurl = "https://corp.example"\n'
        "pass_client_credentials = true\n"
    )
    for setting, path in (("auth_htpasswd", htpasswd), ("auth_tokens_file", tokens)):
        with pytest.raises(ConfigError) as refused:
            load_settings(config, environ={}, flags={setting: str(path)})
        message = str(refused.value)
        assert "pass_client_credentials" in message
        assert setting in message
        assert "\n" not in message


async def test_configured_credentials_never_go_to_a_token_realm_on_another_host(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, fake_cdn: FakeUpstreamServer
) -> None:
    registry = fake_upstream.registry
    registry.auth = "bearer"
    registry.token_realm = f"{fake_cdn.url.replace('127.0.0.1', 'localhost')}/token"
    registry.add_image("team/app", "1.0", [b"layer"])
    upstream = UpstreamSettings(
        "fake", URL(fake_upstream.url), username="mirror", password=Secret("hunter2")
    )
    client = await mirror(upstreams=(upstream,))

    await client.get("/v2/team/app/manifests/1.0", headers={"Accept": ACCEPT_ALL_MANIFESTS})

    token_requests = [r for r in fake_cdn.registry.requests if r.path == "/token"]
    assert token_requests, "the mirror asked the realm for a token"
    assert all(r.get("Authorization") is None for r in token_requests)


async def test_configured_credentials_go_to_a_token_realm_on_the_upstreams_host(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    registry = fake_upstream.registry
    registry.auth = "bearer"
    registry.users = {"mirror": "hunter2"}
    registry.private_repos = {"team/app"}
    image = registry.add_image("team/app", "1.0", [b"layer"])
    upstream = UpstreamSettings(
        "fake", URL(fake_upstream.url), username="mirror", password=Secret("hunter2")
    )
    client = await mirror(upstreams=(upstream,))

    response = await client.get(
        "/v2/team/app/manifests/1.0", headers={"Accept": ACCEPT_ALL_MANIFESTS}
    )

    assert response.status == 200
    assert await response.read() == image.manifest_bytes


@pytest.mark.parametrize(
    ("upstream", "realm", "allowed"),
    [
        ("https://registry.example", "https://registry.example/token", True),
        ("https://registry.example", "https://registry.example:8443/token", True),
        ("https://registry.example", "http://registry.example/token", False),
        ("https://registry.example", "https://auth.elsewhere.example/token", False),
        ("https://registry.example", "https://169.254.169.254/latest", False),
        ("http://registry.lan:5000", "http://registry.lan:5000/token", True),
        ("https://registry-1.docker.io", "https://auth.docker.io/token", True),
        ("https://registry-1.docker.io", "http://auth.docker.io/token", False),
        ("https://gitlab-registry.example", "https://gitlab.example/jwt/auth", True),
    ],
)
def test_which_token_realms_receive_the_configured_credentials(
    upstream: str, realm: str, allowed: bool
) -> None:
    settings = UpstreamSettings(
        "x",
        URL(upstream),
        username="u",
        password=Secret("p"),
        token_realm_hosts=("gitlab.example",),
    )
    assert Upstream(settings).auth.may_send_credentials_to(URL(realm)) is allowed


def test_token_realm_hosts_is_an_upstream_setting(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[[upstreams]]\nname = "registry.gitlab.example"\n'
        'url = "https://registry.gitlab.example"\ntoken_realm_hosts = ["gitlab.example"]\n'
    )
    settings = load_settings(config, environ={})
    assert settings.upstreams[0].token_realm_hosts == ("gitlab.example",)
    config.write_text(
        '[[upstreams]]\nname = "x"\nurl = "https://x.example"\ntoken_realm_hosts = "x"\n'
    )
    with pytest.raises(ConfigError, match="token_realm_hosts"):
        load_settings(config, environ={})
