"""SSRF through `allow_any_registry`: a client picks the registry host with `?ns=`, so it must
not be able to make the mirror connect to loopback, private or link-local addresses, directly,
by DNS, through a redirect or through a token realm, nor learn from error bodies which internal
ports are open (issue 18, finding 2)."""

from __future__ import annotations

import logging
from ipaddress import ip_address
from typing import Any

import pytest
from harness.ports import free_port

from proxy.upstream.egress import is_public, is_public_registry_name
from security.conftest import SECRET, DynamicMirror, HostileRegistry, InternalService


async def error_of(response: Any) -> tuple[int, str, str]:
    body = await response.read()
    assert SECRET not in body
    error = (await response.json())["errors"][0]
    return response.status, error["code"], error["message"]


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "registry.localhost", "2130706433", "0x7f000001", "127.1",
     "10.0.0.1", "169.254.169.254", "0.0.0.0", "internal"],
)  # fmt: skip
async def test_ns_naming_an_address_or_a_local_name_is_refused_without_connecting(
    dynamic_mirror: DynamicMirror, internal: InternalService, host: str
) -> None:
    client = await dynamic_mirror()
    response = await client.get(f"/v2/x/tags/list?ns={host}:{internal.port}")
    assert (await error_of(response))[:2] == (404, "NAME_UNKNOWN")
    assert internal.connections == 0


async def test_a_name_that_resolves_to_loopback_is_refused_at_connect_time(
    dynamic_mirror: DynamicMirror, internal: InternalService
) -> None:
    client = await dynamic_mirror()
    response = await client.get(f"/v2/x/tags/list?ns=internal.test:{internal.port}")
    assert (await error_of(response))[:2] == (502, "UNAVAILABLE")
    assert internal.connections == 0


async def test_a_public_registry_is_still_mirrored_on_demand(
    dynamic_mirror: DynamicMirror, hostile: HostileRegistry
) -> None:
    client = await dynamic_mirror()
    response = await client.get(f"/v2/x/tags/list?ns={hostile.name}")
    assert response.status == 200
    assert await response.json() == {"name": "x", "tags": []}


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{port}/latest/meta-data/",  # an address literal, and plain http
        "https://metadata.test:{port}/latest/meta-data/",  # a name resolving to loopback
        "http://localhost:{port}/",
    ],
)
async def test_a_redirect_to_an_internal_address_is_not_followed(
    dynamic_mirror: DynamicMirror,
    hostile: HostileRegistry,
    internal: InternalService,
    target: str,
) -> None:
    hostile.redirect_to = target.format(port=internal.port)
    client = await dynamic_mirror()
    for path in ("/v2/x/tags/list", "/v2/x/manifests/latest"):
        response = await client.get(f"{path}?ns={hostile.name}")
        assert (await error_of(response))[:2] == (502, "UNAVAILABLE")
    assert internal.connections == 0


async def test_an_https_registry_cannot_redirect_to_plain_http(
    dynamic_mirror: DynamicMirror, hostile: HostileRegistry, internal: InternalService
) -> None:
    # Even to an address the policy allows: a downgrade hands the path (and a pre-signed
    # URL's signature) to anyone on the way.
    hostile.redirect_to = f"http://hostile.test:{internal.port}/v2/x/tags/list"
    client = await dynamic_mirror(internal.port)
    response = await client.get(f"/v2/x/tags/list?ns={hostile.name}")
    assert (await error_of(response))[:2] == (502, "UNAVAILABLE")
    assert internal.connections == 0


@pytest.mark.parametrize(
    "realm", ["http://127.0.0.1:{port}/token", "https://internal.test:{port}/token"]
)
async def test_a_token_realm_on_an_internal_address_is_not_contacted(
    dynamic_mirror: DynamicMirror,
    hostile: HostileRegistry,
    internal: InternalService,
    realm: str,
) -> None:
    hostile.realm = realm.format(port=internal.port)
    client = await dynamic_mirror()
    response = await client.get(f"/v2/x/tags/list?ns={hostile.name}")
    status, _, _ = await error_of(response)
    assert status in (401, 502)
    assert internal.connections == 0


async def test_error_bodies_do_not_tell_open_from_closed_ports_and_the_log_has_the_details(
    dynamic_mirror: DynamicMirror,
    internal: InternalService,
    caplog: pytest.LogCaptureFixture,
) -> None:
    closed = free_port()
    # Both ports count as public here, so the mirror really tries them: one listens (and
    # speaks no TLS), the other refuses the connection.
    client = await dynamic_mirror(internal.port, closed)
    messages = []
    with caplog.at_level(logging.WARNING):
        for port in (internal.port, closed):
            ns = f"internal.test:{port}"
            status, code, message = await error_of(
                await client.get(f"/v2/x/manifests/latest?ns={ns}")
            )
            messages.append((status, code, message.replace(ns, "NS")))
    assert messages[0] == messages[1]
    assert str(closed) in caplog.text  # the operator still learns what went wrong


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True), ("2606:4700::1111", True),
        ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.0.1", False),
        ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False),
        ("224.0.0.1", False), ("::1", False), ("::", False), ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False), ("::ffff:8.8.8.8", True),  # IPv4-mapped
        ("2002:7f00:1::", False), ("2002:808:808::", True),  # 6to4
        ("64:ff9b::a9fe:a9fe", False), ("64:ff9b::808:808", True),  # NAT64, RFC 6052
    ],
)  # fmt: skip
def test_only_globally_routable_unicast_addresses_are_public(address: str, public: bool) -> None:
    assert is_public(ip_address(address)) is public


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("ghcr.io", True), ("registry.k8s.io", True), ("quay.io:443", True),
        ("1password.com", True),
        ("127.0.0.1", False), ("0177.0.0.1", False), ("0x7f.0x0.0x0.0x1", False),
        ("localhost", False), ("a.localhost:5000", False), ("redis:6379", False),
    ],
)  # fmt: skip
def test_ns_names_that_are_addresses_or_local_are_not_registry_names(
    host: str, allowed: bool
) -> None:
    assert is_public_registry_name(host) is allowed
