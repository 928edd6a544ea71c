"""Every error a client can see, in one tree; each renders as an OCI error body
(`{"errors": [{"code", "message", "detail"}]}`, OCI distribution spec, "Error Codes") with its
HTTP status, in one place (`proxy.server.middleware.render_errors`)::

    RegistryError                     code + message (+ status, headers); 4xx for the client's
    |                                 own mistakes (bad name, bad digest, range, read-only, ...)
    +-- UpstreamError                 retryable: the upstream could not give an answer
    |   +-- UpstreamUnavailable       502: refused, reset, DNS, a broken body, a 5xx
    |   +-- UpstreamTimeout           504: no answer within the response or read timeout
    |   +-- UpstreamRateLimited       429: passed on with the upstream's Retry-After
    +-- UpstreamRefused               not retryable: the upstream answered no (401, 403, 404)
    +-- DigestMismatch                502: the upstream's bytes do not hash to their digest
    +-- DownloadTimedOut              504: a blob download into the cache took too long

Foreign exceptions (aiohttp's, OSError) are translated where they arise
(`proxy.upstream.transport`, `proxy.cache.download`), so nothing above those modules handles
them. Pure values, no I/O.
"""

from __future__ import annotations

import json
from enum import Enum
from http import HTTPStatus
from typing import Any


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


class UpstreamError(RegistryError):
    retryable = True


class UpstreamUnavailable(UpstreamError):
    def __init__(self, upstream: str, why: str) -> None:
        super().__init__(
            ErrorCode.UNAVAILABLE, f"upstream {upstream} unavailable: {why}", status=502
        )


class RangeIgnored(UpstreamUnavailable):
    """The upstream answered a ranged request with the whole body (200), or another range."""

    def __init__(self, upstream: str, why: str = "ignored a Range request") -> None:
        super().__init__(upstream, why)


class UpstreamTimeout(UpstreamError):
    def __init__(self, upstream: str, why: str = "timed out") -> None:
        super().__init__(ErrorCode.UNAVAILABLE, f"upstream {upstream} {why}", status=504)


class UpstreamRateLimited(UpstreamError):
    def __init__(self, upstream: str, retry_after: str | None) -> None:
        super().__init__(
            ErrorCode.TOOMANYREQUESTS,
            f"upstream {upstream} is rate limiting",
            headers={"Retry-After": retry_after} if retry_after else None,
        )


class UpstreamRefused(RegistryError):
    retryable = False


class DigestMismatch(RegistryError):
    """The upstream's bytes did not match the digest: the upstream's fault, so a 502 that
    clients retry, never the 400 that DIGEST_INVALID means for a client's own mistake."""

    def __init__(self, digest: object, why: str) -> None:
        super().__init__(
            ErrorCode.UNAVAILABLE, f"upstream sent bad content for {digest}: {why}", status=502
        )
        self.counted = False  # by the store's digest_mismatches, once


class DownloadTimedOut(RegistryError):
    """A blob download into the cache outlived `download_timeout`."""

    def __init__(self) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, "blob download timed out", status=504)


class SiblingUnreachable(Exception):
    """Another worker did not answer a request from this one (it is restarting, or stuck)."""
