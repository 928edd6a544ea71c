"""An in-process fake upstream registry that counts every request and misbehaves on demand.

`FakeRegistry` holds content (blobs, manifests, tags) in memory and builds an aiohttp
`web.Application` serving the read side of the OCI distribution API the way CNCF Distribution
does. Every request is recorded before anything else happens, so a test can assert exactly what
the mirror sent upstream. Faults are plain attributes, settable at any time during a test.

`FakeUpstreamServer` runs a registry on 127.0.0.1; `stop()` closes the listening socket, so the
URL then refuses connections ("upstream down"), and `start()` binds the same port again.

Order in which a request is handled::

    record -> black_hole -> down (503) -> fail_next -> huge_bodies -> auth (/v2/ only) -> route
        /v2/                                  ping
        /v2/<name>/manifests/<tag|digest>     negotiation by Accept, then the body pipeline
        /v2/<name>/blobs/<digest>             redirect (CDN / loop), Range, then the body pipeline
        /v2/<name>/tags/list                  sorted, paginated with Link (unless ignore_pagination)
        /token                                bearer token endpoint
        /cdn/<digest>                         the "other host" a blob redirect points at

Body pipeline (keyed by the digest of the stored content)::

    ignore_range / ranged_variant -> lie_about_digest -> Range slice -> wrong_content_length
        -> chunks -> gate / slow between chunks -> truncate (close) / reset_after / cuts (RST)

`truncate`, `reset_after` and `cuts` name a byte of the blob, not of the response: a ranged
request that starts past a persistent cut gets no byte at all (the link always breaks there),
while each position in `cuts` breaks only the first response carrying that byte.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import secrets
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from harness.digests import sha256_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
# Every manifest type, in the comma-joined form containerd sends on tag resolution.
ACCEPT_ALL_MANIFESTS = ", ".join(
    [DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX, "*/*"]
)

SERVICE = "fake-registry"
DEFAULT_PLATFORM = "linux/amd64"

AuthMode = Literal["bearer", "basic"]

# Distribution's path grammar is looser than this, but names may contain "/" so the repository
# part is greedy and the last segment decides the route.
_MANIFEST_PATH = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)$")
_BLOB_PATH = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>[^/]+)$")
_TAGS_PATH = re.compile(r"^/v2/(?P<name>.+)/tags/list$")
_REFERRERS_PATH = re.compile(r"^/v2/(?P<name>.+)/referrers/(?P<digest>[a-z0-9]+:[a-f0-9]+)$")
_CDN_PATH = re.compile(r"^/cdn/(?P<digest>[^/]+)$")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$|^sha512:[a-f0-9]{128}$")
_RANGE = re.compile(r"^bytes=(?P<first>\d*)-(?P<last>\d*)$")


def canonical_json(value: Any) -> bytes:
    """Compact JSON; the digest of a manifest is over exactly the bytes served."""
    return json.dumps(value, separators=(",", ":"), sort_keys=False).encode()


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it. Headers keep every line, in order."""

    method: str
    path: str
    query: dict[str, str]
    headers: list[tuple[str, str]]

    def get_all(self, name: str) -> list[str]:
        """Every value of a header (case-insensitive), one per header line."""
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None


@dataclass(frozen=True)
class Image:
    """An image manifest added by `FakeRegistry.add_image`, with the digests it references."""

    manifest_digest: str
    manifest_bytes: bytes
    media_type: str
    config_digest: str
    layer_digests: list[str]
    config_bytes: bytes = b""
    platform: str = DEFAULT_PLATFORM

    @property
    def size(self) -> int:
        return len(self.manifest_bytes)


@dataclass
class Gate:
    """Pause a body after `after_bytes` bytes until the test releases it.

    The fake sets `reached` once those bytes are written to the socket, then waits on `release`.
    Tests await `reached` instead of sleeping, so "a follower got bytes before the leader
    finished" is proved deterministically. Once released it stays open for later requests.
    """

    after_bytes: int = 0
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    # How many responses reached the pause point; a second request shows up here.
    hits: int = 0


