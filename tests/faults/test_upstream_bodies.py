"""An upstream that sends documents too large to hold, and clients that invent repository names.

Manifests, tag lists, referrers indexes and token responses are read whole, so each is capped
(issue 18, finding 4): beyond the cap the mirror answers an OCI error and stops reading, judged
by how much the fake upstream managed to write before the mirror hung up, not by RSS. The token
table is keyed by scope, i.e. by names clients choose, so it is pruned and bounded (finding 5).
"""

from __future__ import annotations

import asyncio
import json

import pytest
from fakeupstream import OCI_INDEX, FakeUpstreamServer, HugeBody, Image
from harness.mirror import StartMirror

from faults.support import REPOSITORY, Outcome, fetch, oci_error_code
from proxy.server import keys as state
from proxy.upstream.auth import TokenTable
from proxy.upstream.client import DEFAULT_MAX_MANIFEST_SIZE, MAX_TAG_LIST_SIZE

MiB = 1024 * 1024
# Far more than the cap plus every buffer on the way (kernel socket buffers on loopback, aiohttp's
# read buffer): a mirror that kept reading would take all of it.
HUGE = 256 * MiB


def refusal_message(outcome: Outcome) -> str:
    """The mirror's answer to an upstream document over its cap: 502 UNAVAILABLE, saying why."""
    assert outcome.status == 502
    assert outcome.body is not None
    assert oci_error_code(outcome.body) == "UNAVAILABLE"
    return str(json.loads(outcome.body)["errors"][0]["message"])


async def assert_stopped_early(huge: HugeBody, cap: int) -> None:
    await asyncio.wait_for(huge.done.wait(), timeout=30)
    assert huge.sent < HUGE // 4, f"the upstream got {huge.sent} bytes out; the cap is {cap}"


@pytest.mark.parametrize("declare_length", [True, False], ids=["content-length", "chunked"])
async def test_a_manifest_over_the_cap_is_an_oci_error_and_the_rest_is_never_read(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image, declare_length: bool
) -> None:
    huge = HugeBody(HUGE, declare_length=declare_length)
    fake_upstream.registry.huge_bodies[f"/{REPOSITORY}/manifests/huge"] = huge
    client = await mirror()

    outcome = await fetch(client, f"/v2/{REPOSITORY}/manifests/huge")
    assert f"limit of {DEFAULT_MAX_MANIFEST_SIZE} bytes" in refusal_message(outcome)
    await assert_stopped_early(huge, DEFAULT_MAX_MANIFEST_SIZE)
    # The mirror is fine afterwards, and the refusal was counted.
    assert (await fetch(client, f"/v2/{REPOSITORY}/manifests/1.0")).status == 200
    counted = client.app[state.METRICS].registry.get_sample_value(
        "registry_proxy_upstream_errors_total",
        {"upstream": "fake", "kind": "manifest", "reason": "too_large"},
    )
    assert counted == 1


async def test_the_manifest_cap_is_a_setting(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    tight = await mirror(max_manifest_size=image.size - 1)
    refused = await fetch(tight, f"/v2/{REPOSITORY}/manifests/{image.manifest_digest}")
    refusal_message(refused)
    await tight.close()
    exact = await mirror(max_manifest_size=image.size)
    served = await fetch(exact, f"/v2/{REPOSITORY}/manifests/{image.manifest_digest}")
    assert served.status == 200
    assert served.body == image.manifest_bytes


async def test_a_tag_list_over_its_cap_is_refused_without_reading_it_all(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    huge = HugeBody(HUGE, content_type="application/json", declare_length=False)
    fake_upstream.registry.huge_bodies[f"/{REPOSITORY}/tags/list"] = huge
    client = await mirror()
    outcome = await fetch(client, f"/v2/{REPOSITORY}/tags/list")
    refusal_message(outcome)
    await assert_stopped_early(huge, MAX_TAG_LIST_SIZE)


async def test_a_referrers_index_over_the_manifest_cap_is_refused(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    huge = HugeBody(HUGE, content_type=OCI_INDEX)
    fake_upstream.registry.huge_bodies[f"/{REPOSITORY}/referrers/"] = huge
    client = await mirror()
    outcome = await fetch(client, f"/v2/{REPOSITORY}/referrers/{image.manifest_digest}")
    refusal_message(outcome)
    await assert_stopped_early(huge, DEFAULT_MAX_MANIFEST_SIZE)


async def test_a_token_response_over_its_cap_is_refused(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    fake_upstream.registry.auth = "bearer"
    huge = HugeBody(HUGE, content_type="application/json", declare_length=False)
    fake_upstream.registry.huge_bodies["/token"] = huge
    client = await mirror()
    outcome = await fetch(client, f"/v2/{REPOSITORY}/manifests/1.0")
    assert "token response" in refusal_message(outcome)
    await assert_stopped_early(huge, 1 * MiB)


# ------------------------------------------------------------------------------ token table


def test_the_token_table_forgets_expired_tokens_when_asked_for_them() -> None:
    table = TokenTable(capacity=10)
    table.put("a", "token-a", expires=100.0, now=0.0)
    assert table.get("a", now=99.0) == "token-a"
    assert table.get("a", now=100.0) is None
    assert len(table) == 0


def test_a_full_token_table_drops_expired_tokens_first_then_the_least_recently_used() -> None:
    table = TokenTable(capacity=3)
    table.put("old", "1", expires=10.0, now=0.0)
    table.put("a", "2", expires=1000.0, now=0.0)
    table.put("b", "3", expires=1000.0, now=0.0)
    assert table.get("a", now=1.0) == "2"  # "a" is now more recent than "b"
    table.put("c", "4", expires=1000.0, now=20.0)  # full: "old" has expired, so it goes
    assert len(table) == 3
    assert table.get("old", now=20.0) is None
    table.put("d", "5", expires=1000.0, now=21.0)  # full, nothing expired: "b" is least recent
    assert len(table) == 3
    assert table.get("b", now=21.0) is None
    assert [table.get(key, now=21.0) for key in ("a", "c", "d")] == ["2", "4", "5"]


async def test_clients_inventing_repository_names_cannot_grow_the_token_table(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    fake_upstream.registry.auth = "bearer"
    client = await mirror()
    upstream = client.app[state.UPSTREAMS].default
    upstream.auth.tokens.capacity = 8  # the real cap is 1024; the rule is the same
    for index in range(40):
        outcome = await fetch(client, f"/v2/invented/name-{index}/manifests/latest")
        assert outcome.status == 404
    assert len(upstream.auth.tokens) == 8
    issued = fake_upstream.registry.tokens_issued
    # The known repository still works, with a token of its own.
    assert (await fetch(client, f"/v2/{REPOSITORY}/manifests/1.0")).status == 200
    assert fake_upstream.registry.tokens_issued == issued + 1
    assert len(upstream.auth.tokens) == 8
