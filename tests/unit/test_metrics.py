"""What the mirror reports about itself: metric values, health endpoints and the access log.

Each test sends requests through the in-process mirror in front of the fake upstream and reads
the resulting values from the app's own `CollectorRegistry`. The middleware records a request's
metrics and then writes its access log line, both after the body has gone out, so every helper
here awaits that log line before reading a metric: an event, never a sleep.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from fakeupstream import ACCEPT_ALL_MANIFESTS, FakeUpstreamServer, Gate
from harness.filesystems import tmpfs
from harness.mirror import StartMirror
from harness.ports import free_port

from proxy.metrics import REQUEST_BUCKETS
from proxy.oci import Digest
from proxy.ops.logging import JsonFormatter
from proxy.server import keys as state

Client = TestClient[web.Request, web.Application]
ACCEPT = {"Accept": ACCEPT_ALL_MANIFESTS}
WAIT_SECONDS = 10.0
# Every access log line carries at least these (README "Observability").
ACCESS_FIELDS = {
    "time", "level", "logger", "remote", "method", "path", "route", "status", "bytes",
    "aborted", "duration_ms", "cache", "upstream", "user_agent",
}  # fmt: skip


class AccessLog(logging.Handler):
    """Collects `registry_proxy.access` records; tests await a record count instead of sleeping."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._changed.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(WAIT_SECONDS):
            while len(self.records) < count:
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
def access_log() -> Iterator[AccessLog]:
    logger = logging.getLogger("registry_proxy.access")
    handler = AccessLog()
    level = logger.level
    logger.setLevel(logging.DEBUG)  # probes and scrapes log at debug
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def fetch(
    client: Client, path: str, log: AccessLog, *, method: str = "GET", **kwargs: Any
) -> tuple[aiohttp.ClientResponse, bytes]:
    """One request, its whole body, and the moment the mirror has accounted for it."""
    expected = len(log.records) + 1
    response = await client.request(method, path, **kwargs)
    body = await response.read()
    await log.wait_for(expected)
    return response, body


def value(client: Client, name: str, **labels: str) -> float:
    """A sample from the mirror's registry; a labelled child never observed reads as 0."""
    found = client.app[state.METRICS].registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def requests_counted(client: Client, route: str, cache: str, status_class: str = "2xx") -> float:
    return value(
        client,
        "registry_proxy_http_request_duration_seconds_count",
        route=route,
        method="GET",
        status_class=status_class,
        cache=cache,
    )


def add_blob(upstream: FakeUpstreamServer, size: int) -> tuple[str, bytes]:
    data = os.urandom(size)
    upstream.registry.add_image("team/app", "1.0", [b"x"])  # makes the repository known
    return upstream.registry.add_blob(data), data


def blob_path(digest: str) -> str:
    return f"/v2/team/app/blobs/{digest}"


async def finish_download(client: Client, digest: str) -> None:
    download = client.app[state.STORE].in_flight(Digest.parse(digest))
    if download is not None and download.task is not None:
        async with asyncio.timeout(WAIT_SECONDS):
            await download.task


async def pull_blob(client: Client, digest: str, log: AccessLog) -> aiohttp.ClientResponse:
    """GET a blob, then wait until its download (if any) is in the cache."""
    response, _ = await fetch(client, blob_path(digest), log)
    assert response.status == 200
    await finish_download(client, digest)
    return response


# --------------------------------------------------------------------------------------------
# Cache results
# --------------------------------------------------------------------------------------------


async def test_a_blob_miss_then_a_hit_are_counted_by_cache_result_and_route(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, access_log: AccessLog
) -> None:
    digest, _ = add_blob(fake_upstream, 10_000)
    client = await mirror()

    miss = await pull_blob(client, digest, access_log)
    hit = await pull_blob(client, digest, access_log)

    assert (miss.headers["X-Cache"], hit.headers["X-Cache"]) == ("MISS", "HIT")
    lookups = "registry_proxy_cache_requests_total"
    assert value(client, lookups, kind="blob", result="miss") == 1
    assert value(client, lookups, kind="blob", result="hit") == 1
    assert requests_counted(client, "blob", "miss") == 1
    assert requests_counted(client, "blob", "hit") == 1


