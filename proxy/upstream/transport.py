"""How requests reach one upstream registry: pooled connections, token auth, redirects, errors.

`Transport` is the plumbing under `proxy.upstream.client.Upstream` (which adds the registry's
operations: manifests, blobs, tags, referrers). It raises the `Upstream*` errors of
`proxy.errors` (all `RegistryError`s, so the app renders them as OCI errors); aiohttp's
exceptions never leave it: they are translated at `_send` and in `BlobStream.chunks`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, Self

import aiohttp
from yarl import URL

from proxy.config import Settings, UpstreamSettings
from proxy.errors import (
    ErrorCode,
    UpstreamRateLimited,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.metrics import Metrics
from proxy.oci import Repository, dockerhub
from proxy.upstream.auth import Authorizer, Challenge
from proxy.upstream.breaker import CircuitBreaker
from proxy.upstream.quota import Quota

log = logging.getLogger(__name__)

MAX_REDIRECTS: Final = 5
# What a response's reader holds before the socket stops being read (twice this): a blob body
# is taken as it arrives, so more only piles up while its download waits for the disk, and is
# memory per connection (4 MiB held 25 MiB more in the herd, and was no faster).
READ_BUFFER: Final = 512 * 1024
# A token response is a few KiB of JSON: read whole, it is capped like every document.
MAX_TOKEN_RESPONSE_SIZE: Final = 1024 * 1024


@dataclass(slots=True)
class _Shared:
    """What every view of an upstream (`Upstream.for_client`) shares."""

    session: aiohttp.ClientSession | None = None


class Transport:
    """Requests to one upstream registry, over one pooled `ClientSession`."""

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        connect_timeout: float = Settings.connect_timeout,
        read_timeout: float = Settings.read_timeout,
        response_timeout: float = Settings.response_timeout,
        breaker: CircuitBreaker | None = None,
        metrics: Metrics | None = None,
        download_slots: tuple[asyncio.Semaphore, ...] = (),
        max_blob_size: int | None = None,
        connector: Callable[[], aiohttp.BaseConnector] | None = None,
        metrics_label: str | None = None,
        max_manifest_size: int = Settings.max_manifest_size,
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
        self.breaker = breaker or CircuitBreaker(
            Settings.breaker_failures, Settings.breaker_cooldown
        )
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
        self.auth = Authorizer(settings, self._token_document)
        # What its rate-limit headers said (shared by every `for_client` view).
        self.quota = quota or Quota(settings.name, metrics=metrics, label=self.label)

    def for_client(self, credentials: str | None) -> Self:
        """This upstream in one client's name (`pass_client_credentials`): the same
        connections, tokens and breaker, and that client's credentials on every request it
        makes, including a download it starts that outlives the request."""
        view = copy.copy(self)
        view.auth = self.auth.for_client(credentials)
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
        authorization = await self.auth.authorization(scope, refresh=False)
        response = await self._request(method, url, _with_auth(headers, authorization))
        if response.status != HTTPStatus.UNAUTHORIZED:
            return response
        challenge = Challenge.parse(response.headers.get("WWW-Authenticate", ""))
        if challenge is None:
            return response
        response.release()
        self.auth.learn(challenge)
        authorization = await self.auth.authorization(scope, refresh=True)
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

    async def _token_document(self, realm: URL, headers: Mapping[str, str]) -> Any:
        """GET a token realm (`Authorizer` asks): the JSON document it answered."""
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
        return document

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
