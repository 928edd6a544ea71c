"""The `/v2/` API a mirror answers: which endpoint a path names, parsed once, and how the
cache answered it.

Each endpoint has its own path type carrying exactly what it needs (a manifest path has a
repository and a reference, a blob path a digest), so a handler holds valid values and never
checks for a missing one. Pure values, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from http import HTTPStatus
from typing import ClassVar

from proxy.errors import ErrorCode, RegistryError
from proxy.oci.names import Digest, Reference, Repository, parse_reference


class Endpoint(StrEnum):
    """The route label of metrics and the access log, as well as the parsed path's kind."""

    PING = "ping"
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags"
    REFERRERS = "referrers"
    UNSUPPORTED = "unsupported"


class CacheResult(StrEnum):
    """How a response was answered: the metrics label, and (upper-cased) the `X-Cache` header."""

    HIT = "hit"
    MISS = "miss"
    COALESCED = "coalesced"
    STALE = "stale"

    @property
    def header(self) -> str:
        return self.value.upper()

    @classmethod
    def from_header(cls, value: str | None) -> CacheResult | None:
        try:
            return cls((value or "").lower())
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class Ping:
    """`/v2/`: the API version check."""

    endpoint: ClassVar[Endpoint] = Endpoint.PING


@dataclass(frozen=True, slots=True)
class Unsupported:
    """Writes (`blobs/uploads`) and `_catalog`: a read-only mirror answers neither."""

    endpoint: ClassVar[Endpoint] = Endpoint.UNSUPPORTED


@dataclass(frozen=True, slots=True)
class ManifestPath:
    """`<name>/manifests/<reference>`"""

    repository: Repository
    reference: Reference
    endpoint: ClassVar[Endpoint] = Endpoint.MANIFEST

    @property
    def resource(self) -> str:
        """The path below the repository."""
        return f"manifests/{self.reference}"


@dataclass(frozen=True, slots=True)
class BlobPath:
    """`<name>/blobs/<digest>`"""

    repository: Repository
    digest: Digest
    endpoint: ClassVar[Endpoint] = Endpoint.BLOB

    @property
    def resource(self) -> str:
        return f"blobs/{self.digest}"


@dataclass(frozen=True, slots=True)
class TagsPath:
    """`<name>/tags/list`"""

    repository: Repository
    endpoint: ClassVar[Endpoint] = Endpoint.TAGS

    @property
    def resource(self) -> str:
        return "tags/list"


@dataclass(frozen=True, slots=True)
class ReferrersPath:
    """`<name>/referrers/<digest>` (OCI distribution spec 1.1, "Listing Referrers")"""

    repository: Repository
    digest: Digest
    endpoint: ClassVar[Endpoint] = Endpoint.REFERRERS

    @property
    def resource(self) -> str:
        return f"referrers/{self.digest}"


RepositoryPath = ManifestPath | BlobPath | TagsPath | ReferrersPath
ApiPath = Ping | Unsupported | RepositoryPath


def parse_api_path(tail: str) -> ApiPath:
    """Parse what follows `/v2/` in a raw (still percent-encoded) request path.

    The repository name may itself contain slashes, so the endpoint is read from the end:
    `<name>/manifests/<reference>`, `<name>/blobs/<digest>`, `<name>/tags/list`,
    `<name>/referrers/<digest>`. Writes (`blobs/uploads`) and `_catalog` are unsupported by a
    read-only mirror. Percent-encoding is never valid in any of these grammars, so a `%` (as in
    `%2e%2e`) fails the name grammar like any other bad character.
    """
    if tail == "":
        return Ping()
    if tail in ("_catalog", "_catalog/"):
        return Unsupported()
    parts = tail.split("/")
    name = "/".join(parts[:-2])
    if len(parts) >= 3 and parts[-2] == "manifests":
        return ManifestPath(Repository.parse(name), parse_reference(parts[-1]))
    if len(parts) >= 3 and parts[-2] == "tags" and parts[-1] == "list":
        return TagsPath(Repository.parse(name))
    if "blobs" in parts[1:] and "uploads" in parts[parts.index("blobs", 1) :]:
        return Unsupported()
    if len(parts) >= 3 and parts[-2] == "blobs":
        return BlobPath(Repository.parse(name), Digest.parse(parts[-1]))
    if len(parts) >= 3 and parts[-2] == "referrers":
        return ReferrersPath(Repository.parse(name), Digest.parse(parts[-1]))
    raise RegistryError(ErrorCode.UNSUPPORTED, "unknown API endpoint", status=HTTPStatus.NOT_FOUND)