async def test_tag_and_digest_manifest_lookups_are_counted_under_their_own_kinds(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, access_log: AccessLog
) -> None:
    image = fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    client = await mirror()

    for _ in range(2):
        response, _ = await fetch(client, "/v2/team/app/manifests/1.0", access_log, headers=ACCEPT)
        assert response.status == 200
    by_digest = f"/v2/team/app/manifests/{image.manifest_digest}"
    response, _ = await fetch(client, by_digest, access_log, headers=ACCEPT)
    assert response.status == 200

    lookups = "registry_proxy_cache_requests_total"
    assert value(client, lookups, kind="tag", result="miss") == 1
    assert value(client, lookups, kind="tag", result="hit") == 1
    # The tag's manifest is in the store by now, so its digest is a hit.
    assert value(client, lookups, kind="manifest", result="hit") == 1
    assert requests_counted(client, "manifest", "hit") == 2


async def test_a_request_joining_a_download_in_flight_counts_as_coalesced(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, access_log: AccessLog
) -> None:
    digest, data = add_blob(fake_upstream, 1024 * 1024)
    gate = fake_upstream.registry.gate[digest] = Gate(after_bytes=256 * 1024)
    client = await mirror()
    expected = len(access_log.records) + 2

    leader = await client.get(blob_path(digest))  # headers: the download is streaming
    await gate.reached.wait()  # and held half way
    follower = await client.get(blob_path(digest))  # headers: it has joined that download
    gate.release.set()
    bodies = await asyncio.gather(leader.read(), follower.read())
    await access_log.wait_for(expected)

    assert (leader.headers["X-Cache"], follower.headers["X-Cache"]) == ("MISS", "COALESCED")
    assert list(bodies) == [data, data]
    lookups = "registry_proxy_cache_requests_total"
    assert value(client, lookups, kind="blob", result="miss") == 1
    assert value(client, lookups, kind="blob", result="coalesced") == 1
    assert requests_counted(client, "blob", "coalesced") == 1
    assert (
        value(client, "registry_proxy_blob_time_to_first_byte_seconds_count", cache="coalesced")
        == 1
    )
    # One download served both clients.
    fetched = value(client, "registry_proxy_upstream_fetched_bytes_total", upstream="fake")
    assert fetched == len(data)


async def test_a_tag_answered_from_the_cache_while_the_upstream_is_down_counts_as_stale(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, access_log: AccessLog
) -> None:
    fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    client = await mirror(revalidate_timeout=0.5)
    await fetch(client, "/v2/team/app/manifests/1.0", access_log, headers=ACCEPT)
    await age_resolution(client, "team/app", "1.0")
    await fake_upstream.stop()

    response, _ = await fetch(client, "/v2/team/app/manifests/1.0", access_log, headers=ACCEPT)

    assert response.headers["X-Cache"] == "STALE"
    assert value(client, "registry_proxy_cache_requests_total", kind="tag", result="stale") == 1
    assert requests_counted(client, "manifest", "stale") == 1


async def age_resolution(client: Client, repository: str, tag: str) -> None:
    """Make a cached resolution stale, as time passing (or an operator invalidating it) would."""
    assert await client.app[state.TAGS].invalidate("fake", repository, tag) == 1


@pytest.mark.parametrize(("failure", "reason"), [("500", "status_5xx"), ("refused", "unreachable")])
async def test_an_upstream_failure_counts_an_upstream_error_by_reason_and_an_error_request(
    mirror: StartMirror,
    fake_upstream: FakeUpstreamServer,
    access_log: AccessLog,
    failure: str,
    reason: str,
) -> None:
    digest, _ = add_blob(fake_upstream, 10_000)
    client = await mirror()
    if failure == "refused":
        await fake_upstream.stop()
    else:
        fake_upstream.registry.fail_next("/blobs/", 500)

    response, _ = await fetch(client, blob_path(digest), access_log)

    assert response.status >= 500
    errors = "registry_proxy_upstream_errors_total"
    assert value(client, errors, upstream="fake", kind="blob", reason=reason) == 1
    assert requests_counted(client, "blob", "error", f"{response.status // 100}xx") == 1
    assert value(client, "registry_proxy_cache_requests_total", kind="blob", result="miss") == 0


# --------------------------------------------------------------------------------------------
# Bytes and time
# --------------------------------------------------------------------------------------------


