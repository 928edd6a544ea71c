"""The images a run pulls, generated and pushed into the upstream registry.

- ``small``: a multi-arch OCI index (amd64, arm64) of a few MB per platform;
- ``medium``: one image of about 100 MB in 5 gzip layers;
- ``wide``: one image of about 120 MB in 10 gzip layers of 8 to 16 MiB, for pulls whose time is
  spent fetching many blobs a few at a time (prefetch);
- ``large``: one image whose single layer is 1 GiB, an uncompressed tar written straight to
  disk and streamed up, so generating it costs neither memory nor a gzip pass.

Layers are random bytes, so no compression anywhere on the path can make them cheaper.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from integration.registry import (
    OCI_CONFIG,
    OCI_MANIFEST,
    Blob,
    ImageIndex,
    PushError,
    build_image,
    build_index,
    push_blob,
    push_image,
    push_index,
    push_manifest,
    sha256_digest,
)
from yarl import URL

OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MIB = 1024 * 1024
TAG = "bench"


@dataclass(frozen=True)
class Sizes:
    small_layers: tuple[int, ...]
    medium_layers: tuple[int, ...]
    large_layer: int
    wide_layers: tuple[int, ...]

    @classmethod
    def full(cls, large_mib: int = 1024) -> Sizes:
        wide = tuple(mib * MIB for mib in (16, 8, 12, 10, 14, 9, 15, 11, 13, 8))
        return cls((512 * 1024, 1 * MIB, 2 * MIB), (20 * MIB,) * 5, large_mib * MIB, wide)

    @classmethod
    def quick(cls) -> Sizes:
        # Big enough that HTTP framing stays under 0.5 % of the bytes the relay counts.
        wide = tuple(kib * 1024 for kib in (256, 128, 192, 160, 224, 144, 240, 176, 208, 128))
        return cls((16 * 1024, 32 * 1024), (64 * 1024,) * 5, 4 * MIB, wide)


@dataclass(frozen=True)
class PushedImage:
    """What a pull of ``repo:tag`` (platform amd64) fetches, and how many bytes that is."""

    name: str
    repo: str
    tag: str
    tag_digest: str  # what the tag points at (an index for ``small``)
    manifest_digest: str  # the platform manifest
    blobs: tuple[tuple[str, int], ...]  # (digest, size) of config and layers
    pull_bytes: int  # manifests + blobs of one pull

    @property
    def largest_blob(self) -> tuple[str, int]:
        return max(self.blobs, key=lambda blob: blob[1])


@dataclass(frozen=True)
class Fixtures:
    small: PushedImage
    medium: PushedImage
    large: PushedImage
    wide: PushedImage

    def summary(self) -> dict[str, int]:
        images = (self.small, self.medium, self.large, self.wide)
        return {image.name: image.pull_bytes for image in images}


async def push_fixtures(base_url: str, sizes: Sizes, workdir: Path) -> Fixtures:
    timeout = aiohttp.ClientTimeout(total=1800, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        index = build_index(layer_sizes=sizes.small_layers)
        await push_index(session, base_url, "bench/small", index, TAG)
        medium = build_image(layer_sizes=sizes.medium_layers)
        await push_image(session, base_url, "bench/medium", medium, TAG)
        large = await _push_large(session, base_url, "bench/large", sizes.large_layer, workdir)
        wide = build_image(layer_sizes=sizes.wide_layers)
        await push_image(session, base_url, "bench/wide", wide, TAG)
    return Fixtures(
        _small(index),
        _pushed("medium", "bench/medium", medium.manifest, _blobs((medium.config, *medium.layers))),
        large,
        _pushed("wide", "bench/wide", wide.manifest, _blobs((wide.config, *wide.layers))),
    )


def _blobs(blobs: tuple[Blob, ...]) -> tuple[tuple[str, int], ...]:
    return tuple((blob.digest, len(blob.data)) for blob in blobs)


def _pushed(
    name: str,
    repo: str,
    manifest: bytes,
    blobs: tuple[tuple[str, int], ...],
    index: bytes | None = None,
) -> PushedImage:
    top = index if index is not None else manifest
    return PushedImage(
        name=name,
        repo=repo,
        tag=TAG,
        tag_digest=sha256_digest(top),
        manifest_digest=sha256_digest(manifest),
        blobs=blobs,
        pull_bytes=len(manifest) + (len(index) if index else 0) + sum(s for _, s in blobs),
    )


def _small(index: ImageIndex) -> PushedImage:
    image = index.image_for("amd64")
    return _pushed(
        "small", "bench/small", image.manifest, _blobs(image.blobs), index=index.manifest
    )


class _RandomReader:
    """A file-like source of random bytes for tarfile to copy from."""

    def read(self, size: int = -1) -> bytes:
        return os.urandom(size)


def _write_tar_layer(path: Path, size: int) -> tuple[str, int]:
    hasher = hashlib.sha256()
    with (
        path.open("wb") as raw,
        tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        info = tarfile.TarInfo("data/large.bin")
        info.size = size
        info.mode = 0o644
        tar.addfile(info, _RandomReader())
    with path.open("rb") as done:
        while chunk := done.read(8 * MIB):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest(), path.stat().st_size


async def _push_file_blob(
    session: aiohttp.ClientSession, base_url: str, repo: str, path: Path, digest: str
) -> None:
    """The monolithic upload of ``push_blob``, streaming the body from a file."""
    start = URL(base_url) / "v2" / repo / "blobs" / "uploads" / ""
    async with session.post(start) as response:
        if response.status != 202:
            raise PushError(f"POST {start}: {response.status}")
        location = response.headers["Location"]
    upload = URL(base_url).join(URL(location)).update_query({"digest": digest})
    with path.open("rb") as body:
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(os.fstat(body.fileno()).st_size),
        }
        async with session.put(upload, data=body, headers=headers) as response:
            if response.status != 201:
                raise PushError(f"PUT {upload}: {response.status} {await response.text()}")


async def _push_large(
    session: aiohttp.ClientSession, base_url: str, repo: str, size: int, workdir: Path
) -> PushedImage:
    path = workdir / "large-layer.tar"
    digest, length = _write_tar_layer(path, size)
    await _push_file_blob(session, base_url, repo, path, digest)
    path.unlink()
    config_body = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [digest]},  # uncompressed: diff_id = digest
        }
    ).encode()
    config = await push_blob(session, base_url, repo, config_body)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "size": len(config_body), "digest": config},
            "layers": [{"mediaType": OCI_LAYER_TAR, "size": length, "digest": digest}],
        },
        indent=3,
    ).encode()
    for ref in (sha256_digest(manifest), TAG):
        await push_manifest(session, base_url, repo, ref, manifest, OCI_MANIFEST)
    return _pushed("large", repo, manifest, ((config, len(config_body)), (digest, length)))
