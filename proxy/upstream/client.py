"""The client for one upstream registry: its operations (manifests, blobs, tags, referrers).

How a request gets there (connections, auth, redirects, the errors raised) is
`proxy.upstream.transport`; this module says what to ask and checks what comes back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from http import HTTPStatus
from typing import Final

from proxy.config import Settings
from proxy.errors import (
    ErrorCode,
    RangeIgnored,
    RegistryError,
    UpstreamRefused,
    UpstreamUnavailable,
)
from proxy.oci import Digest, MediaType, Reference, Repository
from proxy.upstream.bodies import (
    BlobStream,
    Manifest,
    ManifestHead,
    content_range,
    verify_manifest,
)
from proxy.upstream.transport import Transport

# Documents read whole are capped, so an upstream cannot make the mirror buffer without bound:
# a tag list of 16 MiB holds some 500,000 tags (manifests: `max_manifest_size`).
DEFAULT_MAX_MANIFEST_SIZE: Final = Settings.max_manifest_size
MAX_TAG_LIST_SIZE: Final = 16 * 1024 * 1024


class Upstream(Transport):
    """One upstream registry, with one pooled `ClientSession`."""

    async def get_manifest(
        self, repository: Repository, reference: Reference, accept: list[str]
    ) -> Manifest:
        path = f"{self.remote_name(repository)}/manifests/{reference}"
        headers = {"Accept": ", ".join(accept)}
        body, response = await self._read(
            path, repository, headers, ErrorCode.MANIFEST_UNKNOWN, self.max_manifest_size
        )
        media_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip()
        try:
            digest = verify_manifest(self.name, body, reference, response.headers)
        except UpstreamUnavailable:
            self._count_error("manifest", "digest_mismatch")
            raise
        return Manifest(body=body, media_type=media_type, digest=digest)

    async def head_manifest(
        self, repository: Repository, reference: Reference, accept: list[str]
    ) -> ManifestHead | None:
        """The manifest's digest and type without a body; None when the upstream omits them."""
        path = f"{self.remote_name(repository)}/manifests/{reference}"
        response = await self._send("HEAD", path, repository, {"Accept": ", ".join(accept)})
        response.release()
        self._raise_for_status(response, ErrorCode.MANIFEST_UNKNOWN)
        header = response.headers.get("Docker-Content-Digest")
        if header is None or response.content_length is None:
            return None
        try:
            digest = Digest.parse(header)
        except RegistryError:
            return None
        media_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip()
        return ManifestHead(media_type=media_type, digest=digest, size=response.content_length)

    async def open_blob(
        self, repository: Repository, digest: Digest, offset: int = 0, end: int | None = None
    ) -> BlobStream:
        """The blob from byte `offset`, up to byte `end` (exclusive) when given: a resumed
        download, or one part of a download over several connections. Every open goes through
        the registry, so a signed CDN URL that expired since the last one is never reused."""
        headers = {"Range": f"bytes={offset}-{'' if end is None else end - 1}"}
        if not offset and end is None:
            headers = {}
        path = f"{self.remote_name(repository)}/blobs/{digest}"
        # A slot in every limit (global, this upstream) is held until the stream is closed.
        held: list[asyncio.Semaphore] = []
        try:
            for slots in self.download_slots:
                await slots.acquire()
                held.append(slots)
            response = await self._send("GET", path, repository, headers)
            try:
                self._raise_for_status(response, ErrorCode.BLOB_UNKNOWN)
                if headers and response.status != HTTPStatus.PARTIAL_CONTENT:
                    raise RangeIgnored(self.name)
                if headers and (content_range(response) or (-1,))[0] != offset:
                    raise RangeIgnored(self.name, "answered another range than asked")
            except RegistryError:
                response.release()
                raise
        except BaseException:
            for slots in held:
                slots.release()
            raise
        stream = BlobStream(
            self.name, response, offset, self.metrics, held, self.label, self._timeout.sock_read
        )
        if (limit := self.max_blob_size) is not None and (stream.size or 0) > limit:
            stream.close()
            raise UpstreamRefused(
                ErrorCode.SIZE_INVALID, f"blob is larger than the mirror's limit of {limit} bytes"
            )
        return stream

    async def get_referrers(
        self, repository: Repository, digest: Digest, query: str
    ) -> tuple[bytes, str]:
        """The referrers index (OCI 1.1) as the upstream sent it, and its content type."""
        path = f"{self.remote_name(repository)}/referrers/{digest}" + (f"?{query}" if query else "")
        # A referrers response is an image index, so it has a manifest's limit.
        body, response = await self._read(
            path, repository, {}, ErrorCode.MANIFEST_UNKNOWN, self.max_manifest_size
        )
        return body, response.headers.get("Content-Type", MediaType.OCI_INDEX)

    async def probe(
        self, repository: Repository, path: str, headers: Mapping[str, str] | None = None
    ) -> int:
        """The status of a HEAD of `path` below the repository with the current credentials
        (a HEAD is not a Docker Hub pull): 200, 401, 403 or 404; anything else raises."""
        response = await self._send(
            "HEAD", f"{self.remote_name(repository)}/{path}", repository, headers or {}
        )
        response.release()
        if response.status in (401, 403, 404) or response.status < 300:
            return response.status
        self._raise_for_status(response, ErrorCode.NAME_UNKNOWN)
        raise UpstreamUnavailable(self.name, f"answered unexpected status {response.status}")

    async def head_blob(self, repository: Repository, digest: Digest) -> int:
        path = f"{self.remote_name(repository)}/blobs/{digest}"
        response = await self._send("HEAD", path, repository, {})
        response.release()
        self._raise_for_status(response, ErrorCode.BLOB_UNKNOWN)
        if response.content_length is None:
            raise UpstreamUnavailable(self.name, "did not say the blob's size")
        return response.content_length

    async def get_tags(self, repository: Repository, query: str) -> tuple[bytes, str | None]:
        """The tag list body and the upstream's `Link` header (`proxy.taglist` points it back
        at the mirror)."""
        remote = self.remote_name(repository)
        path = f"{remote}/tags/list" + (f"?{query}" if query else "")
        body, response = await self._read(
            path, repository, {}, ErrorCode.NAME_UNKNOWN, MAX_TAG_LIST_SIZE
        )
        return body, response.headers.get("Link")
