"""Every Prometheus metric the mirror exports, in one place.

Labels have bounded cardinality: route pattern, method (known ones, else `other`), status
class, cache result, upstream name (configured ones by name, every registry mirrored on demand
as `on-demand`), request kind. Never a path, a repository or a digest. The Grafana dashboard
and the alert rules query exactly these names (`tests/unit/test_observability.py` checks it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from proxy.blobstore import BlobStore

PREFIX: Final = "registry_proxy"
ABORT_CAUSES: Final = ("client", "upstream", "mirror")
# Sub-millisecond manifest hits up to multi-minute blob transfers.
REQUEST_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
TTFB_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
UPSTREAM_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
)  # fmt: skip


class Metrics:
    """With `multiprocess_dir`, every worker writes its values there (prometheus-client's
    multiprocess mode) and `/metrics` on any worker shows the sum over all of them."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, multiprocess_dir: Path | None = None
    ) -> None:
        self.multiprocess_dir = multiprocess_dir
        if multiprocess_dir is not None:
            # Chosen per process, after the fork: values go to mmap files the scrape merges.
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(multiprocess_dir)
            values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "Time to answer a client request, body included, by route and cache result.",
            ["route", "method", "status_class", "cache"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.blob_first_byte = Histogram(
            f"{PREFIX}_blob_time_to_first_byte_seconds",
            "Time from a blob request to its first body byte leaving the mirror.",
            ["cache"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            f"{PREFIX}_upstream_request_duration_seconds",
            "Time for the upstream to answer a request (headers), by upstream and kind.",
            ["upstream", "kind"],
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            f"{PREFIX}_upstream_errors",
            "Upstream requests that failed, by upstream, kind and reason.",
            ["upstream", "kind", "reason"],
            registry=r,
        )
        self.served_bytes = Counter(
            f"{PREFIX}_served_bytes",
            "Blob bytes sent to clients, by where they came from (cache or upstream).",
            ["source"],
            registry=r,
        )
        self.upstream_bytes = Counter(
            f"{PREFIX}_upstream_fetched_bytes",
            "Blob bytes received from upstreams.",
            ["upstream"],
            registry=r,
        )
        self.aborted_responses = Counter(
            f"{PREFIX}_aborted_responses",
            "Responses cut off mid-body after their status went out, by cause (client: it went"
            " away or stopped reading; upstream: the upstream failed or sent bad bytes; mirror).",
            ["cause"],
            registry=r,
        )
        self.cache_requests = Counter(
            f"{PREFIX}_cache_requests",
            "Cache lookups by kind (blob, manifest, tag) and result (hit, miss, coalesced, stale).",
            ["kind", "result"],
            registry=r,
        )
        self.loop_lag = Gauge(
            f"{PREFIX}_event_loop_lag_seconds",
            "How late a 1 s timer last fired: a busy or blocked event loop.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.ready = Gauge(
            f"{PREFIX}_ready",
            "1 when /readyz would answer 200.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self._store: BlobStore | None = None
        self._store_gauges: dict[str, Gauge] = {}
        self._store_counters: dict[str, tuple[Counter, int]] = {}
        if multiprocess_dir is None:
            ProcessCollector(registry=r)  # per process; meaningless summed over workers
        # Series exist from the start, so the first burst after a restart is a rate, not a jump
        # from nothing, and "none yet" reads 0 rather than "no data".
        for source in ("cache", "upstream"):
            self.served_bytes.labels(source)
        for cause in ABORT_CAUSES:
            self.aborted_responses.labels(cause)
        for kind in ("blob", "manifest", "tag"):
            for result in ("hit", "miss", "coalesced", "stale"):
                self.cache_requests.labels(kind, result)
        for result in ("hit", "miss", "coalesced"):
            self.blob_first_byte.labels(result)

    def watch_store(self, store: BlobStore) -> None:
        if self.multiprocess_dir is None:
            self.registry.register(_StoreCollector(store))
            return
        # Workers each hold a share of the cache: their gauges add up (livesum), and their
        # counters are advanced from the store's own totals on every health tick and scrape.
        self._store = store
        for name, help_text in _STORE_GAUGES.items():
            self._store_gauges[name] = Gauge(
                f"{PREFIX}_{name}", help_text, registry=self.registry, multiprocess_mode="livesum"
            )
        for name, help_text in _STORE_COUNTERS.items():
            counter = Counter(f"{PREFIX}_{name}", help_text, registry=self.registry)
            self._store_counters[name] = (counter, 0)
        self.sync_store()

    def sync_store(self) -> None:
        store = self._store
        if store is None:
            return
        stats = store.stats()
        current = {
            "cache_size_bytes": stats.size,
            "cache_reserved_bytes": stats.reserved,
            "cache_budget_bytes": stats.budget,
            "cache_entries": stats.entries,
            "downloads_in_flight": store.downloads_in_flight,
        }
        for name, value in current.items():
            self._store_gauges[name].set(value)
        totals = {
            "cache_evictions": store.evictions,
            "cache_evicted_bytes": store.evicted_bytes,
            "digest_mismatches": store.digest_mismatches,
        }
        for name, total in totals.items():
            counter, reported = self._store_counters[name]
            if total > reported:
                counter.inc(total - reported)
                self._store_counters[name] = (counter, total)

    def exposition(self) -> CollectorRegistry:
        """The registry a scrape reads: this process's, or every worker's merged."""
        self.sync_store()
        if self.multiprocess_dir is None:
            return self.registry
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=str(self.multiprocess_dir))  # type: ignore[no-untyped-call]
        return merged


_STORE_GAUGES: Final = {
    "cache_size_bytes": "Bytes of complete blobs in the cache.",
    "cache_reserved_bytes": "Bytes reserved by downloads in flight (count against the budget).",
    "cache_budget_bytes": "The cache's byte budget.",
    "cache_entries": "Blobs and manifests in the cache.",
    "downloads_in_flight": "Upstream blob downloads into the cache in progress.",
}
_STORE_COUNTERS: Final = {
    "cache_evictions": "Blobs evicted to make room.",
    "cache_evicted_bytes": "Bytes evicted to make room.",
    "digest_mismatches": "Upstream bodies that did not match their digest (never served).",
}


class _StoreCollector(Collector):
    """Reads the cache's own counters at scrape time, so the store needs no metrics code."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        stats = self.store.stats()
        yield GaugeMetricFamily(
            f"{PREFIX}_cache_size_bytes", "Bytes of complete blobs in the cache.", stats.size
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_cache_reserved_bytes",
            "Bytes reserved by downloads in flight (they count against the budget).",
            stats.reserved,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_cache_budget_bytes", "The cache's byte budget.", stats.budget
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_cache_entries", "Blobs and manifests in the cache.", stats.entries
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_downloads_in_flight",
            "Upstream blob downloads into the cache in progress.",
            self.store.downloads_in_flight,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_cache_evictions", "Blobs evicted to make room.", self.store.evictions
        )
        yield CounterMetricFamily(
            f"{PREFIX}_cache_evicted_bytes",
            "Bytes evicted to make room.",
            self.store.evicted_bytes,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_digest_mismatches",
            "Upstream bodies that did not match their digest (discarded, never served).",
            self.store.digest_mismatches,
        )


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
        task = asyncio.create_task(self.run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def cache_writable(directory: Path) -> str:
    # A unique name each time: a probe and the periodic check may run at once.
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".ready-") as probe:
            probe.write(b"ok")
            probe.flush()
    except OSError as exc:
        return f"not writable: {exc.strerror}"
    return "ok"
