"""skopeo pulls through the mirror from a real Distribution registry, byte for byte.

Each pull lands in a ``dir:`` layout; every file there must hash to its digest, the blob set must be
exactly the pushed image's, and ``manifest.json`` must be the pushed manifest's bytes.
"""

from __future__ import annotations

import asyncio
import platform
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import pytest
from harness.digests import sha256_digest
from harness.images import (
    LARGE_LAYERS,
    SMALL_LAYERS,
    Format,
    Image,
    ImageIndex,
    build_image,
    build_index,
)
from harness.mirror import Mirror, MirrorProcesses
from harness.processes import Distribution
from harness.push import push_image, push_index
from harness.skopeo import SkopeoError, skopeo_copy
from harness.verify import DIR_MANIFEST, blob_digests, verify_dir

pytestmark = pytest.mark.integration

HOST_ARCHITECTURES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


async def pull(src: str, dest: Path, *extra: str) -> dict[str, str]:
    """skopeo copy in a worker thread (it blocks), then verify the output."""
    await asyncio.to_thread(skopeo_copy, src, dest, *extra)
    return verify_dir(dest)


def assert_pulled_image(found: dict[str, str], dest: Path, image: Image) -> None:
    assert (dest / DIR_MANIFEST).read_bytes() == image.manifest
    assert found[DIR_MANIFEST] == image.digest
    assert blob_digests(found) == image.blob_digests


def default_architecture() -> tuple[str, tuple[str, ...]]:
    """The architecture skopeo picks from an index on this machine, and the flags that make it so.

    On a machine that is neither amd64 nor arm64, ask for amd64 explicitly.
    """
    arch = HOST_ARCHITECTURES.get(platform.machine().lower())
    if arch is None:
        return "amd64", ("--override-arch", "amd64")
    return arch, ()


async def test_images_pushed_to_distribution_pull_with_skopeo(
    distribution: Distribution, http_session: aiohttp.ClientSession, repo: str, tmp_path: Path
) -> None:
    """The harness itself: generated images are valid for Distribution and a real client."""
    image = build_image("docker")
    index = build_index("oci")
    await push_image(http_session, distribution.url, repo, image, "single")
    await push_index(http_session, distribution.url, repo, index, "multi")

    found = await pull(f"{distribution.host}/{repo}:single", tmp_path / "single")
    assert_pulled_image(found, tmp_path / "single", image)

    dest = tmp_path / "all"
    found = await pull(f"{distribution.host}/{repo}:multi", dest, "--multi-arch", "all")
    assert (dest / DIR_MANIFEST).read_bytes() == index.manifest
    assert blob_digests(found) == index.blob_digests
    for child in index.images:
        assert (dest / f"{child.digest.removeprefix('sha256:')}.manifest.json").read_bytes() == (
            child.manifest
        )


@pytest.mark.parametrize("layer_sizes", [SMALL_LAYERS, LARGE_LAYERS], ids=["small", "large"])
@pytest.mark.parametrize("fmt", ["oci", "docker"])
async def test_skopeo_pulls_a_multi_layer_image_by_tag_through_the_mirror(
    distribution: Distribution,
    mirror: Mirror,
    http_session: aiohttp.ClientSession,
    repo: str,
    tmp_path: Path,
    fmt: Format,
    layer_sizes: Sequence[int],
) -> None:
    image = build_image(fmt, layer_sizes=layer_sizes)
    await push_image(http_session, distribution.url, repo, image, "v1")

    # The first pull fills the cache, the second is served from it: both must be exact.
    for attempt in ("cold", "warm"):
        dest = tmp_path / attempt
        found = await pull(f"{mirror.host}/{repo}:v1", dest)
        assert_pulled_image(found, dest, image)


async def test_skopeo_pulls_at_once_through_two_workers_are_exact(
    distribution: Distribution,
    mirror_factory: MirrorProcesses,
    http_session: aiohttp.ClientSession,
    repo: str,
    tmp_path: Path,
) -> None:
    """Cold pulls spread over two workers: each client gets the blobs the other worker owns
    from the owner's download as it lands (sent from its file), or from the shared directory."""
    image = build_image("oci", layer_sizes=(4 * 1024 * 1024, 6 * 1024 * 1024, 256 * 1024))
    await push_image(http_session, distribution.url, repo, image, "v1")
    mirror = mirror_factory("--workers", "2", "--log-level", "info")
    dests = [tmp_path / f"pull-{n}" for n in range(4)]
    pulled = await asyncio.gather(*(pull(f"{mirror.host}/{repo}:v1", dest) for dest in dests))
    for found, dest in zip(pulled, dests, strict=True):
        assert_pulled_image(found, dest, image)
    async with http_session.get(f"{mirror.url}/metrics") as answer:
        metrics = await answer.text()
    assert 'registry_proxy_aborted_responses_total{cause="upstream"} 0.0' in metrics
    assert 'registry_proxy_aborted_responses_total{cause="mirror"} 0.0' in metrics