@dataclass
class RateLimit:
    """Docker Hub's pull quota as its answers state it: `limit` per `window` seconds,
    `remaining` of them left, counted against `source` (an IP address when anonymous)."""

    limit: int = 100
    remaining: int = 100
    window: int = 21600
    source: str = "203.0.113.7"

    def answer(self, method: str) -> dict[str, str]:
        if method == "GET":
            self.remaining = max(0, self.remaining - 1)
        return {
            "ratelimit-limit": f"{self.limit};w={self.window}",
            "ratelimit-remaining": f"{self.remaining};w={self.window}",
            "docker-ratelimit-source": self.source,
        }


@dataclass
class HugeBody:
    """An endless document: `size` bytes of JSON-looking filler for every GET whose path
    contains the key it is registered under in `FakeRegistry.huge_bodies`.

    `sent` counts the bytes written before the client hung up (or all of them), and `done` is set
    when the handler stops, so a test can prove a client stopped reading early.
    """

    size: int
    content_type: str = OCI_MANIFEST
    declare_length: bool = True
    sent: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Fault:
    path_contains: str
    status: int
    remaining: int
    headers: dict[str, str]
    method: str | None


@dataclass(frozen=True)
class _Manifest:
    body: bytes
    media_type: str
    digest: str


@dataclass
class _Token:
    repositories: frozenset[str]
    expires_at: float


class _Unsatisfiable(Exception):
    """A Range the blob cannot satisfy (RFC 9110 §15.5.17: 416)."""


_ERROR_CODES: dict[int, str] = {
    400: "UNKNOWN",
    401: "UNAUTHORIZED",
    403: "DENIED",
    405: "UNSUPPORTED",
    429: "TOOMANYREQUESTS",
}


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"errors": [{"code": code, "message": message, "detail": None}]}
    return web.json_response(body, status=status, headers=headers)


def _error_code_for(status: int, path: str) -> str:
    """The OCI error code a registry would pair with an injected status on this path."""
    if status == 404:
        if _MANIFEST_PATH.match(path):
            return "MANIFEST_UNKNOWN"
        if _BLOB_PATH.match(path):
            return "BLOB_UNKNOWN"
        return "NAME_UNKNOWN"
    return _ERROR_CODES.get(status, "UNKNOWN")


