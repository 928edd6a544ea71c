"""Media types, content negotiation, and the one walk over a manifest tree.

What a manifest is comes from its bytes (`manifest_media_type`), never from a side file; what a
client may be given comes from its `Accept` lines (`manifest_types`); what an image consists of
comes from its descriptors (`index_children`, `image_blobs`), as image-spec draws them::

    index (OCI index, Docker list)  --manifests-->  image manifest  --config, layers-->  blobs

Pure values, no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum, nonmember
from typing import Any

from proxy.errors import ErrorCode, RegistryError
from proxy.oci.names import Digest

OCTET_STREAM = "application/octet-stream"


class MediaType(StrEnum):
    """The manifest media types a mirror serves (image-spec; Docker's schema 2 and 1)."""

    OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
    OCI_INDEX = "application/vnd.oci.image.index.v1+json"
    DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
    DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
    DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"

    # Members compare and hash as their strings, so these sets answer for plain strings too.
    INDEXES = nonmember(frozenset({OCI_INDEX, DOCKER_LIST}))
    MANIFESTS = nonmember(
        frozenset({OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST, DOCKER_SCHEMA1})
    )


def manifest_media_type(body: bytes) -> str:
    """The media type of manifest bytes: `mediaType` when present, else inferred.

    OCI manifests may omit `mediaType` (image-spec, "Image Manifest"); like Distribution we infer
    an index from `manifests` and an image manifest from `config`.
    """
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        return OCTET_STREAM
    if not isinstance(document, dict):
        return OCTET_STREAM
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
class Descriptor:
    """What a manifest says of content it references (image-spec, "Descriptors")."""

    digest: Digest
    size: int
    platform: Any = None  # an index entry's `platform` object, as the index has it


def manifest_document(body: bytes) -> dict[str, Any]:
    """A manifest's JSON object; MANIFEST_INVALID when it is not one."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        document = None
    if not isinstance(document, dict):
        raise RegistryError(ErrorCode.MANIFEST_INVALID, "manifest is not a JSON object")
    return document


def is_index(body: bytes) -> bool:
    return manifest_media_type(body) in MediaType.INDEXES


def index_children(document: dict[str, Any]) -> list[Descriptor]:
    """The platform manifests an index lists, with their `platform` objects."""
    return _descriptors(document.get("manifests"))


def is_image_manifest(document: dict[str, Any]) -> bool:
    """Schema 2 or OCI, with a config: what has blobs to fetch (schema 1 has none of ours)."""
    return document.get("schemaVersion") == 2 and isinstance(document.get("config"), dict)


def image_blobs(document: dict[str, Any]) -> list[Descriptor]:
    """The config and layers of an image manifest."""
    layers = document.get("layers", [])
    return _descriptors([document.get("config"), *(layers if isinstance(layers, list) else [])])


def _descriptors(items: Any) -> list[Descriptor]:
    """Every descriptor in a list (what is not an object is no descriptor and skipped); one
    without a size or with a bad digest is MANIFEST_INVALID."""
    found = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        if not isinstance(item.get("size"), int):
            raise RegistryError(ErrorCode.MANIFEST_INVALID, "a descriptor has no size")
        try:
            digest = Digest.parse(str(item.get("digest")))
        except RegistryError:
            bad = str(item.get("digest"))[:80]
            raise RegistryError(
                ErrorCode.MANIFEST_INVALID, f"bad descriptor digest {bad!r}"
            ) from None
        found.append(Descriptor(digest, int(item["size"]), item.get("platform")))
    return found
