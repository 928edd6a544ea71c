"""Upstreams that pass each client's own credentials on, and who may read their cache.

The mirror holds no credentials for such an upstream: a client's `Authorization` goes to the
upstream's token endpoint (or as Basic auth) in the client's name. Content is still cached and
shared, so before anything of a repository is served, from the cache or not, the upstream is
asked whether this client may read it: a HEAD of the very resource with the client's
credentials (a HEAD is not a pull on Docker Hub). The answer is remembered for a minute per
client and repository. An anonymous client never receives from the cache what the upstream
would refuse it.
"""

from __future__ import annotations

import hashlib
import time
from typing import Final

from proxy.oci import ApiPath, ErrorCode, RegistryError
from proxy.upstream import Upstream, UpstreamError

FRESH: Final = 60.0
# While the upstream cannot answer, a "yes" this recent still counts; a "no" always does.
FALLBACK: Final = 3600.0
CHALLENGE: Final = {"WWW-Authenticate": 'Basic realm="registry-proxy"'}


class UpstreamAccessCheck:
    def __init__(self) -> None:
        self._decisions: dict[tuple[str, str, str], tuple[bool, float]] = {}

    async def check(self, upstream: Upstream, api: ApiPath, credentials: str | None) -> None:
        assert api.repository is not None
        who = hashlib.sha256(credentials.encode()).hexdigest() if credentials else "anonymous"
        key = (who, upstream.name, api.repository.name)
        known = self._decisions.get(key)
        now = time.monotonic()
        if known is not None and now - known[1] < FRESH:
            allowed = known[0]
        else:
            try:
                allowed = await upstream.readable(api.repository, probe_path(api))
            except UpstreamError:
                if known is None or not known[0] or now - known[1] > FALLBACK:
                    raise
                allowed = True
            else:
                if len(self._decisions) > 100_000:
                    self._decisions.clear()
                self._decisions[key] = (allowed, now)
        if allowed:
            return
        if credentials is None:
            raise RegistryError(
                ErrorCode.UNAUTHORIZED, "authentication required", headers=CHALLENGE
            )
        raise RegistryError(ErrorCode.DENIED, f"upstream {upstream.name} refused these credentials")


def probe_path(api: ApiPath) -> str:
    """The resource itself, as a path below the repository, to HEAD in the client's name."""
    if api.endpoint == "tags":
        return "tags/list"
    kind = {"manifest": "manifests", "blob": "blobs", "referrers": "referrers"}[api.endpoint]
    return f"{kind}/{api.reference}"
