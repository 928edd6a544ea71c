"""The warming engine: pull images through a mirror's pull API and verify what it sends.

For each image:

1. the manifest by tag or digest (`ghcr.io/org/app:1.2` is `/v2/ghcr.io/org/app/...` on the
   mirror, `nginx` is `/v2/library/nginx/...`, see `references`);
2. for an index, the platform manifests that match the wanted platforms (None: all of them);
3. every config and layer blob, read to the end and hashed: a blob whose bytes do not hash to
   its digest, or whose size is not its descriptor's, fails the image.

Blobs shared by several images are fetched once. At most `concurrency` images and requests
are in flight. The mirror's `X-Cache` header says whether a blob was already cached (HIT) or
came from the upstream now. What it shows while it runs is a `ProgressView`'s business
(`proxy.cli.warm` draws them).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import platform
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import aiohttp
from yarl import URL

from proxy.errors import ErrorCode, RegistryError
from proxy.oci import Descriptor, Digest, MediaType
from proxy.oci.media import (
    image_blobs,
    index_children,
    is_image_manifest,
    is_index,
    manifest_document,
)
from proxy.oci.references import ImageReference, InvalidReference

MANIFEST_LIMIT: Final = 4 * 1024 * 1024
CHUNK: Final = 256 * 1024
ACCEPT: Final = ", ".join(sorted(MediaType.MANIFESTS))
# platform.machine() -> the GOARCH[/variant] names image indexes use.
_ARCHITECTURES: Final = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm/v7",
    "armv6l": "arm/v6",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


class WarmFailure(Exception):
    """Why an image could not be warmed, as the summary shows it."""


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"{text!r} is not a platform (examples: linux/amd64, linux/arm/v7)")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls) -> Platform:
        machine = platform.machine().lower()
        return cls.parse(f"linux/{_ARCHITECTURES.get(machine, machine)}")

    def matches(self, described: Any) -> bool:
        """Whether an index entry's `platform` object is this platform (any variant when
        this one names none, as `docker pull` picks arm64/v8 for linux/arm64)."""
        if not isinstance(described, dict):
            return False
        if (described.get("os"), described.get("architecture")) != (self.os, self.architecture):
            return False
        return self.variant is None or described.get("variant") == self.variant

    def __str__(self) -> str:
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)


def _platform_of(described: Any) -> str:
    if not isinstance(described, dict):
        return "unknown"
    parts = (described.get("os"), described.get("architecture"), described.get("variant"))
    return "/".join(str(part) for part in parts if part)


@dataclass(slots=True)
class ImageReport:
    reference: str
    platforms: list[str] = field(default_factory=list)
    manifests: int = 0
    blobs: int = 0
    fetched_bytes: int = 0  # came from the upstream through the mirror during this run
    cached_bytes: int = 0  # the mirror already had them (X-Cache: HIT)
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


@dataclass(frozen=True, slots=True)
class BlobResult:
    size: int
    cached: bool


class ProgressView(Protocol):
    def image_started(self, image: str, blobs: int, total: int) -> None: ...

    def advance(self, image: str, count: int) -> None: ...

    def image_finished(self, report: ImageReport) -> None: ...


class Warmer:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        mirror: URL,
        *,
        platforms: frozenset[Platform] | None,
        concurrency: int,
        view: ProgressView,
    ) -> None:
        self.session = session
        self.mirror = mirror
        self.platforms = platforms  # None: every platform
        self.concurrency = concurrency
        self.view = view
        self._requests = asyncio.Semaphore(concurrency)
        # One fetch per blob digest, whichever images share it.
        self._blobs: dict[Digest, asyncio.Task[BlobResult]] = {}

    async def warm_all(self, references: Iterable[str]) -> list[ImageReport]:
        images = asyncio.Semaphore(self.concurrency)

        async def one(text: str) -> ImageReport:
            async with images:
                return await self.warm(text)

        return list(await asyncio.gather(*(one(text) for text in references)))

    async def warm(self, text: str) -> ImageReport:
        report = ImageReport(text)
        try:
            reference = ImageReference.parse(text)
            blobs = await self._manifest_tree(reference, report)
            report.blobs = len(blobs)
            self.view.image_started(text, len(blobs), sum(blobs.values()))
            results = await asyncio.gather(
                *(self._blob(reference, digest, size, text) for digest, size in blobs.items()),
                return_exceptions=True,
            )
            failures = [str(r) for r in results if isinstance(r, Exception)]
            for result in results:
                if isinstance(result, BlobResult):
                    if result.cached:
                        report.cached_bytes += result.size
                    else:
                        report.fetched_bytes += result.size
                elif isinstance(result, BaseException) and not isinstance(result, Exception):
                    raise result
            if failures:
                more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
                raise WarmFailure(failures[0] + more)
        except (WarmFailure, InvalidReference) as exc:
            report.failure = str(exc)
        self.view.image_finished(report)
        return report

    async def _manifest_tree(
        self, reference: ImageReference, report: ImageReport
    ) -> dict[Digest, int]:
        """Fetch the manifest (and platform manifests); returns every blob digest: its size."""
        body = await self._manifest(reference, str(reference.manifest_reference), reference.digest)
        report.manifests += 1
        blobs: dict[Digest, int] = {}
        if not is_index(body):
            report.platforms.append("single")
            _add_blobs(body, blobs)
            return blobs
        entries = _walked(index_children, body)
        chosen = [
            entry
            for entry in entries
            if self.platforms is None or any(p.matches(entry.platform) for p in self.platforms)
        ]
        if not chosen:
            offered = ", ".join(sorted({_platform_of(e.platform) for e in entries}))
            wanted = ", ".join(sorted(str(p) for p in self.platforms or ()))
            raise WarmFailure(f"no manifest for {wanted} (the index has {offered})")
        for entry in chosen:
            child = await self._manifest(reference, str(entry.digest), entry.digest)
            report.manifests += 1
            report.platforms.append(_platform_of(entry.platform))
            _add_blobs(child, blobs)
        return blobs

    async def _manifest(
        self, reference: ImageReference, ref: str, expected: Digest | None
    ) -> bytes:
        url = self._url(reference, "manifests", ref)
        async with self._requests:
            try:
                async with self.session.get(url, headers={"Accept": ACCEPT}) as response:
                    if response.status != 200:
                        raise WarmFailure(f"manifest {ref}: {await _http_error(response)}")
                    body = await response.content.read(MANIFEST_LIMIT + 1)
                    said = response.headers.get("Docker-Content-Digest")
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise WarmFailure(_connection_error(self.mirror, exc)) from None
        if len(body) > MANIFEST_LIMIT:
            raise WarmFailure(f"manifest {ref} is larger than {MANIFEST_LIMIT} bytes")
        actual = Digest.of(body)
        if expected is not None and actual != expected:
            raise WarmFailure(f"manifest {ref}: the mirror sent bytes whose digest is {actual}")
        if said is not None and said != str(actual):
            raise WarmFailure(
                f"manifest {ref}: Docker-Content-Digest {said}, bytes hash to {actual}"
            )
        return body

    async def _blob(
        self, reference: ImageReference, digest: Digest, size: int, image: str
    ) -> BlobResult:
        task = self._blobs.get(digest)
        if task is not None:  # another image fetches it: count it for this one when done
            result = await asyncio.shield(task)
            self.view.advance(image, size)
            return result
        task = asyncio.create_task(self._fetch_blob(reference, digest, size, image))
        self._blobs[digest] = task
        return await asyncio.shield(task)

    async def _fetch_blob(
        self, reference: ImageReference, digest: Digest, size: int, image: str
    ) -> BlobResult:
        hasher = hashlib.new(digest.algorithm)
        received = 0
        async with self._requests:
            try:
                async with self.session.get(self._url(reference, "blobs", str(digest))) as response:
                    if response.status != 200:
                        raise WarmFailure(f"blob {digest}: {await _http_error(response)}")
                    cached = response.headers.get("X-Cache", "").upper() == "HIT"
                    async for chunk in response.content.iter_chunked(CHUNK):
                        hasher.update(chunk)
                        received += len(chunk)
                        self.view.advance(image, len(chunk))
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise WarmFailure(f"blob {digest}: {_connection_error(self.mirror, exc)}") from None
        if received != size:
            raise WarmFailure(f"blob {digest}: {received} bytes, the manifest says {size}")
        if hasher.hexdigest() != digest.encoded:
            raise WarmFailure(f"blob {digest}: the bytes do not match the digest")
        return BlobResult(size, cached)

    def _url(self, reference: ImageReference, kind: str, ref: str) -> URL:
        return self.mirror.with_path(f"/v2/{reference.mirror_name}/{kind}/{ref}", encoded=True)


def _walked(walk: Callable[[dict[str, Any]], list[Descriptor]], body: bytes) -> list[Descriptor]:
    """The descriptors `walk` finds in a manifest; a malformed one fails the image."""
    try:
        return walk(manifest_document(body))
    except RegistryError as exc:
        raise WarmFailure(exc.message) from None


def _add_blobs(body: bytes, blobs: dict[Digest, int]) -> None:
    def blobs_of(document: dict[str, Any]) -> list[Descriptor]:
        if not is_image_manifest(document):
            raise RegistryError(
                ErrorCode.MANIFEST_INVALID, "not an image manifest (schema 2 or OCI)"
            )
        return image_blobs(document)

    blobs.update((blob.digest, blob.size) for blob in _walked(blobs_of, body))


async def _http_error(response: aiohttp.ClientResponse) -> str:
    """`HTTP 404 MANIFEST_UNKNOWN: manifest unknown`, from an OCI error body when there is one."""
    text = f"HTTP {response.status}"
    try:
        errors = json.loads(await response.content.read(64 * 1024)).get("errors")
        first = errors[0]
        return f"{text} {first['code']}: {first['message']}"
    except (ValueError, AttributeError, LookupError, TypeError):
        return f"{text} {response.reason or ''}".rstrip()


def _connection_error(mirror: URL, exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"the mirror at {mirror} timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to the mirror at {mirror}: {exc.os_error.strerror or exc}"
    return f"the connection to the mirror at {mirror} broke: {exc}"