def _accepted_types(request: web.BaseRequest) -> set[str]:
    """All media types from every Accept line, without parameters.

    containers/image sends one Accept line per type, containerd one comma-joined line; reading
    only the first line is the bug REFERENCE.md warns about.
    """
    types: set[str] = set()
    for line in request.headers.getall("Accept", []):
        for item in line.split(","):
            media_type = item.split(";", 1)[0].strip().lower()
            if media_type:
                types.add(media_type)
    return types


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Parse a single `Range: bytes=...` into an inclusive (first, last) pair.

    Returns None when the header should be ignored (RFC 9110 §14.2 lets a server ignore
    ranges it does not support, e.g. several ranges or another unit), raises _Unsatisfiable
    for a range the conformance tests expect a 416 for (first > last, first past the end).
    """
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first_s, last_s = match["first"], match["last"]
    if not first_s and not last_s:
        return None
    if not first_s:
        # Suffix range: the last N bytes (RFC 9110 §14.1.3).
        suffix = int(last_s)
        if suffix == 0 or size == 0:
            raise _Unsatisfiable
        return max(0, size - suffix), size - 1
    first = int(first_s)
    last = int(last_s) if last_s else size - 1
    if first > last or first >= size:
        raise _Unsatisfiable
    return first, min(last, size - 1)


class FakeRegistry:
    """In-memory OCI registry with request recording and fault injection. See module docstring."""

    def __init__(self) -> None:
        # Content.
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, dict[str, _Manifest]] = {}
        self.tags: dict[str, dict[str, str]] = {}
        # digest -> the referrers index body (OCI 1.1) served for it.
        self.referrers: dict[str, bytes] = {}

        # Observation.
        self.requests: list[RecordedRequest] = []
        self.cdn_saw_authorization = False
        self.cdn_authorization_count = 0

        # Auth.
        self.auth: AuthMode | None = None
        self.users: dict[str, str] = {}
        self.allow_anonymous = True
        self.private_repos: set[str] = set()
        self.token_expires_in = 300
        self.tokens_issued = 0
        self.token_endpoint_down = False
        # Overrides the realm URL; by default it is this server's own /token.
        self.token_realm: str | None = None
        self._tokens: dict[str, _Token] = {}
        # Answer 404 NAME_UNKNOWN instead of 401 for a private repository the client may not
        # read, as registries that hide private repositories do.
        self.hide_private = False
        # Like Distribution, serve a blob only through a repository it was pushed to
        # (`add_image`); otherwise any known repository serves any blob.
        self.link_blobs = False
        self.blob_repos: dict[str, set[str]] = {}

        # Faults.
        self.down = False
        self.black_hole = False
        # Set when a request has entered the black hole, so a test can await that moment.
        self.black_hole_reached = asyncio.Event()
        # A tag on an index asked for by a client that takes no index: True serves the
        # linux/amd64 manifest (Distribution, for a Docker manifest list); False answers 404
        # (Distribution, for an OCI index: "OCI index found, but accept header does not support").
        self.index_fallback = True
        self.blob_redirect_to: str | None = None
        self.redirect_loop = False
        self.lie_about_digest: set[str] = set()
        self.truncate: dict[str, int] = {}
        self.wrong_content_length: set[str] = set()
        self.reset_after: dict[str, int] = {}
        # Blob byte positions, each breaking (RST) the first response that carries that byte.
        self.cuts: dict[str, list[int]] = {}
        # Answer Range requests for these digests with the whole body (200).
        self.ignore_range: set[str] = set()
        # Answer Range requests for a digest from other bytes with another ETag: the blob
        # changed upstream (or a part of it is wrong) between the first request and a resume.
        self.ranged_variant: dict[str, tuple[bytes, str]] = {}
        self.slow: dict[str, float] = {}
        self.gate: dict[str, Gate] = {}
        self.chunk_size = 64 * 1024
        self._faults: list[_Fault] = []
        # tags/list answers every tag whatever `n` and `last` say, as Distribution 2.8 does.
        self.ignore_pagination = False
        # Path substring -> an endless body served instead of the route (see HugeBody).
        self.huge_bodies: dict[str, HugeBody] = {}

        # Docker Hub's pull quota: when set, every manifest answer carries its headers
        # (ratelimit-limit, ratelimit-remaining, docker-ratelimit-source) and a manifest GET
        # spends one request (a HEAD is free, as on Docker Hub).
        self.rate_limit: RateLimit | None = None

        # Set at shutdown so handlers parked in a black hole or a gate give up at once
        # instead of holding the server's graceful shutdown for its whole timeout.
        self._closing = asyncio.Event()

    # ------------------------------------------------------------------ content

    def add_blob(self, data: bytes) -> str:
        digest = sha256_digest(data)
        self.blobs[digest] = data
        return digest

    def remove_blob(self, digest: str) -> None:
        self.blobs.pop(digest, None)

    def add_manifest(
        self, repo: str, body: bytes, media_type: str, tags: Iterable[str] = ()
    ) -> str:
        digest = sha256_digest(body)
        self.manifests.setdefault(repo, {})[digest] = _Manifest(body, media_type, digest)
        self.tags.setdefault(repo, {})
        for tag in tags:
            self.tag(repo, tag, digest)
        return digest

    def tag(self, repo: str, tag: str, digest: str) -> None:
        if digest not in self.manifests.get(repo, {}):
            raise KeyError(f"{repo}@{digest} is not a manifest of this registry")
        self.tags.setdefault(repo, {})[tag] = digest

    def untag(self, repo: str, tag: str) -> None:
        self.tags.get(repo, {}).pop(tag, None)

    def add_image(
        self,
        repo: str,
        tag: str | None,
        layers: list[bytes],
        *,
        media_type: str = OCI_MANIFEST,
        platform: str = DEFAULT_PLATFORM,
    ) -> Image:
        """Store layers, a config blob and an image manifest; tag it unless `tag` is None."""
        docker = media_type == DOCKER_MANIFEST
        config_type = DOCKER_CONFIG if docker else OCI_CONFIG
        layer_type = DOCKER_LAYER if docker else OCI_LAYER
        os_name, arch, variant = _split_platform(platform)
        config: dict[str, Any] = {"architecture": arch, "os": os_name}
        if variant:
            config["variant"] = variant
        diff_ids = [sha256_digest(layer) for layer in layers]
        config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
        config["config"] = {}
        config_bytes = canonical_json(config)
        config_digest = self.add_blob(config_bytes)
        layer_digests = [self.add_blob(layer) for layer in layers]
        for digest in (config_digest, *layer_digests):
            self.blob_repos.setdefault(digest, set()).add(repo)
        manifest = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {
                "mediaType": config_type,
                "digest": config_digest,
                "size": len(config_bytes),
            },
            "layers": [
                {"mediaType": layer_type, "digest": d, "size": len(layer)}
                for d, layer in zip(layer_digests, layers, strict=True)
            ],
        }
        body = canonical_json(manifest)
        digest = self.add_manifest(repo, body, media_type, () if tag is None else (tag,))
        return Image(
            manifest_digest=digest,
            manifest_bytes=body,
            media_type=media_type,
            config_digest=config_digest,
            layer_digests=layer_digests,
            config_bytes=config_bytes,
            platform=platform,
        )

    def add_index(
        self,
        repo: str,
        tag: str | None,
        platforms: dict[str, Image],
        *,
        media_type: str = OCI_INDEX,
    ) -> str:
        """Store an index (or Docker manifest list) over `platforms`, e.g. {"linux/arm64": img}.

        The image manifests are stored in `repo` too, since clients fetch them by digest there.
        """
        entries = []
        for platform, image in platforms.items():
            self.add_manifest(repo, image.manifest_bytes, image.media_type)
            os_name, arch, variant = _split_platform(platform)
            plat: dict[str, str] = {"architecture": arch, "os": os_name}
            if variant:
                plat["variant"] = variant
            entries.append(
                {
                    "mediaType": image.media_type,
                    "digest": image.manifest_digest,
                    "size": image.size,
                    "platform": plat,
                }
            )
        body = canonical_json({"schemaVersion": 2, "mediaType": media_type, "manifests": entries})
        return self.add_manifest(repo, body, media_type, () if tag is None else (tag,))

    # -------------------------------------------------------------- observation

    def count(self, method: str | None = None, path_contains: str = "") -> int:
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method.upper()) and path_contains in r.path
        )

    def clear_requests(self) -> None:
        self.requests.clear()
        self.cdn_saw_authorization = False
        self.cdn_authorization_count = 0

    # ------------------------------------------------------------------- faults

    def fail_next(
        self,
        path_contains: str,
        status: int,
        times: int = 1,
        headers: dict[str, str] | None = None,
        *,
        method: str | None = None,
    ) -> None:
        """Answer the next `times` matching requests with `status` and an OCI error body."""
        self._faults.append(
            _Fault(path_contains, status, times, dict(headers or {}), method and method.upper())
        )

    def expire_tokens(self) -> None:
        """Make every issued token invalid, as if `expires_in` had passed (no sleeping)."""
        for token in self._tokens.values():
            token.expires_at = 0.0

    def close(self) -> None:
        """Release handlers parked in black holes and gates; called by FakeUpstreamServer.stop."""
        self._closing.set()

    def reopen(self) -> None:
        """Undo close() before serving again."""
        self._closing.clear()

    # ---------------------------------------------------------------------- app

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_response_prepare.append(_add_api_version)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                headers=list(request.headers.items()),
            )
        )
        if self.black_hole:
            self.black_hole_reached.set()
            await self._closing.wait()
            _drop(request)
            return web.Response()
        if self.down:
            return _error(503, "UNAVAILABLE", "upstream is down")
        fault = self._take_fault(request)
        if fault is not None:
            code = _error_code_for(fault.status, request.path)
            return _error(fault.status, code, f"injected {fault.status}", fault.headers)
        for key, huge in self.huge_bodies.items():
            if key in request.path and request.method == "GET":
                return await self._send_huge(request, huge)

        path = request.path
        if path == "/token":
            return await self._token(request)
        if match := _CDN_PATH.match(path):
            return await self._cdn(request, match["digest"])
        if not path.startswith("/v2/"):
            return _error(404, "NOT_FOUND", "not a registry path")

        denied = self._authorize(request)
        if denied is not None:
            return denied
        if request.method not in ("GET", "HEAD"):
            return _error(405, "UNSUPPORTED", "this fake registry is read-only")
        if path == "/v2/":
            return web.json_response({})
        if match := _MANIFEST_PATH.match(path):
            return await self._manifest(request, match["name"], match["ref"])
        if match := _BLOB_PATH.match(path):
            return await self._blob(request, match["name"], match["digest"])
        if (match := _TAGS_PATH.match(path)) and request.method == "GET":
            return self._tags_list(request, match["name"])
        if (match := _REFERRERS_PATH.match(path)) and match["digest"] in self.referrers:
            return web.Response(body=self.referrers[match["digest"]], content_type=OCI_INDEX)
        return _error(404, "NOT_FOUND", "unknown route")

    def _take_fault(self, request: web.Request) -> _Fault | None:
        for fault in self._faults:
            if fault.remaining <= 0 or fault.path_contains not in request.path:
                continue
            if fault.method is not None and fault.method != request.method:
                continue
            fault.remaining -= 1
            return fault
        return None

    # --------------------------------------------------------------------- auth

    def _authorize(self, request: web.Request) -> web.Response | None:
        """None when the request may proceed, else the 401 a registry would send."""
        repo = _repository_of(request.path)
        if self.auth == "basic":
            if self._basic_user(request) is not None:
                return None
            challenge = f'Basic realm="{SERVICE}"'
            return _error(401, "UNAUTHORIZED", "authentication required", _www(challenge))
        if self.auth != "bearer":
            return None
        realm = self.token_realm or f"{request.scheme}://{request.host}/token"
        challenge = f'Bearer realm="{realm}",service="{SERVICE}"'
        if repo is not None:
            # Distribution names the scope on resource requests only, never on the ping.
            challenge += f',scope="repository:{repo}:pull"'
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return _error(401, "UNAUTHORIZED", "authentication required", _www(challenge))
        token = self._tokens.get(header.removeprefix("Bearer ").strip())
        if token is None or token.expires_at <= time.monotonic():
            challenge += ',error="invalid_token"'
            return _error(401, "UNAUTHORIZED", "invalid or expired token", _www(challenge))
        if repo is not None and repo not in token.repositories:
            if self.hide_private:
                return _error(404, "NAME_UNKNOWN", f"repository {repo} not known to registry")
            challenge += ',error="insufficient_scope"'
            return _error(401, "UNAUTHORIZED", "insufficient scope", _www(challenge))
        return None

    def _basic_user(self, request: web.BaseRequest) -> str | None:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return None
        try:
            decoded = base64.b64decode(header.removeprefix("Basic ").strip()).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, _, password = decoded.partition(":")
        return self._check_password(user, password)

    def _check_password(self, user: str, password: str) -> str | None:
        known = self.users.get(user)
        if known is not None and secrets.compare_digest(known, password):
            return user
        return None

    async def _token(self, request: web.Request) -> web.Response:
        """Docker token endpoint: GET with Basic credentials, or POST OAuth2 password grant."""
        if self.token_endpoint_down:
            return _error(503, "UNAVAILABLE", "token service is down")
        if request.method == "GET":
            scopes = request.query.getall("scope", [])
            user = self._basic_user(request)
            sent_credentials = "Authorization" in request.headers
        elif request.method == "POST":
            # OAuth2 password grant, which containerd tries first when it has credentials.
            form = await request.post()
            scopes = [str(s) for s in form.getall("scope", [])]
            name, password = form.get("username"), form.get("password")
            user = None
            if isinstance(name, str) and isinstance(password, str):
                user = self._check_password(name, password)
            sent_credentials = name is not None
        else:
            return _error(405, "UNSUPPORTED", "token endpoint takes GET or POST")
        if user is None and (sent_credentials or not self.allow_anonymous):
            return _error(401, "UNAUTHORIZED", "bad credentials", _www(f'Basic realm="{SERVICE}"'))

        granted: set[str] = set()
        for scope in scopes:
            # One scope parameter may hold several space-separated scopes.
            for one in scope.split():
                kind, _, rest = one.partition(":")
                repo, _, actions = rest.rpartition(":")
                if kind != "repository" or "pull" not in actions.split(","):
                    continue
                if user is not None or repo not in self.private_repos:
                    granted.add(repo)
        token = secrets.token_urlsafe(16)
        self._tokens[token] = _Token(
            frozenset(granted), time.monotonic() + max(self.token_expires_in, 0)
        )
        self.tokens_issued += 1
        return web.json_response(
            {"token": token, "access_token": token, "expires_in": self.token_expires_in}
        )

    # ---------------------------------------------------------------- manifests

    async def _manifest(self, request: web.Request, repo: str, ref: str) -> web.StreamResponse:
        stored = self.manifests.get(repo)
        if stored is None:
            return _error(404, "NAME_UNKNOWN", f"repository {repo} not known to registry")
        by_tag = ":" not in ref
        if by_tag:
            digest = self.tags.get(repo, {}).get(ref)
        else:
            if not _DIGEST.match(ref):
                return _error(400, "DIGEST_INVALID", f"invalid digest {ref}")
            digest = ref
        manifest = stored.get(digest) if digest is not None else None
        if manifest is None:
            return _error(404, "MANIFEST_UNKNOWN", f"manifest unknown: {ref}")
        quota = self.rate_limit.answer(request.method) if self.rate_limit is not None else {}
        chosen = self._negotiate(repo, manifest, by_tag, _accepted_types(request))
        if chosen is None:
            return _error(
                404,
                "MANIFEST_UNKNOWN",
                f"{manifest.media_type} found, but the Accept header does not allow it",
            )
        etag = f'"{chosen.digest}"'
        headers = {
            "Content-Type": chosen.media_type,
            "Docker-Content-Digest": chosen.digest,
            "ETag": etag,
            **quota,
        }
        if etag in request.headers.getall("If-None-Match", []):
            return web.Response(status=304, headers=headers)
        return await self._send(request, chosen.digest, chosen.body, headers)

    def _negotiate(
        self, repo: str, manifest: _Manifest, by_tag: bool, accept: set[str]
    ) -> _Manifest | None:
        """What Distribution serves for this Accept set, or None (404).

        No Accept header or */* accepts anything. A tag on an index, asked for by a client that
        does not accept indexes, resolves to the linux/amd64 manifest; by digest it cannot, since
        the bytes must match the digest asked for.
        """

        def acceptable(media_type: str) -> bool:
            return not accept or "*/*" in accept or media_type in accept

        if acceptable(manifest.media_type):
            return manifest
        if not by_tag or manifest.media_type not in INDEX_MEDIA_TYPES or not self.index_fallback:
            return None
        for entry in json.loads(manifest.body).get("manifests", []):
            plat = entry.get("platform", {})
            if (plat.get("os"), plat.get("architecture")) == ("linux", "amd64"):
                child = self.manifests[repo].get(entry["digest"])
                if child is not None and acceptable(child.media_type):
                    return child
        return None

    # -------------------------------------------------------------------- blobs

    async def _blob(self, request: web.Request, repo: str, digest: str) -> web.StreamResponse:
        # Blobs are global here (Distribution links them per repository); the repository only
        # has to be one the registry knows, so a typo still yields NAME_UNKNOWN.
        if repo not in self.manifests:
            return _error(404, "NAME_UNKNOWN", f"repository {repo} not known to registry")
        if not _DIGEST.match(digest):
            return _error(400, "DIGEST_INVALID", f"invalid digest {digest}")
        data = self.blobs.get(digest)
        if data is None or (self.link_blobs and repo not in self.blob_repos.get(digest, ())):
            return _error(404, "BLOB_UNKNOWN", f"blob unknown to registry: {digest}")
        if request.method == "GET" and self.redirect_loop:
            raise web.HTTPTemporaryRedirect(location=str(request.url))
        if request.method == "GET" and self.blob_redirect_to is not None:
            # Like S3/CloudFront behind Docker Hub: a signed URL on another host. A client must
            # follow it without sending its registry credentials there.
            target = self.blob_redirect_to.rstrip("/")
            sig = secrets.token_hex(8)
            raise web.HTTPTemporaryRedirect(location=f"{target}/cdn/{digest}?sig={sig}")
        return await self._serve_blob(request, digest, data)

    async def _cdn(self, request: web.Request, digest: str) -> web.StreamResponse:
        if "Authorization" in request.headers:
            self.cdn_saw_authorization = True
            self.cdn_authorization_count += 1
        if request.method not in ("GET", "HEAD"):
            return _error(405, "UNSUPPORTED", "the CDN only serves GET")
        data = self.blobs.get(digest)
        if data is None:
            return _error(404, "BLOB_UNKNOWN", f"no such object: {digest}")
        return await self._serve_blob(request, digest, data)

    async def _serve_blob(
        self, request: web.Request, digest: str, data: bytes
    ) -> web.StreamResponse:
        headers = {
            "Content-Type": "application/octet-stream",
            "Docker-Content-Digest": digest,
            "Accept-Ranges": "bytes",
            "ETag": f'"{digest}"',
        }
        range_header = request.headers.get("Range")
        if range_header is not None and digest in self.ignore_range:
            range_header = None
        if range_header is not None and digest in self.ranged_variant:
            data, headers["ETag"] = self.ranged_variant[digest]
        span = None
        if range_header is not None:
            try:
                span = _parse_range(range_header, len(data))
            except _Unsatisfiable:
                # RFC 9110 §14.4: a 416 carries the complete length as "bytes */<size>".
                extra = {"Content-Range": f"bytes */{len(data)}", "Accept-Ranges": "bytes"}
                return _error(416, "RANGE_INVALID", "requested range not satisfiable", extra)
        return await self._send(request, digest, data, headers, span)

    # -------------------------------------------------------------- tags/list

    def _tags_list(self, request: web.Request, repo: str) -> web.Response:
        if repo not in self.manifests:
            return _error(404, "NAME_UNKNOWN", f"repository {repo} not known to registry")
        tags = sorted(self.tags.get(repo, {}))
        if self.ignore_pagination:
            return web.json_response({"name": repo, "tags": tags})
        last = request.query.get("last")
        if last is not None:
            tags = [t for t in tags if t > last]
        headers: dict[str, str] = {}
        n_param = request.query.get("n")
        if n_param is not None:
            if not n_param.isdigit():
                return _error(400, "PAGINATION_NUMBER_INVALID", f"invalid n: {n_param}")
            n = int(n_param)
            if len(tags) > n:
                tags = tags[:n]
                if tags:
                    link = f"</v2/{repo}/tags/list?last={tags[-1]}&n={n}>"
                    headers["Link"] = f'{link}; rel="next"'
        return web.json_response({"name": repo, "tags": tags}, headers=headers)

    # --------------------------------------------------------------------- body

    async def _send(
        self,
        request: web.Request,
        digest: str,
        data: bytes,
        headers: dict[str, str],
        span: tuple[int, int] | None = None,
    ) -> web.StreamResponse:
        """Stream `data` (or the inclusive `span` of it) through the body faults for `digest`."""
        total = len(data)
        if digest in self.lie_about_digest and data:
            # Same length, one byte flipped: only a digest check can notice.
            mid = total // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
        status = 200
        base = span[0] if span is not None else 0
        if span is not None:
            first, last = span
            data = data[first : last + 1]
            status = 206
            headers["Content-Range"] = f"bytes {first}-{last}/{total}"
        length = len(data)
        if digest in self.wrong_content_length:
            # One byte short: a well-formed response whose body is wrong; aiohttp clips the
            # body at the declared length, so only size/digest verification can notice.
            length = max(length - 1, 0)
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = length
        await resp.prepare(request)
        if request.method == "HEAD":
            await resp.write_eof()
            return resp

        truncate_at = _relative(self.truncate.get(digest), base)
        reset_at = _relative(self.reset_after.get(digest), base)
        cut = min(x for x in (truncate_at, reset_at, len(data)) if x is not None)
        gate = self.gate.get(digest)
        gate_at = gate.after_bytes if gate is not None else None
        delay = self.slow.get(digest)
        sent = 0
        while True:
            # The first response to reach a one-time cut takes it (a connection closed by the
            # client before that byte leaves it to the next).
            once = [p - base for p in self.cuts.get(digest, ()) if sent <= p - base < cut]
            if once and sent == min(once):
                self.cuts[digest].remove(base + sent)
                reset_at = cut = sent
                break
            if gate is not None and gate_at is not None and sent >= min(gate_at, cut):
                # A gate past the cut still pauses, so tests can rely on `reached`.
                if not await self._pause(gate):
                    _drop(request)
                    return resp
                gate_at = None
            if sent >= cut:
                break
            end = min(sent + self.chunk_size, cut, *once)
            if gate_at is not None:
                end = min(end, gate_at)
            await resp.write(data[sent:end])
            sent = end
            if delay and sent < cut:
                await asyncio.sleep(delay)

        if sent < len(data) and sent == reset_at:
            _drop(request, reset=True)
            return resp
        if sent < len(data) and sent == truncate_at:
            # close() flushes what was written, then FIN: the client sees a short body.
            _drop(request, flush=True)
            return resp
        await resp.write_eof()
        return resp

    async def _send_huge(self, request: web.Request, huge: HugeBody) -> web.StreamResponse:
        """Write `huge.size` bytes (a JSON object opened and padded) until done or cut off."""
        resp = web.StreamResponse(headers={"Content-Type": huge.content_type})
        if huge.declare_length:
            resp.content_length = huge.size
        filler = b"{" + b" " * (1024 * 1024 - 1)
        try:
            await resp.prepare(request)
            while huge.sent < huge.size:
                piece = filler[: min(len(filler), huge.size - huge.sent)]
                await resp.write(piece)
                huge.sent += len(piece)
                filler = b" " * len(filler)
            await resp.write_eof()
        except ConnectionError:
            pass  # the client stopped reading and closed: what the test wants to see
        finally:
            huge.done.set()
        return resp

    async def _pause(self, gate: Gate) -> bool:
        """Wait at a gate; False when the server is shutting down instead."""
        gate.hits += 1
        gate.reached.set()
        release = asyncio.ensure_future(gate.release.wait())
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({release, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            release.cancel()
            closing.cancel()
        return gate.release.is_set()


def _relative(position: int | None, base: int) -> int | None:
    """A blob byte position as an offset into a response that starts at blob byte `base`."""
    return None if position is None else max(position - base, 0)


def _drop(request: web.BaseRequest, *, flush: bool = False, reset: bool = False) -> None:
    """Kill the connection under a handler.

    The handler then returns its response as usual; aiohttp's final write_eof hits the closed
    transport and is swallowed as a client disconnect, so nothing is logged as a server error.
    flush: close() sends what is buffered, then FIN (a short body).
    reset: SO_LINGER 0 makes the close a TCP RST ("connection reset by peer").
    """
    transport = request.transport
    if transport is None:
        return
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if flush:
        transport.close()
    else:
        transport.abort()


async def _add_api_version(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Docker-Distribution-API-Version"] = "registry/2.0"


def _www(challenge: str) -> dict[str, str]:
    return {"WWW-Authenticate": challenge}


def _repository_of(path: str) -> str | None:
    for pattern in (_MANIFEST_PATH, _BLOB_PATH, _TAGS_PATH):
        if match := pattern.match(path):
            return match["name"]
    return None


def _split_platform(platform: str) -> tuple[str, str, str | None]:
    """ "linux/arm64/v8" -> ("linux", "arm64", "v8")."""
    parts = platform.split("/")
    if len(parts) not in (2, 3):
        raise ValueError(f"platform must be os/arch[/variant], got {platform!r}")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


class FakeUpstreamServer:
    """Runs a FakeRegistry on 127.0.0.1; `stop()` makes the URL refuse connections.

    Use as `async with FakeUpstreamServer() as server:` or call `start()` / `stop()`.
    `start()` after `stop()` binds the same port again ("upstream came back").
    """

    def __init__(self, registry: FakeRegistry | None = None, *, port: int = 0) -> None:
        self.registry = registry if registry is not None else FakeRegistry()
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        if self.port == 0:
            raise RuntimeError("FakeUpstreamServer has not been started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """ "127.0.0.1:PORT", the form registry references and `ns=` use."""
        return self.url.removeprefix("http://")

    async def start(self) -> None:
        if self._runner is not None:
            return
        self.registry.reopen()
        # A short shutdown timeout: a stuck handler must not hold a test's teardown.
        runner = web.AppRunner(self.registry.make_app(), shutdown_timeout=0.5, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        if self.port == 0:
            self.port = runner.addresses[0][1]
        self._runner = runner

    async def stop(self) -> None:
        """Close the listener and every connection; afterwards connecting is refused."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self.registry.close()
        await runner.cleanup()

    async def __aenter__(self) -> FakeUpstreamServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
