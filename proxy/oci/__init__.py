"""The OCI distribution domain, pure values with no I/O and no aiohttp:

    names.py       Digest, Repository, Tag: parsed once, valid from then on
    media.py       media types, Accept negotiation, descriptors and the manifest-tree walk
    api.py         the `/v2/` endpoints, one path type each; how the cache answered
    references.py  image references as people write them (`nginx`, `ghcr.io/org/app:1.2`)
    dockerhub.py   Docker Hub's naming rules

The names most code needs are importable from `proxy.oci` itself.
"""

from proxy.oci.api import (
    ApiPath,
    BlobPath,
    CacheResult,
    Endpoint,
    ManifestPath,
    Ping,
    ReferrersPath,
    RepositoryPath,
    TagsPath,
    Unsupported,
    parse_api_path,
)
from proxy.oci.media import (
    OCTET_STREAM,
    Descriptor,
    MediaType,
    accepted_media_types,
    manifest_media_type,
    manifest_types,
)
from proxy.oci.names import Digest, Reference, Repository, Tag, parse_reference
from proxy.oci.references import ImageReference, InvalidReference

__all__ = [
    "OCTET_STREAM",
    "ApiPath",
    "BlobPath",
    "CacheResult",
    "Descriptor",
    "Digest",
    "Endpoint",
    "ImageReference",
    "InvalidReference",
    "ManifestPath",
    "MediaType",
    "Ping",
    "Reference",
    "ReferrersPath",
    "Repository",
    "RepositoryPath",
    "Tag",
    "TagsPath",
    "Unsupported",
    "accepted_media_types",
    "manifest_media_type",
    "manifest_types",
    "parse_api_path",
    "parse_reference",
]
