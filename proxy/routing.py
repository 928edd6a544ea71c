"""Which upstream a request is for: containerd's `?ns=`, a path prefix, or the default.

1. `?ns=<registry host>` (containerd appends it to every request to a mirror);
2. a first path component naming an upstream: `/v2/ghcr.io/org/app/...` (what a podman
   `registries.conf` mirror with `location = "mirror:5000/ghcr.io"` sends);
3. the default upstream, the first configured.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Final

from yarl import URL

from proxy.config import Settings, UpstreamSettings
from proxy.metrics import Metrics
from proxy.oci import ErrorCode, RegistryError
from proxy.upstream import CircuitBreaker, Upstream

# A registry host as containerd names it: DNS labels, optionally a port.
_REGISTRY_HOST: Final = re.compile(
    r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*(?::[0-9]{1,5})?"
)
# Registries made up on demand (allow_any_registry) are capped, so a client cannot make the
# mirror hold unbounded connection pools.
MAX_DYNAMIC_UPSTREAMS: Final = 64


def is_registry_host(text: str) -> bool:
    return len(text) <= 255 and _REGISTRY_HOST.fullmatch(text) is not None


class Upstreams:
    def __init__(
        self,
        settings: Settings,
        upstreams: list[Upstream] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._all_downloads = asyncio.Semaphore(settings.max_downloads)
        configured = upstreams or [self._make(u) for u in settings.upstreams]
        self._by_name = {upstream.name: upstream for upstream in configured}
        self.default = configured[0]
        self._dynamic: dict[str, Upstream] = {}

    def _make(self, upstream: UpstreamSettings) -> Upstream:
        return Upstream(
            upstream,
            connect_timeout=self.settings.connect_timeout,
            read_timeout=self.settings.read_timeout,
            breaker=CircuitBreaker(self.settings.breaker_failures, self.settings.breaker_cooldown),
            metrics=self.metrics,
            download_slots=(
                self._all_downloads,
                asyncio.Semaphore(self.settings.max_downloads_per_upstream),
            ),
            max_blob_size=self.settings.max_blob_size,
            max_manifest_size=self.settings.max_manifest_size,
        )

    def __iter__(self) -> Iterator[Upstream]:
        yield from self._by_name.values()
        yield from self._dynamic.values()

    def get(self, name: str) -> Upstream | None:
        return self._by_name.get(name) or self._dynamic.get(name)

    def route(self, tail: str, ns: str | None) -> tuple[Upstream, str]:
        """The upstream for a `/v2/` path tail, and the tail with any upstream prefix removed."""
        if ns is not None:
            return self._for_namespace(ns), tail
        first, sep, rest = tail.partition("/")
        if sep and first in self._by_name:
            return self._by_name[first], rest
        return self.default, tail

    def _for_namespace(self, ns: str) -> Upstream:
        upstream = self.get(ns)
        if upstream is not None:
            return upstream
        if not self.settings.allow_any_registry or not is_registry_host(ns):
            # A fast 404 sends containerd on to its next host (eventually the registry itself).
            raise RegistryError(
                ErrorCode.NAME_UNKNOWN, f"registry {ns[:100]!r} is not mirrored here"
            )
        if len(self._dynamic) >= MAX_DYNAMIC_UPSTREAMS:
            raise RegistryError(ErrorCode.NAME_UNKNOWN, "too many registries mirrored on demand")
        upstream = self._make(UpstreamSettings(ns, URL(f"https://{ns}")))
        self._dynamic[ns] = upstream
        return upstream

    async def close(self) -> None:
        for upstream in self:
            await upstream.close()
