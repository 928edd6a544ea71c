"""The client for one upstream registry: pooled connections, token auth, redirects, errors.

It raises the `Upstream*` errors of `proxy.errors` (all `RegistryError`s, so the app renders
them as OCI errors); aiohttp's exceptions never leave this module: they are translated at
`_send` and in
`BlobStream.chunks`.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

import aiohttp
from yarl import URL

from proxy.config import UpstreamSettings
from proxy.errors import (
    ErrorCode,
    RangeIgnored,
    RegistryError,
    UpstreamRateLimited,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.metrics import Metrics
from proxy.oci import Digest, MediaType, Reference, Repository, dockerhub
from proxy.upstream.auth import DEFAULT_TOKEN_LIFETIME, Challenge, TokenTable
from proxy.upstream.bodies import (
    BlobStream,
    Manifest,
    ManifestHead,
    content_range,
    verify_manifest,
)
from proxy.upstream.breaker import CircuitBreaker
from proxy.upstream.quota import Quota

log = logging.getLogger(__name__)

MAX_REDIRECTS: Final = 5
READ_BUFFER: Final = 4 * 1024 * 1024
# Documents read whole are capped, so an upstream cannot make the mirror buffer without bound.
# Registries should accept manifests of at least 4 MiB (OCI distribution spec 1.1, "Pushing
# Manifests"), so that is the default of `max_manifest_size`; a tag list of 16 MiB holds some
# 500,000 tags; a token response is a few KiB of JSON.
DEFAULT_MAX_MANIFEST_SIZE: Final = 4 * 1024 * 1024
MAX_TAG_LIST_SIZE: Final = 16 * 1024 * 1024
MAX_TOKEN_RESPONSE_SIZE: Final = 1024 * 1024


@dataclass(slots=True)
class _Shared:
    """What every view of an upstream (`Upstream.for_client`) shares."""

    session: aiohttp.ClientSession | None = None
    challenge: Challenge | None = None


class Upstream:
    """One upstream registry, with one pooled `ClientSession`."""

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        response_timeout: float = 10.0,
        breaker: CircuitBreaker | None = None,
        metrics: Metrics | None = None,
        download_slots: tuple[asyncio.Semaphore, ...] = (),
        max_blob_size: int | None = None,
        connector: Callable[[], aiohttp.BaseConnector] | None = None,
        metrics_label: str | None = None,
        max_manifest_size: int = DEFAULT_MAX_MANIFEST_SIZE,
        quota: Quota | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        # The `upstream` label of its metrics: its name, or one label shared by every registry
        # mirrored on demand, whose names clients choose.
        self.label = metrics_label or settings.name
        if metrics is not None:
            metrics.upstream_bytes.labels(self.label)  # the series exists before any fetch
        self.download_slots = download_slots
        self.max_blob_size = max_blob_size
        self.max_manifest_size = max_manifest_size
        self.name = settings.name
        self.breaker = breaker or CircuitBreaker(5, 10.0)
        # Until a response's status and headers arrive, connecting included. `read_timeout`
        # (between bytes of a body, which may stall for good reasons) would let a black-holed
        # upstream (accepts, never answers) hold a request for a minute.
        self.response_timeout = response_timeout
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, connect=connect_timeout,
            sock_read=read_timeout,
        )  # fmt: skip
        self._connector = connector or _default_connector
        self._shared = _Shared()
        # For an upstream that passes client credentials on: the client's own `Authorization`
        # (see `for_client`); None is anonymous.
        self._client_credentials: str | None = None
        self._tokens = TokenTable()
        self._token_fetches: dict[str, asyncio.Future[str]] = {}
        # What its rate-limit headers said (shared by every `for_client` view).
        self.quota = quota or Quota(settings.name, metrics=metrics, label=self.label)

    def for_client(self, credentials: str | None) -> Upstream:
        """This upstream in one client's name (`pass_client_credentials`): the same
        connections, tokens and breaker, and that client's credentials on every request it
        makes, including a download it starts that outlives the request."""
        view = copy.copy(self)
        view._client_credentials = credentials
        return view

    async def start(self) -> None:
        self._session_or_new()

    def _session_or_new(self) -> aiohttp.ClientSession:
        if self._shared.session is None:
            self._shared.session = self._new_session()
        return self._shared.session

    def _new_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            timeout=self._timeout,
            auto_decompress=False,  # blobs must arrive byte-exact, whatever the encoding
            read_bufsize=READ_BUFFER,
            connector=self._connector(),
            headers={"User-Agent": "registry-proxy"},
        )

    async def close(self) -> None:
        if self._shared.session is not None:
            await self._shared.session.close()

    def remote_name(self, repository: Repository) -> str:
        """Docker Hub keeps its official images under `library/`; no other registry does."""
        return dockerhub.official_name(self.name, repository.name)

    async def get_manifest(
        self, repository: Repository, reference: Reference, accept: list[str]
    ) -> Manifest:
        path = f"{self.remote_name(repository)}/manifests/{reference}"
        headers = {"Accept": ", ".join(accept)}
        body, response = await self._read(
            path, repository, headers, ErrorCode.MANIFEST_UNKNOWN, self.max_manifest_size
        )
        media_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip()
        try:
            digest = verify_manifest(self.name, body, reference, response.headers)
        except UpstreamUnavailable:
            self._count_error("manifest", "digest_mismatch")
            raise
        return Manifest(body=body, media_type=media_type, digest=digest)

    async def head_manifest(
        self, repository: Repository, reference: Reference, accept: list[str]
    ) -> ManifestHead | None:
        """The manifest's digest and type without a body; None when the upstream omits them."""
        path = f"{self.remote_name(repository)}/manifests/{reference}"
        response = await self._send("HEAD", path, repository, {"Accept": ", ".join(accept)})
        response.release()
        self._raise_for_status(response, ErrorCode.MANIFEST_UNKNOWN)
        header = response.headers.get("Docker-Content-Digest")
        if header is None or response.content_length is None:
            return None
        try:
            digest = Digest.parse(header)
        except RegistryError:
            return None
        media_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip()
        return ManifestHead(media_type=media_type, digest=digest, size=response.content_length)

    async def open_blob(
        self, repository: Repository, digest: Digest, offset: int = 0, end: int | None = None
    ) -> BlobStream:
        """The blob from byte `offset`, up to byte `end` (exclusive) when given: a resumed
        download, or one part of a download over several connections. Every open goes through
        the registry, so a signed CDN URL that expired since the last one is never reused."""
        headers = {"Range": f"bytes={offset}-{'' if end is None else end - 1}"}
        if not offset and end is None:
            headers = {}
        path = f"{self.remote_name(repository)}/blobs/{digest}"
        # A slot in every limit (global, this upstream) is held until the stream is closed.
        held: list[asyncio.Semaphore] = []
        try:
            for slots in self.download_slots:
                await slots.acquire()
                held.append(slots)
            response = await self._send("GET", path, repository, headers)
            try:
                self._raise_for_status(response, ErrorCode.BLOB_UNKNOWN)
                if headers and response.status != HTTPStatus.PARTIAL_CONTENT:
                    raise RangeIgnored(self.name)
                if headers and (content_range(response) or (-1,))[0] != offset:
                    raise RangeIgnored(self.name, "answered another range than asked")
            except RegistryError:
                response.release()
                raise
        except BaseException:
            for slots in held:
                slots.release()
            raise
        stream = BlobStream(self.name, response, offset, self.metrics, held, self.label)
        if (limit := self.max_blob_size) is not None and (stream.size or 0) > limit:
            stream.close()
            raise UpstreamRefused(
                ErrorCode.SIZE_INVALID, f"blob is larger than the mirror's limit of {limit} bytes"
            )
        return stream

    async def get_referrers(
        self, repository: Repository, digest: Digest, query: str
    ) -> tuple[bytes, str]:
        """The referrers index (OCI 1.1) as the upstream sent it, and its content type."""
        path = f"{self.remote_name(repository)}/referrers/{digest}" + (f"?{query}" if query else "")
        # A referrers response is an image index, so it has a manifest's limit.
        body, response = await self._read(
            path, repository, {}, ErrorCode.MANIFEST_UNKNOWN, self.max_manifest_size
        )
        return body, response.headers.get("Content-Type", MediaType.OCI_INDEX)

    async def probe(
        self, repository: Repository, path: str, headers: Mapping[str, str] | None = None
    ) -> int:
        """The status of a HEAD of `path` below the repository with the current credentials
        (a HEAD is not a Docker Hub pull): 200, 401, 403 or 404; anything else raises."""
        response = await self._send(
            "HEAD", f"{self.remote_name(repository)}/{path}", repository, headers or {}
        )
        response.release()
        if response.status in (401, 403, 404) or response.status < 300:
            return response.status
        self._raise_for_status(response, ErrorCode.NAME_UNKNOWN)
        raise UpstreamUnavailable(self.name, f"answered unexpected status {response.status}")

    async def head_blob(self, repository: Repository, digest: Digest) -> int:
        path = f"{self.remote_name(repository)}/blobs/{digest}"
        response = await self._send("HEAD", path, repository, {})
        response.release()
        self._raise_for_status(response, ErrorCode.BLOB_UNKNOWN)
        if response.content_length is None:
            raise UpstreamUnavailable(self.name, "did not say the blob's size")
        return response.content_length

    async def get_tags(self, repository: Repository, query: str) -> tuple[bytes, str | None]:
        """The tag list body and the upstream's `Link` header (`proxy.taglist` points it back
        at the mirror)."""
        remote = self.remote_name(repository)
        path = f"{remote}/tags/list" + (f"?{query}" if query else "")
        body, response = await self._read(
            path, repository, {}, ErrorCode.NAME_UNKNOWN, MAX_TAG_LIST_SIZE
        )
        return body, response.headers.get("Link")

    async def _read(
        self,
        path: str,
        repository: Repository,
        headers: Mapping[str, str],
        not_found: ErrorCode,
        limit: int,
    ) -> tuple[bytes, aiohttp.ClientResponse]:
        """GET a small document whole (a manifest, a tag list, a referrers index), at most
        `limit` bytes of it."""
        response = await self._send("GET", path, repository, headers)
        try:
            self._raise_for_status(response, not_found)
            body = await self._read_capped(response, limit, _kind(response.url))
        except aiohttp.ClientError as exc:
            log.warning("upstream %s: transfer of %s broke: %s", self.name, path, exc)
            raise UpstreamUnavailable(self.name, "transfer broke") from exc
        finally:
            response.release()
        return body, response

    async def _read_capped(self, response: aiohttp.ClientResponse, limit: int, kind: str) -> bytes:
        """The body, read as it arrives and given up on (connection closed, nothing more read)
        as soon as it is known to exceed `limit`: from Content-Length when declared."""
        declared = response.content_length
        if declared is None or declared <= limit:
            body = bytearray()
            async for chunk in response.content.iter_any():
                body += chunk
                if len(body) > limit:
                    break
            else:
                return bytes(body)
        response.close()  # not back to the pool: the rest of the body is never read
        self._count_error(kind, "too_large")
        what = _DOCUMENTS.get(kind, kind)
        raise UpstreamUnavailable(
            self.name, f"sent a {what} larger than the mirror's limit of {limit} bytes"
        )

    async def _send(
        self, method: str, path: str, repository: Repository | None, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        """Send a request, authorising on a 401 once and following redirects by hand.

        Redirects are followed here rather than by aiohttp so that the `Authorization` header
        provably never reaches another host (blob CDNs get pre-signed URLs instead).
        """
        scope = f"repository:{self.remote_name(repository)}:pull" if repository else None
        url = self.settings.url / "v2" / ""
        url = URL(str(url) + path, encoded=True)
        response = await self._request_with_auth(method, url, scope, headers)
        for _ in range(MAX_REDIRECTS):
            if response.status not in (301, 302, 303, 307, 308):
                return response
            location = response.headers.get("Location")
            response.release()
            if location is None:
                raise UpstreamUnavailable(self.name, "redirect without Location")
            target = response.url.join(URL(location))
            if target.scheme not in ("http", "https") or (
                response.url.scheme == "https" and target.scheme != "https"
            ):
                # A downgrade would hand the path (and a pre-signed URL's signature) to anyone
                # on the way; where it may connect at all is the connector's address policy.
                log.warning("upstream %s: refused a redirect from %s to %s", self.name,
                            response.url.with_query(None), target.with_query(None))  # fmt: skip
                raise UpstreamUnavailable(self.name, "redirected to a scheme it may not use")
            if target.origin() == self.settings.url.origin():
                response = await self._request_with_auth(method, target, scope, headers)
            else:
                response = await self._request(method, target, dict(headers))
        response.release()
        raise UpstreamUnavailable(self.name, f"more than {MAX_REDIRECTS} redirects")

    async def _request_with_auth(
        self, method: str, url: URL, scope: str | None, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        authorization = await self._authorization(scope, refresh=False)
        response = await self._request(method, url, _with_auth(headers, authorization))
        if response.status != HTTPStatus.UNAUTHORIZED:
            return response
        challenge = Challenge.parse(response.headers.get("WWW-Authenticate", ""))
        if challenge is None:
            return response
        response.release()
        self._shared.challenge = challenge
        authorization = await self._authorization(scope, refresh=True)
        return await self._request(method, url, _with_auth(headers, authorization))

    async def _request(
        self, method: str, url: URL, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        kind = _kind(url)
        if self.breaker.is_open:
            self._count_error(kind, "circuit_open")
            raise UpstreamUnavailable(self.name, "failing repeatedly; retrying shortly")
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.response_timeout):
                response = await self._session_or_new().request(
                    method, url, headers=headers, allow_redirects=False
                )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            self.breaker.failure()
            self._count_error(kind, "timeout")
            raise UpstreamTimeout(self.name) from exc
        except aiohttp.ClientError as exc:
            self.breaker.failure()
            self._count_error(kind, "unreachable")
            # The details (refused, reset, TLS, a forbidden address) go to the log only: in an
            # error body they would tell a client which internal ports are open.
            log.warning("upstream %s: %s %s failed: %s", self.name, method, url.with_query(None),
                        str(exc) or type(exc).__name__)  # fmt: skip
            raise UpstreamUnavailable(self.name, "cannot reach it") from exc
        if self.metrics is not None:
            self.metrics.upstream_duration.labels(self.label, kind).observe(
                time.monotonic() - started
            )
        if response.status >= 500:
            self.breaker.failure()
        else:
            self.breaker.success()
        self.quota.observe(response.status, response.headers)
        return response

    def _count_error(self, kind: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.upstream_errors.labels(self.label, kind, reason).inc()

    async def _authorization(self, scope: str | None, *, refresh: bool) -> str | None:
        challenge = self._shared.challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self._basic_auth()
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            return None
        key = f"{self._credentials_id()}|{scope or ''}"
        token = None if refresh else self._tokens.get(key, time.monotonic())
        if token is not None:
            return f"Bearer {token}"
        # One token request per scope at a time: a herd of misses shares it.
        pending = self._token_fetches.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch_token(challenge, scope, key))
            self._token_fetches[key] = pending
            pending.add_done_callback(lambda _: self._token_fetches.pop(key, None))
        return f"Bearer {await asyncio.shield(pending)}"

    def _credentials_id(self) -> str:
        """Whose tokens these are: ours, or (passing client credentials) this client's."""
        if not self.settings.pass_client_credentials:
            return ""
        credentials = self._client_credentials
        if credentials is None:
            return "anonymous"
        return hashlib.sha256(credentials.encode()).hexdigest()[:32]

    async def _fetch_token(self, challenge: Challenge, scope: str | None, key: str) -> str:
        query = {"service": challenge.params.get("service", "")}
        if scope:
            query["scope"] = scope
        realm = URL(challenge.params["realm"]).update_query(query)
        headers = {}
        if (basic := self._basic_auth()) is not None:
            if self.may_send_credentials_to(realm):
                headers["Authorization"] = basic
            else:
                log.warning(
                    "upstream %s names token realm %s; asking it without credentials "
                    "(credentials go only to the upstream's host or its token_realm_hosts, "
                    "and not over plain http)",
                    self.name, realm.with_query(None),
                )  # fmt: skip
        started = time.monotonic()
        try:
            async with (
                asyncio.timeout(self.response_timeout),
                self._session_or_new().get(realm, headers=headers) as response,
            ):
                if self.metrics is not None:
                    self.metrics.upstream_duration.labels(self.label, "token").observe(
                        time.monotonic() - started
                    )
                if response.status >= 400:
                    self._count_error("token", f"status_{response.status // 100}xx")
                if response.status in (401, 403):
                    raise UpstreamRefused(
                        ErrorCode.UNAUTHORIZED, f"upstream {self.name} refused the credentials"
                    )
                if response.status >= 400:
                    raise UpstreamUnavailable(
                        self.name, f"token endpoint answered {response.status}"
                    )
                body = await self._read_capped(response, MAX_TOKEN_RESPONSE_SIZE, "token")
                document = json.loads(body)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            self._count_error("token", "timeout")
            raise UpstreamTimeout(self.name, "token endpoint timed out") from exc
        except (aiohttp.ClientError, ValueError) as exc:
            self._count_error("token", "unreachable")
            log.warning("upstream %s: token endpoint %s failed: %s", self.name,
                        realm.with_query(None), exc)  # fmt: skip
            raise UpstreamUnavailable(self.name, "token endpoint failed") from exc
        if not isinstance(document, dict):
            raise UpstreamUnavailable(self.name, "token endpoint returned no token")
        value = document.get("token") or document.get("access_token")
        if not isinstance(value, str) or not value:
            raise UpstreamUnavailable(self.name, "token endpoint returned no token")
        lifetime = document.get("expires_in")
        if not isinstance(lifetime, int | float) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        # Renew a little early so a token never expires in flight.
        now = time.monotonic()
        self._tokens.put(key, value, now + max(lifetime - 10, 1), now)
        return value

    def may_send_credentials_to(self, realm: URL) -> bool:
        """Whether a token realm a 401 named may receive this upstream's credentials: on the
        upstream's own host or one configured for it, and over https unless the upstream
        itself is plain http."""
        own = self.settings.url
        if realm.scheme != "https" and not (realm.scheme == "http" and own.scheme == "http"):
            return False
        host = (realm.host or "").lower()
        allowed = {(own.host or "").lower(), *self.settings.token_realm_hosts}
        allowed.update(dockerhub.REALM_HOSTS.get((own.host or "").lower(), ()))
        return host in allowed

    def _basic_auth(self) -> str | None:
        if self.settings.pass_client_credentials:
            client = self._client_credentials
            return client if client and client.lower().startswith("basic ") else None
        username, password = self.settings.username, self.settings.password
        if username is None or password is None:
            return None
        credentials = f"{username}:{password.reveal()}".encode()
        return "Basic " + base64.b64encode(credentials).decode("ascii")

    def _raise_for_status(self, response: aiohttp.ClientResponse, not_found: ErrorCode) -> None:
        status = response.status
        if status < 300:
            return
        if status >= 500 or status in (401, 403, 429):
            self._count_error(_kind(response.url), f"status_{status if status < 500 else '5xx'}")
        if status == HTTPStatus.TOO_MANY_REQUESTS:
            raise UpstreamRateLimited(self.name, response.headers.get("Retry-After"))
        if status == HTTPStatus.NOT_FOUND:
            raise UpstreamRefused(not_found, f"{not_found.message} upstream ({self.name})")
        if status == HTTPStatus.UNAUTHORIZED:
            raise UpstreamRefused(ErrorCode.UNAUTHORIZED, f"upstream {self.name} needs credentials")
        if status == HTTPStatus.FORBIDDEN:
            raise UpstreamRefused(ErrorCode.DENIED, f"upstream {self.name} denied access")
        if status == HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE:
            raise UpstreamRefused(ErrorCode.RANGE_INVALID, "range not satisfiable upstream")
        if status >= 500:
            raise UpstreamUnavailable(self.name, f"answered {status}")
        raise UpstreamUnavailable(self.name, f"answered unexpected status {status}")


def _default_connector() -> aiohttp.BaseConnector:
    return aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)


_DOCUMENTS: Final = {
    "manifest": "manifest", "tags": "tag list", "referrers": "referrers index",
    "token": "token response",
}  # fmt: skip


def _kind(url: URL) -> str:
    """The kind of an upstream request for metrics: a fixed set, never a path."""
    for part, kind in (
        ("/manifests/", "manifest"), ("/blobs/", "blob"), ("/tags/", "tags"),
        ("/referrers/", "referrers"),
    ):  # fmt: skip
        if part in url.path:
            return kind
    return "ping" if url.path.rstrip("/") == "/v2" else "redirect"


def _with_auth(headers: Mapping[str, str], authorization: str | None) -> dict[str, str]:
    result = dict(headers)
    if authorization is not None:
        result["Authorization"] = authorization
    return result
