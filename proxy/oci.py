"""The OCI distribution domain: digests, repository names, references, media types, errors.

Pure values, no I/O and no aiohttp: constructors parse and reject bad input, so code that holds
a `Digest` or a `Repository` never checks it again. Grammars are quoted from the OCI
distribution spec ("Pulling manifests", "Content Discovery") beside the regexes that implement
them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from enum import Enum
from http import HTTPStatus
from typing import Any, ClassVar, Final


class ErrorCode(Enum):
    """OCI error codes with the HTTP status each is answered with (spec, "Error Codes")."""

    BLOB_UNKNOWN = HTTPStatus.NOT_FOUND, "blob unknown to registry"
    DIGEST_INVALID = HTTPStatus.BAD_REQUEST, "provided digest did not match uploaded content"
    MANIFEST_UNKNOWN = HTTPStatus.NOT_FOUND, "manifest unknown"
    MANIFEST_INVALID = HTTPStatus.BAD_REQUEST, "manifest invalid"
    NAME_INVALID = HTTPStatus.BAD_REQUEST, "invalid repository name"
    NAME_UNKNOWN = HTTPStatus.NOT_FOUND, "repository name not known to registry"
    SIZE_INVALID = HTTPStatus.BAD_REQUEST, "provided length did not match content length"
    UNAUTHORIZED = HTTPStatus.UNAUTHORIZED, "authentication required"
    DENIED = HTTPStatus.FORBIDDEN, "requested access to the resource is denied"
    UNSUPPORTED = HTTPStatus.METHOD_NOT_ALLOWED, "the operation is unsupported"
    TOOMANYREQUESTS = HTTPStatus.TOO_MANY_REQUESTS, "too many requests"
    RANGE_INVALID = HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, "requested range not satisfiable"
    # Distribution's own codes for a mirror that cannot reach its upstream.
    UNAVAILABLE = HTTPStatus.SERVICE_UNAVAILABLE, "service unavailable"
    UNKNOWN = HTTPStatus.INTERNAL_SERVER_ERROR, "unknown error"

    @property
    def status(self) -> int:
        return int(self.value[0])

    @property
    def message(self) -> str:
        return str(self.value[1])


class RegistryError(Exception):
    """An error the client sees as an OCI error body; `status` may override the code's own."""

    def __init__(
        self,
        code: ErrorCode,
        message: str | None = None,
        *,
        detail: Any = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.code = code
        self.message = message or code.message
        self.detail = detail
        self.status = status or code.status
        self.headers = headers or {}
        super().__init__(f"{code.name}: {self.message}")

    def body(self) -> bytes:
        error: dict[str, Any] = {"code": self.code.name, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}).encode()


# digest := algorithm ":" encoded; sha256 is 64 and sha512 128 lower-case hex characters.
_ENCODED_LENGTH: Final = {"sha256": 64, "sha512": 128}
_HEX: Final = re.compile(r"[a-f0-9]+")


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    encoded: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        algorithm, sep, encoded = text.partition(":")
        length = _ENCODED_LENGTH.get(algorithm)
        if not sep or length is None:
            raise RegistryError(ErrorCode.DIGEST_INVALID, f"unsupported digest {text[:80]!r}")
        if len(encoded) != length or not _HEX.fullmatch(encoded):
            raise RegistryError(ErrorCode.DIGEST_INVALID, f"invalid digest {text[:80]!r}")
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> Any:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.encoded}"


# name := [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*
_COMPONENT: Final = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME: Final = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
# Distribution caps the whole name at 255 characters.
_NAME_MAX: Final = 255


@dataclass(frozen=True, slots=True)
class Repository:
    name: str

    @classmethod
    def parse(cls, text: str) -> Repository:
        if len(text) > _NAME_MAX or not _NAME.fullmatch(text):
            raise RegistryError(ErrorCode.NAME_INVALID, f"invalid repository name {text[:80]!r}")
        return cls(text)

    def __str__(self) -> str:
        return self.name


# tag := [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}
_TAG: Final = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")


@dataclass(frozen=True, slots=True)
class Tag:
    name: str

    @classmethod
    def parse(cls, text: str) -> Tag:
        # No manifest can have a name outside the grammar, so asking for one is asking for an
        # unknown manifest: 404 MANIFEST_UNKNOWN, as Distribution answers and the OCI
        # conformance suite expects (`manifests/.INVALID_MANIFEST_NAME`).
        if not _TAG.fullmatch(text):
            raise RegistryError(
                ErrorCode.MANIFEST_UNKNOWN, f"invalid tag {text[:80]!r}: neither a tag nor a digest"
            )
        return cls(text)

    def __str__(self) -> str:
        return self.name


Reference = Tag | Digest


def parse_reference(text: str) -> Reference:
    """A manifest reference is a digest when it has a colon, else a tag.

    A malformed digest is 400 DIGEST_INVALID; any other text that is not a tag is 404
    MANIFEST_UNKNOWN (see `Tag.parse`).
    """
    if ":" in text:
        return Digest.parse(text)
    return Tag.parse(text)