async def test_served_bytes_are_split_by_source_and_upstream_bytes_count_the_one_download(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, access_log: AccessLog
) -> None:
    digest, data = add_blob(fake_upstream, 300_000)
    client = await mirror()

    await pull_blob(client, digest, access_log)
    assert value(client, "registry_proxy_served_bytes_total", source="upstream") == len(data)
    assert value(client, "registry_proxy_served_bytes_total", source="cache") == 0
    for _ in range(2):
        await pull_blob(client, digest, access_log)

    assert value(client, "registry_proxy_served_bytes_total", source="cache") == 2 * len(data)
    assert value(client, "registry_proxy_upstream_fetched_bytes_total", upstream="fake") == len(
        data
    )
    # A Range request counts the bytes it sends, not the blob's size.
    await fetch(client, blob_path(digest), access_log, headers={"Range": "bytes=0-99"})
    assert value(client, "registry_proxy_served_bytes_total", source="cache") == 2 * len(data) + 100


async def test_time_to_first_byte_is_observed_once_per_blob_response_by_cache_result(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, access_log: AccessLog
) -> None:
    digest, _ = add_blob(fake_upstream, 100_000)
    client = await mirror()
    started = time.monotonic()

    await pull_blob(client, digest, access_log)
    await pull_blob(client, digest, access_log)
    elapsed = time.monotonic() - started

    ttfb = "registry_proxy_blob_time_to_first_byte_seconds"
    for cache in ("miss", "hit"):
        assert value(client, f"{ttfb}_count", cache=cache) == 1
        assert 0 < value(client, f"{ttfb}_sum", cache=cache) <= elapsed


async def test_request_histograms_resolve_sub_millisecond_hits_and_multi_minute_blobs(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, access_log: AccessLog
) -> None:
    fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    client = await mirror()
    await fetch(client, "/v2/team/app/manifests/1.0", access_log, headers=ACCEPT)

    labels = {"route": "manifest", "method": "GET", "status_class": "2xx", "cache": "miss"}
    registry = client.app[state.METRICS].registry
    bucket = "registry_proxy_http_request_duration_seconds_bucket"
    for bound in ("0.0005", "0.001", "0.005", "10.0", "300.0"):
        assert registry.get_sample_value(bucket, {**labels, "le": bound}) is not None, bound
    assert registry.get_sample_value(bucket, {**labels, "le": "+Inf"}) == 1
    assert min(REQUEST_BUCKETS) <= 0.0005
    assert max(REQUEST_BUCKETS) >= 300


async def test_the_metrics_endpoint_answers_in_the_prometheus_text_format(
    mirror: StartMirror, access_log: AccessLog
) -> None:
    client = await mirror()
    response, body = await fetch(client, "/metrics", access_log)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    assert "# TYPE registry_proxy_http_request_duration_seconds histogram" in body.decode()


# --------------------------------------------------------------------------------------------
# The cache's own numbers
# --------------------------------------------------------------------------------------------


async def test_cache_gauges_report_size_entries_and_budget(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, access_log: AccessLog
) -> None:
    first, first_data = add_blob(fake_upstream, 30_000)
    second, second_data = add_blob(fake_upstream, 50_000)
    client = await mirror(cache_max_size=10_000_000)
    assert value(client, "registry_proxy_cache_size_bytes") == 0
    assert value(client, "registry_proxy_cache_entries") == 0

    await pull_blob(client, first, access_log)
    await pull_blob(client, second, access_log)

    assert value(client, "registry_proxy_cache_size_bytes") == len(first_data) + len(second_data)
    assert value(client, "registry_proxy_cache_entries") == 2
    assert value(client, "registry_proxy_cache_budget_bytes") == 10_000_000
    assert value(client, "registry_proxy_cache_reserved_bytes") == 0
    assert value(client, "registry_proxy_downloads_in_flight") == 0


async def test_a_download_in_flight_shows_in_the_gauges_until_it_lands(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, access_log: AccessLog
) -> None:
    digest, data = add_blob(fake_upstream, 500_000)
    gate = fake_upstream.registry.gate[digest] = Gate(after_bytes=100_000)
    client = await mirror()

    expected = len(access_log.records) + 1
    response = await client.get(blob_path(digest))  # headers: the download has its reservation
    await gate.reached.wait()
    assert value(client, "registry_proxy_downloads_in_flight") == 1
    assert value(client, "registry_proxy_cache_reserved_bytes") == len(data)
    assert value(client, "registry_proxy_cache_size_bytes") == 0
    gate.release.set()
    assert await response.read() == data
    await access_log.wait_for(expected)
    await finish_download(client, digest)

    assert value(client, "registry_proxy_downloads_in_flight") == 0
    assert value(client, "registry_proxy_cache_reserved_bytes") == 0
    assert value(client, "registry_proxy_cache_size_bytes") == len(data)


