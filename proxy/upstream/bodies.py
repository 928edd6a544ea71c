"""What an upstream sends back: manifests (bytes never re-encoded, digest checked) and open blob
streams (aiohttp's errors translated into ours as they arise)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http import HTTPStatus

import aiohttp
from multidict import CIMultiDictProxy

from proxy.errors import RegistryError, UpstreamTimeout, UpstreamUnavailable
from proxy.metrics import Metrics
from proxy.oci import Digest, Reference
from proxy.upstream.socket_body import SocketBody

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Manifest:
    """A manifest as the upstream sent it: the bytes are never re-encoded."""

    body: bytes
    media_type: str
    digest: Digest


@dataclass(frozen=True, slots=True)
class ManifestHead:
    media_type: str
    digest: Digest
    size: int


class BlobStream:
    """An open upstream blob body; `size` is the whole blob's size when the upstream said it."""

    def __init__(
        self,
        upstream: str,
        response: aiohttp.ClientResponse,
        offset: int,
        metrics: Metrics | None = None,
        slots: list[asyncio.Semaphore] | None = None,
        label: str | None = None,
        read_timeout: float | None = None,
    ) -> None:
        self._upstream = upstream
        self._response = response
        self._slots = slots or []
        self._fetched = metrics.upstream_bytes.labels(label or upstream) if metrics else None
        self._read_timeout = read_timeout
        self._socket_body: SocketBody | None = None
        self._socket_asked = False
        self.offset = offset
        self.size = _total_size(response, offset)
        # What tells one body from another of the same URL, compared when a download resumes
        # (RFC 9110 section 8.8); and whether the upstream takes Range requests (section 14.3).
        self.validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
        self.accepts_ranges = response.status == HTTPStatus.PARTIAL_CONTENT or (
            response.headers.get("Accept-Ranges", "").strip().lower() == "bytes"
        )

    def socket_body(self) -> SocketBody | None:
        """The body as its socket's bytes, when it may be read that way
        (`proxy.upstream.socket_body`); then, never `chunks`. Before anything of it was read."""
        if not self._socket_asked:
            self._socket_asked = True
            self._socket_body = SocketBody.take(
                self._upstream, self._response, self._read_timeout, self._fetched
            )
        return self._socket_body

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            # The pieces as the parser made them, never joined (a copy of every byte): a
            # download writes them with one pwritev, a relay sends them one by one.
            async for chunk, _ in self._response.content.iter_chunks():
                if not chunk:
                    continue  # the end of a piece of a chunked body
                if self._fetched is not None:
                    self._fetched.inc(len(chunk))
                yield chunk
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(self._upstream, "timed out sending a blob") from exc
        except aiohttp.ClientError as exc:
            log.warning("upstream %s: blob transfer broke: %s", self._upstream, exc)
            raise UpstreamUnavailable(self._upstream, "blob transfer broke") from exc

    def close(self) -> None:
        self._response.close()
        if self._socket_body is not None:
            self._socket_body.close()
        slots, self._slots = self._slots, []
        for held in slots:
            held.release()


def _total_size(response: aiohttp.ClientResponse, offset: int) -> int | None:
    if response.status == HTTPStatus.PARTIAL_CONTENT:
        span = content_range(response)
        return span[2] if span else None
    return response.content_length


def content_range(response: aiohttp.ClientResponse) -> tuple[int, int, int] | None:
    """First byte, last byte and complete length of a 206 (RFC 9110 section 14.4)."""
    header = response.headers.get("Content-Range", "")
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", header.strip())
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def verify_manifest(
    upstream: str, body: bytes, reference: Reference, headers: CIMultiDictProxy[str]
) -> Digest:
    """The manifest's digest, checked against the reference and the upstream's claim."""
    expected: Digest | None = reference if isinstance(reference, Digest) else None
    if expected is None and (claimed := headers.get("Docker-Content-Digest")):
        try:
            expected = Digest.parse(claimed)
        except RegistryError:
            expected = None
    actual = Digest.of(body, expected.algorithm if expected else "sha256")
    if expected is not None and actual != expected:
        raise UpstreamUnavailable(upstream, f"manifest digest mismatch: got {actual}")
    return actual
