"""Liveness and readiness: is the event loop moving, does the cache directory take writes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Final

from proxy.metrics import Metrics
from proxy.tasks import in_background

# The event loop counts as stuck (not ready) when a 1 s timer fires this late.
MAX_LOOP_LAG: Final = 2.0
# How long an upstream probe's answer stands for /readyz.
UPSTREAM_PROBE_INTERVAL: Final = 10.0


class HealthMonitor:
    """Keeps readiness current without waiting for a probe: how late a 1 s timer fires (a
    stuck event loop) and, every few ticks, whether the cache directory takes a write."""

    def __init__(
        self, metrics: Metrics, cache_dir: Path, interval: float = 1.0, cache_every: int = 5
    ) -> None:
        self.interval = interval
        self.cache_dir = cache_dir
        self.cache_every = cache_every
        self.lag = 0.0
        self.cache = "unchecked"
        self._metrics = metrics
        self._probed: asyncio.Future[dict[str, str]] | None = None
        self._probed_until = 0.0

    @property
    def ready(self) -> bool:
        return self.lag < MAX_LOOP_LAG and self.cache == "ok"

    async def check_upstreams(
        self, probe: Callable[[], Awaitable[dict[str, str]]]
    ) -> dict[str, str]:
        """`probe`'s answer, run at most once per `UPSTREAM_PROBE_INTERVAL` however many ask
        (`/readyz?upstream=1` is open to every client), and once for concurrent askers."""
        loop = asyncio.get_running_loop()
        if self._probed is None or loop.time() >= self._probed_until:
            self._probed = asyncio.ensure_future(probe())
            self._probed_until = loop.time() + UPSTREAM_PROBE_INTERVAL
        return dict(await asyncio.shield(self._probed))

    async def check_cache(self) -> str:
        self.cache = await asyncio.to_thread(cache_writable, self.cache_dir)
        self._metrics.ready.set(1 if self.ready else 0)
        return self.cache

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for tick in itertools.count():
            if tick % self.cache_every == 0:
                await self.check_cache()
            expected = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.lag = max(0.0, loop.time() - expected)
            self._metrics.loop_lag.set(self.lag)
            self._metrics.sync_store()
            self._metrics.ready.set(1 if self.ready else 0)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with in_background(self.run(), "health monitor"):
            yield


def cache_writable(directory: Path) -> str:
    # A unique name each time: a probe and the periodic check may run at once.
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".ready-") as probe:
            probe.write(b"ok")
            probe.flush()
    except OSError as exc:
        return f"not writable: {exc.strerror}"
    return "ok"
