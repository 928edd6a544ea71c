"""The pulling client, run in its own process: ``python -m bench.client --base URL --repo R ...``.

A pull is what containerd does: the manifest by tag with containerd's Accept list, the platform
manifest by digest when the tag names an index, then every blob, three at a time (containerd's
and Docker's default), each hashed as it arrives and checked against its digest and size.

Protocol with the parent: print ``ready``, wait for one line on stdin, run ``--pulls`` pulls at
once, print one JSON line. Times are ``time.monotonic()``, which is system-wide on Linux, so the
parent can compare them with its own clock and across client processes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

# What containerd sends when it resolves a tag (remotes/docker/resolver.go), comma-joined.
CONTAINERD_ACCEPT = ", ".join(
    [
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "*/*",
    ]
)
INDEX_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.index.v1+json",
    }
)
BLOB_CONCURRENCY = 3
CHUNK = 1024 * 1024
TIMEOUT = aiohttp.ClientTimeout(total=1800, sock_connect=10, sock_read=300)


class PullError(RuntimeError):
    pass


@dataclass
class PullResult:
    start: float
    end: float = 0.0
    first_byte: float | None = None  # first body byte of any blob
    bytes: int = 0
    error: str | None = None


class Puller:
    def __init__(self, base: str, repo: str, ref: str, arch: str) -> None:
        self.base = base.rstrip("/")
        self.repo = repo
        self.ref = ref
        self.arch = arch

    async def pull(self) -> PullResult:
        result = PullResult(start=time.monotonic())
        connector = aiohttp.TCPConnector(limit=BLOB_CONCURRENCY)
        # Blobs must arrive byte-exact: never ask for, or undo, a content encoding.
        async with aiohttp.ClientSession(
            connector=connector,
            timeout=TIMEOUT,
            auto_decompress=False,
            skip_auto_headers=["Accept-Encoding"],
        ) as session:
            try:
                await self._pull(session, result)
            except (PullError, aiohttp.ClientError, TimeoutError) as exc:
                result.error = f"{type(exc).__name__}: {exc}"
        result.end = time.monotonic()
        return result

    async def _pull(self, session: aiohttp.ClientSession, result: PullResult) -> None:
        manifest = await self._manifest(session, self.ref, None, result)
        if manifest.get("mediaType") in INDEX_TYPES or "manifests" in manifest:
            chosen = [
                m
                for m in manifest["manifests"]
                if m.get("platform", {}).get("architecture") == self.arch
            ]
            if not chosen:
                raise PullError(f"no {self.arch} manifest in the index")
            manifest = await self._manifest(
                session, chosen[0]["digest"], chosen[0]["digest"], result
            )
        blobs = [manifest["config"], *manifest["layers"]]
        limit = asyncio.Semaphore(BLOB_CONCURRENCY)

        async def fetch(descriptor: dict[str, Any]) -> None:
            async with limit:
                await self._blob(session, descriptor["digest"], int(descriptor["size"]), result)

        await asyncio.gather(*(fetch(blob) for blob in blobs))

    async def _manifest(
        self,
        session: aiohttp.ClientSession,
        ref: str,
        expected: str | None,
        result: PullResult,
    ) -> dict[str, Any]:
        url = f"{self.base}/v2/{self.repo}/manifests/{ref}"
        async with session.get(url, headers={"Accept": CONTAINERD_ACCEPT}) as response:
            body = await response.read()
            if response.status != 200:
                raise PullError(f"GET {url}: {response.status} {body[:200]!r}")
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            claimed = response.headers.get("Docker-Content-Digest", digest)
        if digest != claimed or (expected is not None and digest != expected):
            raise PullError(f"manifest {ref} hashes to {digest}, expected {expected or claimed}")
        result.bytes += len(body)
        document: dict[str, Any] = json.loads(body)
        return document

    async def _blob(
        self, session: aiohttp.ClientSession, digest: str, size: int, result: PullResult
    ) -> None:
        url = f"{self.base}/v2/{self.repo}/blobs/{digest}"
        hasher = hashlib.sha256()
        received = 0
        async with session.get(url) as response:
            if response.status != 200:
                raise PullError(f"GET {url}: {response.status}")
            async for chunk in response.content.iter_chunked(CHUNK):
                if result.first_byte is None:
                    result.first_byte = time.monotonic()
                hasher.update(chunk)
                received += len(chunk)
        if received != size or "sha256:" + hasher.hexdigest() != digest:
            raise PullError(f"blob {digest}: {received} of {size} bytes, digest mismatch")
        result.bytes += received


async def run(args: argparse.Namespace) -> list[PullResult]:
    puller = Puller(args.base, args.repo, args.ref, args.arch)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return list(await asyncio.gather(*(puller.pull() for _ in range(args.pulls))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True, help="registry URL, e.g. http://127.0.0.1:5000")
    parser.add_argument("--repo", required=True)
    parser.add_argument("--ref", required=True, help="tag (or digest) to pull")
    parser.add_argument("--pulls", type=int, default=1, help="concurrent pulls in this process")
    parser.add_argument("--arch", default="amd64", help="platform to pick from an index")
    results = asyncio.run(run(parser.parse_args()))
    print(json.dumps([asdict(result) for result in results]), flush=True)


if __name__ == "__main__":
    main()