@pytest.mark.parametrize("variant", ["default-arch", "arm64", "all"])
async def test_skopeo_pulls_an_oci_index_by_tag_through_the_mirror(
    distribution: Distribution,
    mirror: Mirror,
    http_session: aiohttp.ClientSession,
    repo: str,
    tmp_path: Path,
    variant: str,
) -> None:
    index = build_index("oci")
    await push_index(http_session, distribution.url, repo, index, "multi")
    await assert_index_pull(f"{mirror.host}/{repo}:multi", tmp_path / "out", index, variant)


@pytest.mark.parametrize("variant", ["default-arch", "arm64", "all"])
async def test_skopeo_pulls_a_docker_manifest_list_by_tag_through_the_mirror(
    distribution: Distribution,
    mirror: Mirror,
    http_session: aiohttp.ClientSession,
    repo: str,
    tmp_path: Path,
    variant: str,
) -> None:
    index = build_index("docker")
    await push_index(http_session, distribution.url, repo, index, "multi")
    await assert_index_pull(f"{mirror.host}/{repo}:multi", tmp_path / "out", index, variant)


async def assert_index_pull(src: str, dest: Path, index: ImageIndex, variant: str) -> None:
    if variant == "all":
        found = await pull(src, dest, "--multi-arch", "all")
        assert (dest / DIR_MANIFEST).read_bytes() == index.manifest
        assert found[DIR_MANIFEST] == index.digest
        assert blob_digests(found) == index.blob_digests
        for child in index.images:
            name = f"{child.digest.removeprefix('sha256:')}.manifest.json"
            assert (dest / name).read_bytes() == child.manifest
        return
    flags: tuple[str, ...]
    if variant == "arm64":
        arch, flags = "arm64", ("--override-arch", "arm64")
    else:
        arch, flags = default_architecture()
    found = await pull(src, dest, *flags)
    assert_pulled_image(found, dest, index.image_for(arch))


@pytest.mark.parametrize("kind", ["image", "index"])
async def test_skopeo_pulls_by_digest_through_the_mirror(
    distribution: Distribution,
    mirror: Mirror,
    http_session: aiohttp.ClientSession,
    repo: str,
    tmp_path: Path,
    kind: str,
) -> None:
    dest = tmp_path / "out"
    if kind == "image":
        image = build_image("oci")
        # Pushed by digest only: no tag points at it, so the mirror must fetch it by digest.
        await push_image(http_session, distribution.url, repo, image)
        found = await pull(f"{mirror.host}/{repo}@{image.digest}", dest)
        assert_pulled_image(found, dest, image)
    else:
        index = build_index("docker")
        await push_index(http_session, distribution.url, repo, index)
        await assert_index_pull(f"{mirror.host}/{repo}@{index.digest}", dest, index, "all")


async def test_skopeo_pull_of_a_missing_tag_fails(
    distribution: Distribution,
    mirror: Mirror,
    http_session: aiohttp.ClientSession,
    repo: str,
    tmp_path: Path,
) -> None:
    await push_image(http_session, distribution.url, repo, build_image("oci"), "present")
    with pytest.raises(SkopeoError) as failure:
        await pull(f"{mirror.host}/{repo}:absent", tmp_path / "out")
    assert "manifest unknown" in failure.value.stderr.lower()


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v2/UPPER/manifests/x", 400, "NAME_INVALID"),
        ("HEAD", "/v2/UPPER/manifests/x", 400, None),
        ("GET", "/v2/{repo}/manifests/absent", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/{repo}/blobs/" + sha256_digest(b"never pushed"), 404, "BLOB_UNKNOWN"),
        ("PUT", "/v2/{repo}/manifests/x", 405, "UNSUPPORTED"),
        ("POST", "/v2/{repo}/blobs/uploads/", 405, "UNSUPPORTED"),
        ("DELETE", "/v2/{repo}/manifests/" + sha256_digest(b"x"), 405, "UNSUPPORTED"),
    ],
    ids=[
        "upper-case-name",
        "upper-case-name-head",
        "missing-manifest",
        "missing-blob",
        "put-manifest",
        "start-upload",
        "delete-manifest",
    ],
)
async def test_mirror_answers_bad_requests_with_oci_errors(
    distribution: Distribution,
    mirror: Mirror,
    http_session: aiohttp.ClientSession,
    repo: str,
    method: str,
    path: str,
    status: int,
    code: str | None,
) -> None:
    await push_image(http_session, distribution.url, repo, build_image("oci"), "present")
    url = mirror.url + path.format(repo=repo)
    body = b"{}" if method in ("PUT", "POST") else None
    async with http_session.request(method, url, data=body) as response:
        assert response.status == status
        assert response.headers.get("Docker-Distribution-API-Version") == "registry/2.0"
        if code is None:  # HEAD: the status alone, no body.
            return
        assert response.content_type == "application/json"
        document = await response.json()
    errors = document["errors"]
    assert isinstance(errors, list)
    assert errors
    assert errors[0]["code"] == code
    assert isinstance(errors[0]["message"], str)