class MediaType:
    OCI_MANIFEST: ClassVar[str] = "application/vnd.oci.image.manifest.v1+json"
    OCI_INDEX: ClassVar[str] = "application/vnd.oci.image.index.v1+json"
    DOCKER_MANIFEST: ClassVar[str] = "application/vnd.docker.distribution.manifest.v2+json"
    DOCKER_LIST: ClassVar[str] = "application/vnd.docker.distribution.manifest.list.v2+json"
    DOCKER_SCHEMA1: ClassVar[str] = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    INDEXES: ClassVar[frozenset[str]] = frozenset({OCI_INDEX, DOCKER_LIST})
    MANIFESTS: ClassVar[frozenset[str]] = frozenset(
        {OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST, DOCKER_SCHEMA1}
    )


def manifest_media_type(body: bytes) -> str:
    """The media type of manifest bytes: `mediaType` when present, else inferred.

    OCI manifests may omit `mediaType` (image-spec, "Image Manifest"); like Distribution we infer
    an index from `manifests` and an image manifest from `config`.
    """
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        return "application/octet-stream"
    if not isinstance(document, dict):
        return "application/octet-stream"
    media_type = document.get("mediaType")
    if isinstance(media_type, str) and media_type:
        return media_type
    if document.get("schemaVersion") == 1:
        return MediaType.DOCKER_SCHEMA1
    if "manifests" in document:
        return MediaType.OCI_INDEX
    return MediaType.OCI_MANIFEST


def accepted_media_types(accept_lines: list[str]) -> frozenset[str]:
    """The set of media types named by every `Accept` line (clients send one or many lines)."""
    types: set[str] = set()
    for line in accept_lines:
        for item in line.split(","):
            media_type = item.split(";", 1)[0].strip().lower()
            if media_type:
                types.add(media_type)
    return frozenset(types)


def accepts(accepted: frozenset[str], media_type: str) -> bool:
    """Whether a client accepting `accepted` may be handed `media_type`.

    No Accept header means the client takes what it is given, as with Distribution.
    """
    if not accepted or "*/*" in accepted or media_type in accepted:
        return True
    return media_type.split("/", 1)[0] + "/*" in accepted


def manifest_types(accepted: frozenset[str]) -> frozenset[str]:
    """The manifest media types a client admits: all a tag's answer may depend on.

    Every client spells Accept differently (one line or many, any order, extra types such as
    `application/json`), so the raw header would make every client a stranger to the others.
    No Accept at all, `*/*` or `application/*` admit every manifest type (RFC 9110, 12.5.1);
    types that are no manifest type are ignored.
    """
    if not accepted or "*/*" in accepted or "application/*" in accepted:
        return MediaType.MANIFESTS
    return accepted & MediaType.MANIFESTS


@dataclass(frozen=True, slots=True)
class ApiPath:
    """A parsed `/v2/...` request path: which endpoint, for which repository and reference."""

    endpoint: str  # ping | manifest | blob | tags | referrers | unsupported
    repository: Repository | None = None
    reference: Reference | None = None

    @property
    def digest(self) -> Digest:
        assert isinstance(self.reference, Digest)
        return self.reference


def parse_api_path(tail: str) -> ApiPath:
    """Parse what follows `/v2/` in a raw (still percent-encoded) request path.

    The repository name may itself contain slashes, so the endpoint is read from the end:
    `<name>/manifests/<reference>`, `<name>/blobs/<digest>`, `<name>/tags/list`,
    `<name>/referrers/<digest>`. Writes (`blobs/uploads`) and `_catalog` are unsupported by a
    read-only mirror. Percent-encoding is never valid in any of these grammars, so a `%` (as in
    `%2e%2e`) fails the name grammar like any other bad character.
    """
    if tail == "":
        return ApiPath("ping")
    if tail in ("_catalog", "_catalog/"):
        return ApiPath("unsupported")
    parts = tail.split("/")
    if len(parts) >= 3 and parts[-2] == "manifests":
        return ApiPath(
            "manifest", Repository.parse("/".join(parts[:-2])), parse_reference(parts[-1])
        )
    if len(parts) >= 3 and parts[-2] == "tags" and parts[-1] == "list":
        return ApiPath("tags", Repository.parse("/".join(parts[:-2])))
    if "blobs" in parts[1:] and "uploads" in parts[parts.index("blobs", 1) :]:
        return ApiPath("unsupported")
    if len(parts) >= 3 and parts[-2] == "blobs":
        return ApiPath("blob", Repository.parse("/".join(parts[:-2])), Digest.parse(parts[-1]))
    if len(parts) >= 3 and parts[-2] == "referrers":
        return ApiPath("referrers", Repository.parse("/".join(parts[:-2])), Digest.parse(parts[-1]))
    raise RegistryError(ErrorCode.UNSUPPORTED, "unknown API endpoint", status=HTTPStatus.NOT_FOUND)
