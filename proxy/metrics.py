"""Every Prometheus metric the mirror exports, in one place.

Labels have bounded cardinality: route pattern, method, status class, cache result, upstream
name (configured, or at most `routing.MAX_DYNAMIC_UPSTREAMS`), request kind. Never a path, a
repository or a digest. The Grafana dashboard and the alert rules query exactly these names
(`tests/test_observability.py` checks it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from proxy.blobstore import BlobStore

PREFIX: Final = "registry_proxy"
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
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
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
        )
        self.ready = Gauge(f"{PREFIX}_ready", "1 when /readyz would answer 200.", registry=r)
        ProcessCollector(registry=r)

    def watch_store(self, store: BlobStore) -> None:
        self.registry.register(_StoreCollector(store))


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


class LoopLagMonitor:
    """Measures how late a periodic timer fires: a stuck event loop fails readiness."""

    def __init__(self, metrics: Metrics, interval: float = 1.0) -> None:
        self.interval = interval
        self.lag = 0.0
        self._gauge = metrics.loop_lag

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.lag = max(0.0, loop.time() - expected)
            self._gauge.set(self.lag)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        task = asyncio.create_task(self.run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
