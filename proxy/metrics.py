"""Every Prometheus metric the mirror exports, in one place.

Labels have bounded cardinality: route pattern, method (known ones, else `other`), status
class, cache result, upstream name (configured ones by name, every registry mirrored on demand
as `on-demand`), request kind. Never a path, a repository or a digest. The Grafana dashboard
and the alert rules query exactly these names (`tests/unit/test_observability.py` checks it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

PREFIX: Final = "registry_proxy"
ABORT_CAUSES: Final = ("client", "upstream", "mirror")
PREFETCH_SKIPS: Final = ("no_room", "queue_full", "failed")
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


class StoreFigures(Protocol):
    """What the metrics read from the blob store (`proxy.cache.store.BlobStore`)."""

    @property
    def downloads_in_flight(self) -> int: ...
    @property
    def evictions(self) -> int: ...
    @property
    def evicted_bytes(self) -> int: ...
    @property
    def digest_mismatches(self) -> int: ...

    def stats(self) -> _Stats: ...


class _Stats(Protocol):
    @property
    def size(self) -> int: ...
    @property
    def entries(self) -> int: ...
    @property
    def reserved(self) -> int: ...
    @property
    def budget(self) -> int: ...


class Metrics:
    """Every metric, on an injectable registry.

    With `merged_from`, a scrape reads the values every process wrote to that directory
    (prometheus-client's multiprocess mode, which the caller switches on before any metric
    exists: `proxy.workers.sharding.worker_metrics`); this class has no process-wide effect.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, merged_from: Path | None = None
    ) -> None:
        self.merged_from = merged_from
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
        self.upstream_resumes = Counter(
            f"{PREFIX}_upstream_resumes",
            "Blob downloads continued with a Range request where an upstream connection broke.",
            ["upstream"],
            registry=r,
        )
        self.split_downloads = Counter(
            f"{PREFIX}_upstream_large_downloads",
            "Blob downloads large enough to be split over several connections, by whether they"
            " were (several: the first connection was slower than parallel_download_below, or"
            " parallel_download_probe is 0; one: it was not, or the blob was complete first).",
            ["upstream", "connections"],
            registry=r,
        )
        self.worker_handoffs = Counter(
            f"{PREFIX}_worker_handoffs",
            "Blob requests a worker passed to the worker that owns the blob (--workers), by how"
            " the bytes came: file (sent by this worker from the owner's download file) or relay"
            " (through the owner).",
            ["via"],
            registry=r,
        )
        self.aborted_responses = Counter(
            f"{PREFIX}_aborted_responses",
            "Responses cut off mid-body after their status went out, by cause (client: it went"
            " away or stopped reading; upstream: the upstream failed or sent bad bytes; mirror).",
            ["cause"],
            registry=r,
        )
        self.prepared_answers = Counter(
            f"{PREFIX}_prepared_answers",
            "Manifest hits answered from a prepared response (proxy.server.prepared), by where:"
            " connection (as soon as parsed) or app (through routing, for requests the"
            " connection does not take).",
            ["answered"],
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
        # Upstream quota (proxy.upstream.quota): what the upstream's rate-limit headers said.
        self.quota_limit = Gauge(
            f"{PREFIX}_upstream_quota_limit",
            "Requests the upstream allows per window (its ratelimit-limit header).",
            ["upstream"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.quota_remaining = Gauge(
            f"{PREFIX}_upstream_quota_remaining",
            "Requests left in the upstream's window (its ratelimit-remaining header).",
            ["upstream"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.quota_window = Gauge(
            f"{PREFIX}_upstream_quota_window_seconds",
            "The upstream's rate-limit window (the w= of its ratelimit headers).",
            ["upstream"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.quota_saving = Gauge(
            f"{PREFIX}_upstream_quota_saving",
            "1 while cached tags of the upstream are served without revalidation: its remaining"
            " quota is below quota_reserve, or it answered 429.",
            ["upstream"],
            registry=r,
            multiprocess_mode="livemax",
        )
        # Prefetch (proxy.cache.prefetch): blobs fetched before a client asked, and whether it paid.
        self.prefetched_blobs = Counter(
            f"{PREFIX}_prefetched_blobs",
            "Blobs downloaded into the cache by prefetch, before a client asked for them.",
            registry=r,
        )
        self.prefetched_bytes = Counter(
            f"{PREFIX}_prefetched_bytes",
            "Bytes of the blobs downloaded by prefetch.",
            registry=r,
        )
        self.prefetch_used = Counter(
            f"{PREFIX}_prefetch_used_blobs",
            "Prefetched blobs a client then read (first read only).",
            registry=r,
        )
        self.prefetch_skipped = Counter(
            f"{PREFIX}_prefetch_skipped_blobs",
            "Blobs prefetch did not fetch, by reason (no_room: they would not fit beside what"
            " is in use; queue_full; failed).",
            ["reason"],
            registry=r,
        )
        self._store: StoreFigures | None = None
        self._store_gauges: dict[str, Gauge] = {}
        self._store_counters: dict[str, tuple[Counter, int]] = {}
        self._request_series: dict[
            tuple[str, str, str, str, str | None], tuple[Histogram, Counter | None]
        ] = {}
        if merged_from is None:
            ProcessCollector(registry=r)  # per process; meaningless summed over workers
        # Series exist from the start, so the first burst after a restart is a rate, not a jump
        # from nothing, and "none yet" reads 0 rather than "no data".
        for source in ("cache", "upstream"):
            self.served_bytes.labels(source)
        for cause in ABORT_CAUSES:
            self.aborted_responses.labels(cause)
        for via in ("file", "relay"):
            self.worker_handoffs.labels(via)
        for answered in ("connection", "app"):
            self.prepared_answers.labels(answered)
        for kind in ("blob", "manifest", "tag"):
            for result in ("hit", "miss", "coalesced", "stale"):
                self.cache_requests.labels(kind, result)
        for result in ("hit", "miss", "coalesced"):
            self.blob_first_byte.labels(result)
        for reason in PREFETCH_SKIPS:
            self.prefetch_skipped.labels(reason)

    def request_series(
        self, route: str, method: str, status_class: str, cache: str, kind: str | None
    ) -> tuple[Histogram, Counter | None]:
        """The request histogram's child for these labels, and the cache counter's for `kind`
        (None: not counted), each looked up once: `labels()` takes a lock and builds its key
        on every call. The label values are bounded, so is this table."""
        key = (route, method, status_class, cache, kind)
        series = self._request_series.get(key)
        if series is None:
            series = (
                self.request_duration.labels(route, method, status_class, cache),
                None if kind is None else self.cache_requests.labels(kind, cache),
            )
            self._request_series[key] = series
        return series

    def watch_store(self, store: StoreFigures) -> None:
        """Export the store's figures. Workers each hold a share of the cache: their gauges add
        up (livesum), and counters are advanced from the store's own totals at every scrape
        and health tick; `_SyncFirst` makes a scrape of this registry read current values."""
        self._store = store
        self.registry.register(_SyncFirst(self))
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
        if self.merged_from is None:
            return self.registry
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=str(self.merged_from))  # type: ignore[no-untyped-call]
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


class _SyncFirst(Collector):
    """Registered before the store's gauges, so a scrape of this registry brings them up to
    date before it reads them; it exports nothing itself."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        self.metrics.sync_store()
        return iter(())
