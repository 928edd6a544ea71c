"""What every fault case checks, in one place: the cache directory, error bodies, pulled bytes.

The cache layout the mirror documents (`proxy/blobstore.py`)::

    <cache-dir>/
    +-- blobs/sha256/<xx>/<hex>          complete; the bytes hash to <hex>, <xx> is its prefix
    +-- tmp/sha256-<hex>                 a download in progress
    +-- tmp/sha256-<hex>.<pid>.small     a manifest being written
    +-- tmp/evicted-<pid>-<n>            a blob being deleted

`audit_cache` walks the directory and lists every departure from that drawing: a file at a final
path whose bytes do not hash to its name (a partial or corrupt blob), or anything the layout does
not have. A test may name junk it planted itself, which the mirror is expected to leave alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import stat
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.server import keys as state

Client = TestClient[web.Request, web.Application]
REPOSITORY: Final = "team/app"  # the repository the fault cases pull from

_HEX64: Final = re.compile(r"[a-f0-9]{64}")
_TEMP_NAME: Final = re.compile(r"sha256-[a-f0-9]{64}(?:\.[0-9]+\.small)?|evicted-[0-9]+-[0-9]+")
# The readiness check's write probe (layout in proxy/blobstore.py): it comes and goes every few
# seconds, so an audit of a running mirror may catch it; it is neither a download nor junk.
_READY_PROBE: Final = re.compile(r"\.ready-[a-z0-9_]+")
# Every code the OCI distribution spec defines, plus Distribution's UNAVAILABLE and UNKNOWN.
OCI_ERROR_CODES: Final = frozenset(
    {
        "BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
        "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID",
        "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED",
        "TOOMANYREQUESTS", "RANGE_INVALID", "UNAVAILABLE", "UNKNOWN",
    }
)  # fmt: skip


def final_path(cache_dir: Path, digest: str) -> Path:
    hex_digest = digest.removeprefix("sha256:")
    return cache_dir / "blobs" / "sha256" / hex_digest[:2] / hex_digest


_PROVENANCE = re.compile(r"provenance\.sqlite(-wal|-shm|-journal)?")


@dataclass
class CacheAudit:
    """What a cache directory holds: verified blobs by digest, temporary files, and problems."""

    blobs: dict[str, int] = field(default_factory=dict)  # digest -> size
    temp: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(self.blobs.values())


def audit_cache(cache_dir: Path, *, junk: Collection[Path] = ()) -> CacheAudit:
    """Hash every file at a final path and list whatever the documented layout does not have.

    A file that disappears while it is being looked at was evicted or renamed into place
    concurrently, which is allowed; it is simply not counted.
    """
    audit = CacheAudit()
    planted = {path.resolve() for path in junk}
    if not cache_dir.exists():
        return audit
    for entry in sorted(cache_dir.iterdir()):
        if entry.name == "blobs" and entry.is_dir() and not entry.is_symlink():
            _audit_blobs(entry, planted, audit)
        elif entry.name == "tmp" and entry.is_dir() and not entry.is_symlink():
            for temp in sorted(entry.iterdir()):
                if temp.resolve() in planted or _READY_PROBE.fullmatch(temp.name):
                    continue
                try:
                    mode = temp.lstat().st_mode
                except FileNotFoundError:
                    continue  # a download renamed into place (or removed) since the listing
                if _TEMP_NAME.fullmatch(temp.name) and stat.S_ISREG(mode):
                    audit.temp.append(temp.name)
                else:
                    audit.problems.append(f"unexpected entry in tmp/: {temp}")
        elif _PROVENANCE.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
            continue  # where digests were seen (proxy.provenance), and SQLite's journals
        elif entry.resolve() not in planted:
            audit.problems.append(f"unexpected entry in the cache dir: {entry}")
    return audit


def _audit_blobs(blobs: Path, planted: set[Path], audit: CacheAudit) -> None:
    holding_junk = {parent for path in planted for parent in path.parents}
    for path in sorted(blobs.rglob("*")):
        resolved = path.resolve()
        if resolved in planted or any(parent in planted for parent in resolved.parents):
            continue  # planted junk, or what is inside it
        if path.is_dir() and resolved in holding_junk:
            continue
        relative = path.relative_to(blobs).parts
        if path.is_symlink():
            audit.problems.append(f"symlink in the cache: {path}")
        elif path.is_dir():
            shard_ok = len(relative) == 2 and re.fullmatch(r"[a-f0-9]{2}", relative[1])
            if relative != ("sha256",) and not shard_ok:
                audit.problems.append(f"unexpected directory: {path}")
        elif len(relative) != 3 or relative[0] != "sha256" or not _HEX64.fullmatch(relative[2]):
            audit.problems.append(f"unexpected file: {path}")
        elif relative[1] != relative[2][:2]:
            audit.problems.append(f"blob in the wrong shard: {path}")
        else:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            if hashlib.sha256(data).hexdigest() != relative[2]:
                audit.problems.append(f"{path} does not hash to its name ({len(data)} bytes)")
            else:
                audit.blobs[f"sha256:{relative[2]}"] = len(data)


def assert_cache_sound(
    cache_dir: Path, *, junk: Collection[Path] = (), idle: bool = True
) -> CacheAudit:
    """No partial or corrupt file at a final path, nothing outside the layout; when `idle`
    (no download running), nothing left in `tmp/` either."""
    audit = audit_cache(cache_dir, junk=junk)
    assert audit.problems == []
    if idle:
        assert audit.temp == [], f"abandoned files in tmp/: {audit.temp}"
    return audit


@dataclass(frozen=True)
class Outcome:
    """One response as a client saw it; `body` is None when the transfer broke mid-body."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes | None

    @property
    def broken(self) -> bool:
        return self.body is None

    @property
    def code(self) -> str:
        """The OCI error code of an error body (`{"errors": [{"code": ...}]}`)."""
        assert self.body is not None, "the error body broke"
        return oci_error_code(self.body)


def oci_error_code(body: bytes) -> str:
    assert b"Traceback" not in body
    document = json.loads(body)
    code = document["errors"][0]["code"]
    assert code in OCI_ERROR_CODES, code
    return str(code)


async def fetch(
    client: Client | aiohttp.ClientSession,
    url: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
) -> Outcome:
    """Send one request and read the whole body, recording a broken transfer as such."""
    async with client.request(method, url, headers=headers) as response:
        try:
            body: bytes | None = await response.read()
        except aiohttp.ClientPayloadError:
            body = None
        return Outcome(response.status, CIMultiDictProxy(CIMultiDict(response.headers)), body)


def assert_exact_or_broken(outcome: Outcome, data: bytes) -> None:
    """The rule for every blob transfer: the exact bytes, or a transfer the client sees fail."""
    assert outcome.status in (200, 206), outcome
    if outcome.body is not None:
        assert outcome.body == data, "served a complete body that is not the blob"


async def settle(client: Client) -> None:
    """Wait for every download the store runs: they outlive the requests that started them."""
    store = client.app[state.STORE]
    while store._tasks:
        await asyncio.gather(*list(store._tasks), return_exceptions=True)
