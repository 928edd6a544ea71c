"""Tag lists paginate with `n`, `last` and `Link` (OCI spec "Listing Tags") whatever the upstream
does: an upstream that pages is passed through, one that ignores `n` and `last` (Distribution
2.8) is paged by the mirror."""

from __future__ import annotations

import json
import re

import pytest
from fakeupstream import FakeUpstreamServer
from harness.mirror import StartMirror
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import ErrorCode, RegistryError
from proxy.server.taglist import TagQuery

TAGS = ["1.0", "1.1", "2.0", "Latest", "latest", "v1", "v2"]  # byte order: digits, upper, lower
PATH = "/v2/team/app/tags/list"


def body(tags: list[str]) -> bytes:
    return json.dumps({"name": "team/app", "tags": tags}).encode()


def next_query(link: str) -> dict[str, str]:
    match = re.fullmatch(r'<([^>]*)>; rel="next"', link)
    assert match is not None, link
    path, _, query = match.group(1).partition("?")
    assert path == PATH
    return dict(pair.split("=", 1) for pair in query.split("&"))


# --------------------------------------------------------------------------- the pure rule


@given(
    tags=st.lists(st.from_regex(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,5}", fullmatch=True), unique=True),
    n=st.integers(1, 5),
)
def test_walking_the_links_over_an_unpaged_list_yields_every_tag_once_in_byte_order(
    tags: list[str], n: int
) -> None:
    seen: list[str] = []
    query = TagQuery(n=n)
    for _ in range(len(tags) + 2):
        page = query.page(body(tags), None, PATH, None)
        chunk = json.loads(page.body)["tags"]
        assert len(chunk) <= n
        seen += chunk
        if page.link is None:
            break
        assert len(chunk) == n  # fewer than n only on the last page
        following = next_query(page.link)
        query = TagQuery(n=int(following["n"]), last=following["last"])
    assert seen == sorted(tags)


def test_n_zero_is_an_empty_list_without_a_link() -> None:
    page = TagQuery(n=0).page(body(TAGS), None, PATH, None)
    assert json.loads(page.body) == {"name": "team/app", "tags": []}
    assert page.link is None


def test_last_alone_gives_every_tag_after_it() -> None:
    page = TagQuery(last="Latest").page(body(TAGS), None, PATH, None)
    assert json.loads(page.body)["tags"] == ["latest", "v1", "v2"]
    assert page.link is None


def test_a_page_the_upstream_already_cut_is_served_as_it_came() -> None:
    upstream_page = body(["v1", "v2"])
    page = TagQuery(n=2, last="latest").page(upstream_page, None, PATH, None)
    assert page.body == upstream_page
    assert page.link is None


def test_the_upstreams_link_points_back_at_the_mirror_with_the_clients_ns() -> None:
    link = '</v2/library/app/tags/list?last=v1&n=2>; rel="next"'
    page = TagQuery(n=2).page(body(["1.0", "v1"]), link, PATH, "docker.io")
    assert page.link == f'<{PATH}?last=v1&n=2&ns=docker.io>; rel="next"'


def test_a_list_already_in_order_is_passed_through_byte_exact() -> None:
    raw = b'{"name":"team/app","tags":["a","b"]}'
    assert TagQuery().page(raw, None, PATH, None).body == raw
    assert TagQuery(n=5).page(raw, None, PATH, None).body == raw


def test_a_list_in_directory_order_is_served_in_lexical_order() -> None:
    """Distribution 2.8 lists tags in the order its storage driver finds them."""
    page = TagQuery().page(body(["v1", "1.0", "latest"]), None, PATH, None)
    assert json.loads(page.body)["tags"] == ["1.0", "latest", "v1"]


def test_without_pagination_a_body_that_is_not_a_tag_list_is_left_alone() -> None:
    assert TagQuery().page(b"odd", None, PATH, None).body == b"odd"


@pytest.mark.parametrize("raw", [b"not json", b"[]", b'{"tags": "x"}', b'{"tags": [1]}'])
def test_an_invalid_upstream_tag_list_is_an_oci_error_when_it_must_be_paged(raw: bytes) -> None:
    with pytest.raises(RegistryError) as raised:
        TagQuery(n=1).page(raw, None, PATH, None)
    assert raised.value.code is ErrorCode.UNAVAILABLE


@pytest.mark.parametrize("n", ["-1", "x", "1.5", "\u0661"])  # the last: an Arabic-Indic 1
def test_n_must_be_a_plain_number(n: str) -> None:
    with pytest.raises(RegistryError) as raised:
        TagQuery.parse({"n": n})
    assert raised.value.status == 400


# ------------------------------------------------------------------ through the mirror


@pytest.mark.parametrize("ignores", [False, True], ids=["upstream-pages", "upstream-ignores-n"])
async def test_n_1_walks_every_tag_through_link_headers_whatever_the_upstream_does(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, ignores: bool
) -> None:
    fake_upstream.registry.ignore_pagination = ignores
    for tag in TAGS:
        fake_upstream.registry.add_image("team/app", tag, [tag.encode()])
    client = await mirror()
    seen: list[str] = []
    url = f"{PATH}?n=1"
    for _ in range(len(TAGS) + 1):
        response = await client.get(url)
        assert response.status == 200
        tags = (await response.json())["tags"]
        assert len(tags) == 1
        seen += tags
        link = response.headers.get("Link")
        if link is None:
            break
        url = link.removeprefix("<").split(">", 1)[0]
        assert url.startswith(f"{PATH}?")
    assert seen == sorted(TAGS)


async def test_n_0_and_last_through_an_upstream_that_ignores_them(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    fake_upstream.registry.ignore_pagination = True
    for tag in TAGS:
        fake_upstream.registry.add_image("team/app", tag, [tag.encode()])
    client = await mirror()
    empty = await client.get(PATH, params={"n": "0"})
    assert (await empty.json())["tags"] == []
    assert "Link" not in empty.headers
    rest = await client.get(PATH, params={"last": "v1"})
    assert (await rest.json())["tags"] == ["v2"]
    assert "Link" not in rest.headers
    everything = await client.get(PATH)
    assert (await everything.json())["tags"] == sorted(TAGS)


async def test_the_next_link_keeps_the_clients_route_to_its_upstream(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    fake_upstream.registry.ignore_pagination = True
    for tag in TAGS:
        fake_upstream.registry.add_image("team/app", tag, [tag.encode()])
    client = await mirror()
    # containerd's ?ns= and a podman-style path prefix both name the upstream "fake".
    by_ns = await client.get(PATH, params={"n": "2", "ns": "fake"})
    assert by_ns.headers["Link"] == f'<{PATH}?last=1.1&n=2&ns=fake>; rel="next"'
    by_prefix = await client.get("/v2/fake/team/app/tags/list", params={"n": "2"})
    assert by_prefix.headers["Link"] == '</v2/fake/team/app/tags/list?last=1.1&n=2>; rel="next"'
