"""Pushing images over the distribution API (OCI distribution spec, "Pushing blobs" and
"Pushing Manifests"): :func:`push_blob`, :func:`push_manifest`, :func:`push_image`,
:func:`push_index`."""

from __future__ import annotations

import io

import aiohttp
from yarl import URL

from harness.digests import sha256_digest
from harness.images import Image, ImageIndex


class PushError(RuntimeError):
    pass


async def push_blob(session: aiohttp.ClientSession, base_url: str, repo: str, data: bytes) -> str:
    """Monolithic upload: ``POST /v2/<repo>/blobs/uploads/`` then ``PUT <location>&digest=``."""
    digest = sha256_digest(data)
    start = URL(base_url) / "v2" / repo / "blobs" / "uploads" / ""
    async with session.post(start) as response:
        if response.status != 202:
            raise PushError(f"POST {start}: {response.status} {await response.text()}")
        location = response.headers["Location"]
    # Location may be relative (spec) or absolute (Distribution); it keeps its own query.
    upload = URL(base_url).join(URL(location)).update_query({"digest": digest})
    headers = {"Content-Type": "application/octet-stream"}
    # A BytesIO body: aiohttp warns (an error under filterwarnings) about large raw bytes bodies.
    async with session.put(upload, data=io.BytesIO(data), headers=headers) as response:
        if response.status != 201:
            raise PushError(f"PUT {upload}: {response.status} {await response.text()}")
        answered = response.headers.get("Docker-Content-Digest", digest)
    if answered != digest:
        raise PushError(f"registry stored blob as {answered}, expected {digest}")
    return digest


async def push_manifest(
    session: aiohttp.ClientSession,
    base_url: str,
    repo: str,
    ref: str,
    body: bytes,
    media_type: str,
) -> str:
    """``PUT /v2/<repo>/manifests/<ref>``; returns the digest the registry reports."""
    url = URL(base_url) / "v2" / repo / "manifests" / ref
    async with session.put(url, data=body, headers={"Content-Type": media_type}) as response:
        if response.status != 201:
            raise PushError(f"PUT {url}: {response.status} {await response.text()}")
        digest = response.headers.get("Docker-Content-Digest", sha256_digest(body))
    if digest != sha256_digest(body):
        raise PushError(f"registry digest {digest} differs from {sha256_digest(body)}")
    return digest


async def push_image(
    session: aiohttp.ClientSession,
    base_url: str,
    repo: str,
    image: Image,
    *tags: str,
) -> str:
    """Push blobs, then the manifest by digest and under each tag."""
    for blob in image.blobs:
        await push_blob(session, base_url, repo, blob.data)
    for ref in (image.digest, *tags):
        await push_manifest(session, base_url, repo, ref, image.manifest, image.media_type)
    return image.digest


async def push_index(
    session: aiohttp.ClientSession,
    base_url: str,
    repo: str,
    index: ImageIndex,
    *tags: str,
) -> str:
    """Push every child image by digest, then the index by digest and under each tag."""
    for image in index.images:
        await push_image(session, base_url, repo, image)
    for ref in (index.digest, *tags):
        await push_manifest(session, base_url, repo, ref, index.manifest, index.media_type)
    return index.digest
