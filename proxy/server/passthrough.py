"""Upstreams that pass each client's own credentials on, and who may read their cache.

The mirror holds no credentials for such an upstream: a client's credentials go to the
upstream's token endpoint (or as Basic auth) in the client's name. Content is still cached and
shared, so before anything of a repository is served, from the cache or not, the upstream is
asked whether this client may read it: a HEAD of the very resource with the client's
credentials (a HEAD is not a pull on Docker Hub). A "yes" or "no" is remembered for a minute
per client and repository; a 404 is this request's answer only (registries that hide private
repositories answer 404 to whoever may not see them), and never reaches the shared caches.

**How clients are made to send credentials.** skopeo, podman and dockerd ping `GET /v2/` and
send credentials only when it answers 401 with a challenge; containerd skips the ping and
answers a 401 on the resource itself. So, when any upstream passes client credentials:

- an anonymous `GET /v2/` answers 401 with a Bearer challenge naming the mirror's own token
  endpoint (`/auth/token`); with credentials it answers 200;
- a resource the upstream refuses to an anonymous client answers 401 with the same challenge.

The challenge is Bearer, not Basic, because dockerd without credentials gives up on a Basic
challenge (`no basic auth credentials`) while it fetches an anonymous token from a Bearer realm;
every client then carries on anonymously, so public content stays pullable by anyone. The
token endpoint takes the Basic credentials of a GET (Docker, containers/image) or the
username and password of an OAuth2 password grant POST (containerd) and returns a token that
wraps them unchanged (`rp1.` + base64url), so any worker or replica can read it back: it is as
secret as the password it carries and no more. The credentials are checked by the upstream
when used, not here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from typing import Final

from aiohttp import web

from proxy.cache.provenance import Provenance
from proxy.errors import UpstreamError
from proxy.oci import BlobPath, Digest, ManifestPath, MediaType, ReferrersPath, RepositoryPath
from proxy.server.guard import refusal
from proxy.upstream.auth import Scheme, basic_credentials
from proxy.upstream.client import Upstream

FRESH: Final = 60.0
# While the upstream cannot answer, a "yes" this recent still counts; a "no" always does.
FALLBACK: Final = 3600.0
TOKEN_PATH: Final = "/auth/token"  # noqa: S105 (a URL path)
TOKEN_PREFIX: Final = "rp1."  # noqa: S105 (a format marker)
SERVICE: Final = "registry-proxy"
# Clients ask again when a token expires; the credentials inside are checked on every use.
TOKEN_LIFETIME: Final = 3600


def client_credentials(authorization: str | None) -> str | None:
    """The credentials to pass upstream, as a Basic `Authorization` value; None: anonymous.

    containers/image answers a Basic challenge without credentials with `Basic Og==` (an
    empty user and password), and tokens from `/auth/token` carry the client's credentials.
    """
    scheme, _, value = (authorization or "").strip().partition(" ")
    value = value.strip()
    if scheme.lower() == Scheme.BEARER and value.startswith(TOKEN_PREFIX):
        try:
            raw = base64.urlsafe_b64decode(_padded(value.removeprefix(TOKEN_PREFIX)))
        except (binascii.Error, ValueError):
            return None
        value = base64.b64encode(raw).decode("ascii")
    elif scheme.lower() != Scheme.BASIC:
        return None
    try:
        user, password = basic_credentials(value)
    except ValueError:
        return None
    if not user and not password:
        return None
    return f"Basic {value}"


def challenge(request: web.Request, scope: str | None = None) -> dict[str, str]:
    """A Bearer challenge naming this mirror's token endpoint, as the client reached it."""
    realm = request.url.origin().with_path(TOKEN_PATH)
    value = f'Bearer realm="{realm}",service="{SERVICE}"'
    if scope is not None:
        value += f',scope="{scope}"'
    return {"WWW-Authenticate": value}


async def token_endpoint(request: web.Request) -> web.Response:
    """Docker token auth (GET with Basic credentials) and OAuth2 password grant (POST)."""
    if request.method == "POST":
        form = await request.post()
        username, password = form.get("username"), form.get("password")
        if isinstance(username, str) and isinstance(password, str):
            credentials = f"{username}:{password}".encode()
        else:
            credentials = b""
    else:
        basic = client_credentials(request.headers.get("Authorization"))
        credentials = base64.b64decode(basic.removeprefix("Basic ")) if basic else b""
    token = TOKEN_PREFIX + base64.urlsafe_b64encode(credentials).decode("ascii").rstrip("=")
    return web.json_response(
        {"token": token, "access_token": token, "expires_in": TOKEN_LIFETIME},
        headers={"Cache-Control": "no-store"},
    )


def _padded(text: str) -> str:
    return text + "=" * (-len(text) % 4)


class UpstreamAccessCheck:
    def __init__(self, provenance: Provenance | None = None) -> None:
        self.provenance = provenance
        self._decisions: dict[tuple[str, str, str], tuple[int, float]] = {}

    async def check(
        self, request: web.Request, upstream: Upstream, api: RepositoryPath, credentials: str | None
    ) -> None:
        who = hashlib.sha256(credentials.encode()).hexdigest() if credentials else "anonymous"
        key = (who, upstream.name, api.repository.name)
        known = self._decisions.get(key)
        now = time.monotonic()
        if known is not None and now - known[1] < FRESH:
            status = known[0]
        else:
            try:
                status = await upstream.probe(api.repository, api.resource, probe_headers(api))
            except UpstreamError:
                if known is None or known[0] >= 300 or now - known[1] > FALLBACK:
                    raise
                status = known[0]
            else:
                if status == 404:
                    # This resource, for this client: not readable. Not a fact about the
                    # repository, and not one to share with other clients.
                    raise refusal(404, _kind(api))
                if len(self._decisions) > 100_000:
                    self._decisions.clear()
                self._decisions[key] = (status, now)
                digest = _named_digest(api)
                if status < 300 and self.provenance is not None and digest is not None:
                    self.provenance.record(digest, upstream.name, api.repository.name)
        if status < 300:
            return
        error = refusal(status, _kind(api))
        if error.status == 401:
            error.headers.update(challenge(request, f"repository:{api.repository.name}:pull"))
        raise error


def _kind(api: RepositoryPath) -> str:
    if isinstance(api, ManifestPath | ReferrersPath):
        return "manifest"
    return "blob" if isinstance(api, BlobPath) else "name"


def _named_digest(api: RepositoryPath) -> Digest | None:
    """The digest the path names (a blob, a manifest by digest, a referrers subject)."""
    if isinstance(api, BlobPath | ReferrersPath):
        return api.digest
    if isinstance(api, ManifestPath) and isinstance(api.reference, Digest):
        return api.reference
    return None


def probe_headers(api: RepositoryPath) -> dict[str, str]:
    # Distribution answers 404 for an OCI manifest or index the Accept header does not admit.
    if isinstance(api, ManifestPath):
        return {"Accept": ", ".join(sorted(MediaType.MANIFESTS))}
    return {}
