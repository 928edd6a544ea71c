"""Manifests: by digest from the content store (immutable), by tag from the upstream.

Manifests are content-addressed like blobs, so they live in the same store; their media type
is read back from the bytes (`oci.manifest_media_type`), never from a side file that could
disagree with them.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.blobs import CacheResult
from proxy.blobstore import BlobStore
from proxy.oci import (
    Digest,
    ErrorCode,
    MediaType,
    Reference,
    RegistryError,
    Repository,
    accepted_media_types,
    accepts,
    manifest_media_type,
)
from proxy.upstream import Upstream

# What we ask the upstream for when the client names nothing: every manifest type we know.
ALL_MANIFEST_TYPES = sorted(MediaType.MANIFESTS)


@dataclass(frozen=True, slots=True)
class ManifestAnswer:
    media_type: str
    digest: Digest
    size: int
    body: bytes | None  # None answers a HEAD
    cache: str


class ManifestService:
    def __init__(self, store: BlobStore) -> None:
        self.store = store

    async def get(
        self,
        upstream: Upstream,
        repository: Repository,
        reference: Reference,
        accept_lines: list[str],
        *,
        head: bool,
    ) -> ManifestAnswer:
        accepted = accepted_media_types(accept_lines)
        # The set, sorted: clients vary the order of the same types from request to request.
        wanted = sorted(accepted) if accepted else ALL_MANIFEST_TYPES
        if isinstance(reference, Digest):
            cached = self.store.read_small(reference)
            if cached is not None:
                return _answer(cached, reference, head, CacheResult.HIT)
        elif head:
            found = await upstream.head_manifest(repository, reference, wanted)
            if found is not None and accepts(accepted, found.media_type):
                return ManifestAnswer(
                    found.media_type, found.digest, found.size, None, CacheResult.MISS
                )
        manifest = await upstream.get_manifest(repository, reference, wanted)
        media_type = manifest.media_type or manifest_media_type(manifest.body)
        if not isinstance(reference, Digest) and not accepts(accepted, media_type):
            raise RegistryError(
                ErrorCode.MANIFEST_UNKNOWN,
                f"upstream offers {media_type}, which the client does not accept",
            )
        self.store.put_small(manifest.digest, manifest.body)
        return ManifestAnswer(
            media_type,
            manifest.digest,
            len(manifest.body),
            None if head else manifest.body,
            CacheResult.MISS,
        )


def _answer(body: bytes, digest: Digest, head: bool, cache: str) -> ManifestAnswer:
    return ManifestAnswer(
        manifest_media_type(body), digest, len(body), None if head else body, cache
    )
