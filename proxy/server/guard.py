"""Who may be served content by digest from the cache, judged by where it was seen
(`proxy.cache.provenance`).

`ProvenanceGuard.check` runs before anything is served by digest (manifests and blobs). The
requester already passed the repository-level checks for the requested pair `(U, R)`
(`[[access]]` rules; for a pass-through upstream, the upstream's own answer). Then:

1. `(U, R)` is recorded for the digest: served.
2. `U` holds its own credentials and the identity may pull one recorded pair of such an
   upstream by the `[[access]]` rules: served (shared content stays shared).
3. Otherwise the upstream decides: a HEAD of `R`'s copy of the digest, in the client's name for
   a pass-through upstream. Present: the pair is recorded and the content served. 404: not
   readable (404). 401/403: refused. The upstream unreachable: refused with its error.

With no `[[access]]` rules and no pass-through upstream everyone may pull everything, and the
guard does nothing.
"""

from __future__ import annotations

from proxy.cache.provenance import Provenance
from proxy.errors import ErrorCode, RegistryError
from proxy.oci import Digest, MediaType, Repository
from proxy.server.access import AccessControl
from proxy.upstream.client import Upstream


class ProvenanceGuard:
    """Decides whether content cached under a digest may be served through `(U, R)`."""

    def __init__(
        self, provenance: Provenance, access: AccessControl, passing: frozenset[str] = frozenset()
    ) -> None:
        self.provenance = provenance
        self.access = access
        # The upstreams that pass client credentials: their pairs prove nothing about another
        # client, so only the upstream itself can vouch for content through them.
        self.passing = passing

    async def check(
        self,
        identity: str,
        upstream: Upstream,
        repository: Repository,
        digest: Digest,
        kind: str,
    ) -> None:
        """Raise unless `identity` may be served `digest` through `(upstream, repository)`."""
        if not self.access.rules and not self.passing:
            return  # everyone may pull everything
        if self.provenance.seen_in(digest, upstream.name, repository.name):
            return
        if upstream.name not in self.passing:
            for other_upstream, other_repository in self.provenance.pairs(digest):
                if other_upstream in self.passing:
                    continue
                if self.access.allows(identity, other_upstream, other_repository):
                    return
        # The upstream vouches for its own repository, in the client's name where it passes
        # client credentials (proxy.upstream.CLIENT_CREDENTIALS is set for this request).
        accept = {"Accept": ", ".join(sorted(MediaType.MANIFESTS))} if kind == "manifest" else {}
        status = await upstream.probe(repository, f"{kind}s/{digest}", accept)
        if status < 300:
            self.provenance.record(digest, upstream.name, repository.name)
            return
        raise refusal(status, kind)


def refusal(status: int, kind: str) -> RegistryError:
    """The error for an upstream's "no" to a probe (401/403/404) of a manifest, blob or name."""
    if status == 404:
        code = {"manifest": ErrorCode.MANIFEST_UNKNOWN, "blob": ErrorCode.BLOB_UNKNOWN}.get(
            kind, ErrorCode.NAME_UNKNOWN
        )
        return RegistryError(code, f"{code.message} upstream")
    if status == 403:
        return RegistryError(ErrorCode.DENIED, "the upstream denied access")
    return RegistryError(ErrorCode.UNAUTHORIZED, "the upstream needs credentials")
