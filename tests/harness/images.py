"""Images built in memory, exactly as they will be pushed.

:func:`build_image` / :func:`build_index` make real images: gzip-compressed tar layers of random
files, a config whose ``rootfs.diff_ids`` are the digests of the uncompressed tars, and an OCI or
Docker schema 2 manifest (or an OCI index / Docker manifest list over two platforms).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from harness.digests import sha256_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

Format = Literal["oci", "docker"]

# Layer sizes (uncompressed random bytes per layer). Random data does not compress, so the blob
# sizes on the wire are about the same.
SMALL_LAYERS: tuple[int, ...] = (64 * 1024, 128 * 1024, 192 * 1024)
LARGE_LAYERS: tuple[int, ...] = (256 * 1024, 3 * 1024 * 1024, 1024 * 1024)


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes
    digest: str

    @classmethod
    def of(cls, media_type: str, data: bytes) -> Blob:
        return cls(media_type, data, sha256_digest(data))

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "size": len(self.data), "digest": self.digest}


@dataclass(frozen=True)
class Image:
    """One image manifest with its config and layers, exactly as it will be pushed."""

    media_type: str
    manifest: bytes
    digest: str
    config: Blob
    layers: tuple[Blob, ...]
    architecture: str
    os: str = "linux"

    @property
    def blobs(self) -> tuple[Blob, ...]:
        return (self.config, *self.layers)

    @property
    def blob_digests(self) -> frozenset[str]:
        return frozenset(blob.digest for blob in self.blobs)


@dataclass(frozen=True)
class ImageIndex:
    """An OCI index or Docker manifest list over several :class:`Image` s."""

    media_type: str
    manifest: bytes
    digest: str
    images: tuple[Image, ...]

    def image_for(self, architecture: str) -> Image:
        for image in self.images:
            if image.architecture == architecture:
                return image
        raise KeyError(architecture)

    @property
    def blob_digests(self) -> frozenset[str]:
        return frozenset(d for image in self.images for d in image.blob_digests)


def make_layer(size: int, *, files: int = 3) -> tuple[bytes, bytes]:
    """A gzip-compressed tar of ``files`` random files totalling about ``size`` bytes.

    Returns ``(compressed, uncompressed)``. The content is random so no two layers are equal.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directory = tarfile.TarInfo(f"data-{os.urandom(4).hex()}")
        directory.type = tarfile.DIRTYPE
        directory.mode = 0o755
        tar.addfile(directory)
        remaining = size
        for index in range(files):
            chunk = remaining if index == files - 1 else size // files
            remaining -= chunk
            content = os.urandom(chunk)
            info = tarfile.TarInfo(f"{directory.name}/file-{index}.bin")
            info.size = len(content)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    uncompressed = buffer.getvalue()
    return gzip.compress(uncompressed, compresslevel=1, mtime=0), uncompressed


def _canonical(document: dict[str, object]) -> bytes:
    return json.dumps(document, indent=3).encode()


def build_image(
    fmt: Format = "oci",
    *,
    layer_sizes: Sequence[int] = SMALL_LAYERS,
    architecture: str = "amd64",
    os_name: str = "linux",
) -> Image:
    """A real image: gzip tar layers, a valid config and an OCI or Docker schema 2 manifest."""
    layer_type = OCI_LAYER_GZIP if fmt == "oci" else DOCKER_LAYER_GZIP
    layers: list[Blob] = []
    diff_ids: list[str] = []
    history: list[dict[str, object]] = []
    for number, size in enumerate(layer_sizes):
        compressed, uncompressed = make_layer(size)
        layers.append(Blob.of(layer_type, compressed))
        diff_ids.append(sha256_digest(uncompressed))
        history.append(
            {
                "created": "2024-01-01T00:00:00Z",
                "created_by": f"/bin/sh -c #(nop) ADD layer {number} of {size} bytes",
            }
        )
    config_document: dict[str, object] = {
        "architecture": architecture,
        "os": os_name,
        "created": "2024-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }
    config = Blob.of(OCI_CONFIG if fmt == "oci" else DOCKER_CONFIG, _canonical(config_document))
    media_type = OCI_MANIFEST if fmt == "oci" else DOCKER_MANIFEST
    manifest = _canonical(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": config.descriptor(),
            "layers": [layer.descriptor() for layer in layers],
        }
    )
    return Image(
        media_type=media_type,
        manifest=manifest,
        digest=sha256_digest(manifest),
        config=config,
        layers=tuple(layers),
        architecture=architecture,
        os=os_name,
    )


def build_index(
    fmt: Format = "oci",
    *,
    layer_sizes: Sequence[int] = SMALL_LAYERS,
    architectures: Sequence[str] = ("amd64", "arm64"),
) -> ImageIndex:
    """An OCI index (or Docker manifest list) over one linux image per architecture."""
    images = tuple(
        build_image(fmt, layer_sizes=layer_sizes, architecture=arch) for arch in architectures
    )
    media_type = OCI_INDEX if fmt == "oci" else DOCKER_LIST
    manifests: list[dict[str, object]] = []
    for image in images:
        platform: dict[str, str] = {"architecture": image.architecture, "os": image.os}
        if image.architecture == "arm64":
            platform["variant"] = "v8"
        manifests.append(
            {
                "mediaType": image.media_type,
                "size": len(image.manifest),
                "digest": image.digest,
                "platform": platform,
            }
        )
    body = _canonical({"schemaVersion": 2, "mediaType": media_type, "manifests": manifests})
    return ImageIndex(
        media_type=media_type, manifest=body, digest=sha256_digest(body), images=images
    )
