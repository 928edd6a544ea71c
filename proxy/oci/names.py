"""Names in the OCI distribution domain: digests, repository names, tags, references.

Constructors parse and reject bad input, so code that holds a `Digest` or a `Repository` never
checks it again. Grammars are quoted from the OCI distribution spec ("Pulling manifests")
beside the regexes that implement them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Final

from proxy.errors import ErrorCode, RegistryError

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
