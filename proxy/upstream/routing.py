"""Which upstream a request is for: containerd's `?ns=`, a path prefix, or the default.

1. `?ns=<registry host>` (containerd appends it to every request to a mirror);
2. a first path component naming an upstream: `/v2/ghcr.io/org/app/...` (what a podman
   `registries.conf` mirror with `location = "mirror:5000/ghcr.io"` sends);
3. the default upstream, the first configured.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator
from typing import Final, Literal

from yarl import URL

from proxy.config import Settings, UpstreamSettings
from proxy.errors import ErrorCode, RegistryError
from proxy.metrics import Metrics
from proxy.upstream.breaker import CircuitBreaker
from proxy.upstream.client import Upstream
from proxy.upstream.egress import ANY_ADDRESS, Egress, is_public_registry_name
from proxy.upstream.quota import Quota

# A registry host as containerd names it: DNS labels, optionally a port.
_REGISTRY_HOST: Final = re.compile(
    r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*(?::[0-9]{1,5})?"
)
# Registries made up on demand (allow_any_registry) are capped, so a client cannot make the
# mirror hold unbounded connection pools. When the table is full, the least recently used one
# that is idle (no blob download open, not routed to for DYNAMIC_IDLE seconds, longer than a
# manifest or tag request takes) makes room; with none idle, the new registry is refused.
MAX_DYNAMIC_UPSTREAMS: Final = 64
DYNAMIC_IDLE: Final = 120.0
# The `upstream` label every on-demand registry's metrics share: clients choose their names.
DYNAMIC_LABEL: Final = "on-demand"


def is_registry_host(text: str) -> bool:
    return len(text) <= 255 and _REGISTRY_HOST.fullmatch(text) is not None


class Upstreams:
    def __init__(
        self,
        settings: Settings,
        upstreams: list[Upstream] | None = None,
        metrics: Metrics | None = None,
        *,
        egress: Egress | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.egress = egress or Egress()
        self._clock = clock
        self._all_downloads = CountedSlots(settings.max_downloads)
        configured = upstreams or [self._make(u) for u in settings.upstreams]
        self._by_name = {upstream.name: upstream for upstream in configured}
        self.default = configured[0]
        # name -> upstream, least recently routed to first, and when each was last.
        self._dynamic: dict[str, Upstream] = {}
        self._last_used: dict[str, float] = {}
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def configured(self) -> list[Upstream]:
        """The operator's upstreams, without those made up on demand."""
        return list(self._by_name.values())

    def is_configured(self, upstream: Upstream) -> bool:
        """Whether `upstream` is one of the operator's (it lasts as long as the mirror)."""
        return self._by_name.get(upstream.name) is upstream

    def _make(self, upstream: UpstreamSettings, *, dynamic: bool = False) -> Upstream:
        # Configured upstreams may be anywhere; on-demand ones only where the policy permits.
        policy = self.egress.dynamic if dynamic else ANY_ADDRESS
        label = DYNAMIC_LABEL if dynamic else None
        quota = Quota(
            upstream.name,
            reserve=self.settings.quota_reserve,
            credentials=upstream.username is not None and not upstream.pass_client_credentials,
            metrics=self.metrics,
            label=label,
        )
        return Upstream(
            upstream,
            connect_timeout=self.settings.connect_timeout,
            read_timeout=self.settings.read_timeout,
            response_timeout=self.settings.response_timeout,
            breaker=CircuitBreaker(self.settings.breaker_failures, self.settings.breaker_cooldown),
            metrics=self.metrics,
            download_slots=(
                self._all_downloads,
                CountedSlots(self.settings.max_downloads_per_upstream),
            ),
            max_blob_size=self.settings.max_blob_size,
            connector=lambda: self.egress.connector(policy),
            metrics_label=label,
            max_manifest_size=self.settings.max_manifest_size,
            quota=quota,
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
        if (upstream := self._by_name.get(ns)) is not None:
            return upstream
        if (upstream := self._dynamic.pop(ns, None)) is not None:
            self._dynamic[ns] = upstream  # now the most recently used
            self._last_used[ns] = self._clock()
            return upstream
        if (
            not self.settings.allow_any_registry
            or not is_registry_host(ns)
            or not is_public_registry_name(ns)
        ):
            # A fast 404 sends containerd on to its next host (eventually the registry itself).
            raise RegistryError(
                ErrorCode.NAME_UNKNOWN, f"registry {ns[:100]!r} is not mirrored here"
            )
        if len(self._dynamic) >= MAX_DYNAMIC_UPSTREAMS and not self._evict_one():
            raise RegistryError(ErrorCode.NAME_UNKNOWN, "too many registries mirrored on demand")
        upstream = self._make(UpstreamSettings(ns, URL(f"https://{ns}")), dynamic=True)
        self._dynamic[ns] = upstream
        self._last_used[ns] = self._clock()
        return upstream

    def _evict_one(self) -> bool:
        """Drop the least recently used idle on-demand upstream; False when none is idle."""
        now = self._clock()
        for name, upstream in self._dynamic.items():
            if now - self._last_used[name] < DYNAMIC_IDLE:
                return False  # in order of use: the rest were used more recently still
            if _downloading(upstream):
                continue
            del self._dynamic[name], self._last_used[name]
            closing = asyncio.get_running_loop().create_task(upstream.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
            return True
        return False

    async def close(self) -> None:
        for upstream in self:
            await upstream.close()
        await asyncio.gather(*self._closing)


def _downloading(upstream: Upstream) -> bool:
    """Whether a blob stream of this upstream is open: it holds one of the upstream's own
    download slots (the last limit in `download_slots`)."""
    own = upstream.download_slots[-1]
    return isinstance(own, CountedSlots) and own.taken > 0


class CountedSlots(asyncio.Semaphore):
    """A semaphore that knows how many of its slots are taken, of how many, and tells a waiter
    when one is given back (prefetch takes a slot only while enough stay free for clients)."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.capacity = value
        self.taken = 0
        self._released = asyncio.Event()

    async def acquire(self) -> Literal[True]:
        await super().acquire()
        self.taken += 1
        return True

    def release(self) -> None:
        self.taken -= 1
        super().release()
        released, self._released = self._released, asyncio.Event()
        released.set()

    async def released(self) -> None:
        """Return when a slot is next given back."""
        await self._released.wait()