async def test_exceeding_a_small_budget_counts_evicted_blobs_and_bytes(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, access_log: AccessLog
) -> None:
    blobs = [add_blob(fake_upstream, 40_000) for _ in range(3)]
    client = await mirror(cache_max_size=100_000)

    for digest, _ in blobs[:2]:
        await pull_blob(client, digest, access_log)
    assert value(client, "registry_proxy_cache_evictions_total") == 0
    await pull_blob(client, blobs[2][0], access_log)

    assert value(client, "registry_proxy_cache_evictions_total") == 1
    assert value(client, "registry_proxy_cache_evicted_bytes_total") == 40_000
    assert value(client, "registry_proxy_cache_size_bytes") == 80_000
    assert value(client, "registry_proxy_cache_entries") == 2


async def test_a_lying_upstream_counts_a_digest_mismatch_and_nothing_is_cached(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, access_log: AccessLog
) -> None:
    digest, _ = add_blob(fake_upstream, 200_000)
    fake_upstream.registry.lie_about_digest.add(digest)
    client = await mirror()
    assert value(client, "registry_proxy_digest_mismatches_total") == 0

    expected = len(access_log.records) + 1
    response = await client.get(blob_path(digest))
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    await access_log.wait_for(expected)
    await finish_download(client, digest)

    assert value(client, "registry_proxy_digest_mismatches_total") == 1
    assert value(client, "registry_proxy_cache_entries") == 0
    assert value(client, "registry_proxy_cache_size_bytes") == 0


# --------------------------------------------------------------------------------------------
# Health, readiness and where /metrics is served
# --------------------------------------------------------------------------------------------


async def test_healthz_answers_ok(mirror: StartMirror, access_log: AccessLog) -> None:
    client = await mirror()
    response, body = await fetch(client, "/healthz", access_log)
    assert response.status == 200
    assert json.loads(body) == {"status": "ok"}


async def test_readyz_is_200_and_the_ready_gauge_1_with_a_writable_cache(
    mirror: StartMirror, access_log: AccessLog
) -> None:
    client = await mirror()
    response, body = await fetch(client, "/readyz", access_log)

    assert response.status == 200
    assert json.loads(body) == {
        "status": "ready",
        "checks": {"cache": "ok", "event_loop": "ok"},
    }
    assert value(client, "registry_proxy_ready") == 1


async def test_readyz_is_503_and_the_ready_gauge_0_when_the_cache_dir_is_read_only(
    mirror: StartMirror, access_log: AccessLog, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as cache_dir:
        client = await mirror(cache_dir=cache_dir)
        response, body = await fetch(client, "/readyz", access_log)
        await client.close()

    assert response.status == 503
    answer = json.loads(body)
    assert answer["status"] == "not ready"
    assert answer["checks"]["cache"].startswith("not writable")
    assert answer["checks"]["event_loop"] == "ok"
    assert value(client, "registry_proxy_ready") == 0


async def test_metrics_listen_serves_metrics_on_its_own_address_and_not_on_the_main_port(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, access_log: AccessLog
) -> None:
    fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    port = free_port()
    client = await mirror(metrics_listen=("127.0.0.1", port))
    await fetch(client, "/v2/team/app/manifests/1.0", access_log, headers=ACCEPT)

    on_main, _ = await fetch(client, "/metrics", access_log)
    assert on_main.status == 404
    timeout = aiohttp.ClientTimeout(total=WAIT_SECONDS)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as separate,
    ):
        assert separate.status == 200
        text = await separate.text()
    assert 'registry_proxy_cache_requests_total{kind="tag",result="miss"} 1.0' in text
    # Probes keep working on the serving port.
    health, _ = await fetch(client, "/healthz", access_log)
    assert health.status == 200


# --------------------------------------------------------------------------------------------
# The access log
# --------------------------------------------------------------------------------------------


