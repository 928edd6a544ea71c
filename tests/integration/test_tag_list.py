"""Against a real Distribution 2.8: the mirror pages tag lists itself (Distribution ignores `n`
and `last`), and answers an impossible manifest name as Distribution does."""

from __future__ import annotations

import aiohttp
import pytest
from harness.images import build_image
from harness.mirror import Mirror
from harness.processes import Distribution
from harness.push import push_image

pytestmark = pytest.mark.integration

TAGS = ["1.0", "2.0", "beta", "latest", "v1"]


async def test_tags_list_n_1_pages_through_every_tag_with_link_headers(
    distribution: Distribution, mirror: Mirror, http_session: aiohttp.ClientSession, repo: str
) -> None:
    await push_image(http_session, distribution.url, repo, build_image("oci"), *TAGS)
    path = f"/v2/{repo}/tags/list"
    # The premise: this Distribution sends every tag (in no particular order) and no Link,
    # whatever n says.
    async with http_session.get(distribution.url + path, params={"n": "1"}) as upstream:
        assert sorted((await upstream.json())["tags"]) == TAGS
        assert "Link" not in upstream.headers

    seen: list[str] = []
    target = f"{path}?n=1"
    for _ in range(len(TAGS) + 1):
        async with http_session.get(mirror.url + target) as response:
            assert response.status == 200
            page = await response.json()
            link = response.headers.get("Link")
        assert page["name"] == repo
        assert len(page["tags"]) == 1
        seen += page["tags"]
        if link is None:
            break
        assert link.endswith('>; rel="next"')
        target = link.removeprefix("<").split(">", 1)[0]
        assert target.startswith(f"{path}?")
    assert seen == TAGS

    async with http_session.get(mirror.url + path, params={"n": "0"}) as empty:
        assert (await empty.json())["tags"] == []
        assert "Link" not in empty.headers
    async with http_session.get(mirror.url + path, params={"n": "2", "last": "beta"}) as middle:
        assert (await middle.json())["tags"] == ["latest", "v1"]
        assert "Link" not in middle.headers


async def test_a_manifest_name_that_cannot_exist_is_404_as_distribution_answers(
    distribution: Distribution, mirror: Mirror, http_session: aiohttp.ClientSession, repo: str
) -> None:
    await push_image(http_session, distribution.url, repo, build_image("oci"), "present")
    path = f"/v2/{repo}/manifests/.INVALID_MANIFEST_NAME"
    async with http_session.get(distribution.url + path) as upstream:
        assert upstream.status == 404
    async with http_session.get(mirror.url + path) as response:
        assert response.status == 404
        assert (await response.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
