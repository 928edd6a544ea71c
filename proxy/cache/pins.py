"""Pinned images: manifests and blobs the cache never evicts.

A pin is an image reference (`ghcr.io/org/app:1.2`). Resolving it reads manifests only, through
the mirror's own `ManifestService` (so tag freshness, serve-stale and the upstream routing are
the ones clients get): the tag's manifest, every platform manifest of an index, and from those
the digests and sizes of configs and layers, as their descriptors state them. The whole set
goes to `BlobStore.pin`, which refuses it when it does not fit in the budget; blobs need not
be cached to be pinned (`registry-proxy warm` fetches them).

Tags move, so the set is resolved again every `pin_refresh`. A pin that fails to resolve (the
upstream is down) keeps what it last resolved to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from proxy.cache.manifests import ALL_MANIFEST_TYPES, ManifestService
from proxy.cache.store import BlobStore
from proxy.errors import ErrorCode, RegistryError
from proxy.oci import Digest, ImageReference, Repository, Tag
from proxy.oci.dockerhub import DOCKER_HUB
from proxy.oci.media import image_blobs, index_children, is_index, manifest_document
from proxy.tasks import in_background
from proxy.upstream.client import Upstream
from proxy.upstream.routing import Upstreams

log = logging.getLogger(__name__)


class PinsTooLarge(ValueError):
    """The pinned images would not fit in the cache budget."""


def locate(upstreams: Upstreams, reference: ImageReference) -> tuple[Upstream, Repository]:
    """The upstream and repository a reference means on this mirror, routed as a client's
    request for `reference.mirror_name` would be; an unmirrored registry is an error."""
    upstream, name = upstreams.route(reference.mirror_name, None)
    if name == reference.mirror_name and reference.registry != DOCKER_HUB:
        raise RegistryError(
            ErrorCode.NAME_UNKNOWN, f"registry {reference.registry} is not mirrored here"
        )
    return upstream, Repository.parse(name)


@dataclass(frozen=True, slots=True)
class PinnedImage:
    reference: ImageReference
    digest: Digest | None = None  # what the reference resolved to
    sizes: dict[Digest, int] = field(default_factory=dict)  # every pinned digest: its size
    resolved: float = 0.0  # wall-clock time of the last successful resolution
    error: str | None = None  # why the last resolution failed

    @property
    def size(self) -> int:
        return sum(self.sizes.values())


class PinResolver:
    """The pinned set: resolved at start-up and every `refresh`, replaced by `apply`."""

    def __init__(
        self,
        store: BlobStore,
        manifests: ManifestService,
        upstreams: Upstreams,
        references: tuple[ImageReference, ...],
        *,
        refresh: float,
    ) -> None:
        self.store = store
        self.manifests = manifests
        self.upstreams = upstreams
        self.references = references
        self.refresh = refresh
        self.images: dict[ImageReference, PinnedImage] = {}
        # Set once the configured pins were resolved the first time, whatever the outcome.
        self.settled = asyncio.Event()
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Resolve the pins in the background while the block runs."""
        async with in_background(self.run(), "pin resolver"):
            yield

    async def run(self) -> None:
        """Resolve the pins now and again every `refresh` seconds; runs until cancelled."""
        while True:
            try:
                await self.resolve_again()
            except PinsTooLarge as exc:
                log.error("pins refused, the previous pinned set stays: %s", exc)
            finally:
                self.settled.set()
            await asyncio.sleep(self.refresh)

    async def apply(self, references: tuple[ImageReference, ...]) -> list[PinnedImage]:
        """Resolve `references` and make them the pinned set; raises `PinsTooLarge` (and
        keeps the previous set) when they do not fit in the budget."""
        async with self._lock:
            return await self._apply(references)

    async def resolve_again(self) -> list[PinnedImage]:
        """Resolve the current pins again (tags move)."""
        async with self._lock:
            return await self._apply(self.references)

    async def _apply(self, references: tuple[ImageReference, ...]) -> list[PinnedImage]:
        images = [await self._resolve(reference) for reference in references]
        sizes: dict[Digest, int] = {}
        for image in images:
            sizes.update(image.sizes)
        try:
            self.store.pin(frozenset(sizes), sizes)
        except ValueError as exc:
            raise PinsTooLarge(
                f"{len(references)} pinned images need {sum(sizes.values())} bytes, more "
                f"than the cache budget of {self.store.budget} bytes"
            ) from exc
        self.references = references
        self.images = {image.reference: image for image in images}
        for image in images:
            if image.error is not None:
                log.warning("pin %s not resolved: %s", image.reference, image.error)
        return images

    async def _resolve(self, reference: ImageReference) -> PinnedImage:
        previous = self.images.get(reference, PinnedImage(reference))
        try:
            upstream, repository = locate(self.upstreams, reference)
            sizes: dict[Digest, int] = {}
            digest = await self._walk(upstream, repository, reference.manifest_reference, sizes)
        except RegistryError as exc:
            return PinnedImage(
                reference, previous.digest, previous.sizes, previous.resolved, exc.message
            )
        return PinnedImage(reference, digest, sizes, time.time())

    async def _walk(
        self,
        upstream: Upstream,
        repository: Repository,
        ref: Tag | Digest,
        sizes: dict[Digest, int],
    ) -> Digest:
        """Add a manifest and everything it references to `sizes`; returns its digest."""
        if isinstance(ref, Tag):
            answer = await self.manifests.by_tag(
                upstream, repository, ref, ALL_MANIFEST_TYPES, head=False
            )
        else:
            answer = await self.manifests.by_digest(upstream, repository, ref, head=False)
        assert answer.body is not None
        sizes[answer.digest] = answer.size
        document = manifest_document(answer.body)
        if is_index(answer.body):
            for child in index_children(document):
                await self._walk(upstream, repository, child.digest, sizes)
        else:
            sizes.update((blob.digest, blob.size) for blob in image_blobs(document))
        return answer.digest

    @property
    def pinned_bytes(self) -> int:
        sizes: dict[Digest, int] = {}
        for image in self.images.values():
            sizes.update(image.sizes)
        return sum(sizes.values())

    def _cached(self, digest: Digest) -> bool:
        return digest in self.store or self.store.has_file(digest)

    def status(self) -> list[dict[str, Any]]:
        """Every pin as the admin API shows it, in the order they were given."""
        rows = []
        for reference in self.references:
            image = self.images.get(reference, PinnedImage(reference))
            rows.append(
                {
                    "reference": str(reference),
                    "digest": str(image.digest) if image.digest else None,
                    "blobs": len(image.sizes),  # manifests included: they are blobs too
                    "bytes": image.size,
                    # On disk, whichever worker owns the blob.
                    "cached_bytes": sum(s for d, s in image.sizes.items() if self._cached(d)),
                    "resolved": image.resolved or None,
                    "error": image.error,
                }
            )
        return rows