async def test_each_request_writes_one_json_access_log_line_with_the_documented_fields(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, access_log: AccessLog
) -> None:
    digest, data = add_blob(fake_upstream, 20_000)
    client = await mirror()
    headers = {"User-Agent": "containerd/2.0"}

    await fetch(client, blob_path(digest) + "?ns=fake", access_log, headers=headers)
    await finish_download(client, digest)
    await fetch(client, blob_path(digest), access_log, headers=headers)
    await fetch(client, "/v2/team/app/manifests/nope", access_log, headers=ACCEPT)

    lines = [JsonFormatter().format(record) for record in access_log.records]
    assert len(lines) == 3
    assert all("\n" not in line for line in lines)
    miss, hit, missing = (json.loads(line) for line in lines)
    for entry in (miss, hit, missing):
        assert set(entry) >= ACCESS_FIELDS
        assert entry["level"] == "info"
        assert entry["logger"] == "registry_proxy.access"
        assert entry["remote"] == "127.0.0.1"
        assert entry["method"] == "GET"
        assert entry["upstream"] == "fake"
        assert isinstance(entry["duration_ms"], float)
        assert entry["duration_ms"] >= 0
    assert miss["path"] == blob_path(digest) + "?ns=fake"
    assert (miss["route"], miss["status"], miss["cache"]) == ("blob", 200, "miss")
    assert (hit["route"], hit["status"], hit["cache"]) == ("blob", 200, "hit")
    assert miss["bytes"] == hit["bytes"] == len(data)
    assert miss["user_agent"] == "containerd/2.0"
    assert (missing["route"], missing["status"], missing["cache"]) == ("manifest", 404, "error")
    assert missing["bytes"] > 0  # the OCI error body


async def test_a_blob_the_upstream_cuts_mid_body_is_logged_and_counted_as_aborted(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, access_log: AccessLog
) -> None:
    digest, _ = add_blob(fake_upstream, 500_000)
    fake_upstream.registry.truncate[digest] = 300_000
    client = await mirror()

    expected = len(access_log.records) + 1
    response = await client.get(blob_path(digest))
    assert response.status == 200  # the status went out before the upstream broke
    received = bytearray()

    async def read_until_cut() -> None:
        async for chunk in response.content.iter_any():
            received.extend(chunk)

    with pytest.raises(aiohttp.ClientPayloadError):
        await read_until_cut()
    await access_log.wait_for(expected)

    record = access_log.records[-1]
    entry = json.loads(JsonFormatter().format(record))
    assert (entry["status"], entry["aborted"], entry["abort_cause"]) == (200, True, "upstream")
    assert entry["bytes"] == 300_000  # what landed before the cut, no more
    assert len(received) <= entry["bytes"]
    assert record.getMessage().endswith(" 200 aborted (upstream) after 300000 bytes")
    assert value(client, "registry_proxy_aborted_responses_total", cause="upstream") == 1
    assert value(client, "registry_proxy_aborted_responses_total", cause="client") == 0


async def test_a_client_leaving_mid_body_is_logged_and_counted_as_aborted_by_the_client(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, access_log: AccessLog
) -> None:
    # Larger than what the socket buffers between the two ends can hold.
    digest, data = add_blob(fake_upstream, 32 * 1024 * 1024)
    client = await mirror()
    await pull_blob(client, digest, access_log)

    expected = len(access_log.records) + 1
    response = await client.get(blob_path(digest))
    assert await response.content.readany()
    response.close()  # the client goes away after its first bytes
    await access_log.wait_for(expected)

    entry = json.loads(JsonFormatter().format(access_log.records[-1]))
    assert (entry["status"], entry["cache"]) == (200, "hit")
    assert (entry["aborted"], entry["abort_cause"]) == (True, "client")
    assert 0 < entry["bytes"] < len(data)
    assert value(client, "registry_proxy_aborted_responses_total", cause="client") == 1
    assert value(client, "registry_proxy_aborted_responses_total", cause="upstream") == 0


async def test_a_complete_transfer_is_not_aborted(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, access_log: AccessLog
) -> None:
    digest, data = add_blob(fake_upstream, 100_000)
    client = await mirror()
    await pull_blob(client, digest, access_log)
    entry = json.loads(JsonFormatter().format(access_log.records[-1]))
    assert (entry["aborted"], entry["bytes"]) == (False, len(data))
    assert "abort_cause" not in entry
    for cause in ("client", "upstream", "mirror"):
        assert value(client, "registry_proxy_aborted_responses_total", cause=cause) == 0
