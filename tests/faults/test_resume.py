"""Upstream blob connections that break, resumed where they broke, and large blobs fetched in
ranged parts (issue 15).

Every case holds the rule of the fault suite: a client gets the exact bytes or a transfer it sees
break, never a complete body with wrong bytes, and nothing partial lands at a final cache path.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from fakeupstream import FakeUpstreamServer, Gate, Image
from harness.mirror import Mirror, StartMirror

from faults.support import (
    REPOSITORY,
    Client,
    Outcome,
    assert_cache_sound,
    assert_exact_or_broken,
    audit_cache,
    fetch,
    settle,
)
from proxy.oci import Digest
from proxy.server import keys as state

MiB = 1024 * 1024
# Small enough for the tests, and the settings that split a 4 MiB blob into four parts at once.
PARALLEL = {
    "parallel_download_threshold": MiB,
    "parallel_download_parts": 4,
    "parallel_download_probe": 0.0,
}
FAST = {"resume_backoff": 0.01}
# Each case of an in-process mirror twice: bodies read through aiohttp's parser, and from the
# socket.
BOTH_BODY_READINGS = pytest.mark.usefixtures("body_reading")


def blob_url(digest: str) -> str:
    return f"/v2/{REPOSITORY}/blobs/{digest}"


def cache_dir(client: Client) -> Path:
    return client.app[state.SETTINGS].cache_dir


def resumes(client: Client) -> float:
    found = client.app[state.METRICS].registry.get_sample_value(
        "registry_proxy_upstream_resumes_total", {"upstream": "fake"}
    )
    return 0.0 if found is None else found


def ranges_asked(upstream: FakeUpstreamServer, digest: str) -> list[str | None]:
    return [r.get("Range") for r in upstream.registry.requests if digest in r.path]


async def cached(client: Client, digest: str, data: bytes) -> None:
    """The download is over, and the blob is in the cache, whole and verified."""
    await settle(client)
    assert assert_cache_sound(cache_dir(client)).blobs[digest] == len(data)
    hit = await fetch(client, blob_url(digest))
    assert (hit.headers["X-Cache"], hit.body) == ("HIT", data)


async def broke_and_cached_nothing(
    client: Client, outcome: Outcome, digest: str, data: bytes
) -> None:
    """The client saw its transfer break, and the blob is not in the cache."""
    assert_exact_or_broken(outcome, data)
    assert outcome.broken
    await settle(client)
    assert Digest.parse(digest) not in client.app[state.STORE]
    assert_cache_sound(cache_dir(client))


# ----------------------------------------------------------------- one connection, resumed


@BOTH_BODY_READINGS
@pytest.mark.parametrize("where", ["start", "middle", "one-before-the-end"])
async def test_a_reset_connection_is_resumed_where_it_broke_and_readers_see_only_a_pause(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image, where: str
) -> None:
    data = os.urandom(600_000)
    digest = fake_upstream.registry.add_blob(data)
    cut = {"start": 0, "middle": 300_000, "one-before-the-end": len(data) - 1}[where]
    fake_upstream.registry.cuts[digest] = [cut]
    client = await mirror(**FAST)

    outcomes = await asyncio.gather(*(fetch(client, blob_url(digest)) for _ in range(3)))
    assert [(o.status, o.body == data) for o in outcomes] == [(200, True)] * 3
    # A reset before any byte starts again from 0; after some, from the byte reached (the
    # reset discards what the upstream had not sent yet, so that may be before the cut).
    first, resumed = ranges_asked(fake_upstream, digest)
    assert first is None
    if cut == 0:
        assert resumed is None
    else:
        assert resumed is not None
        assert 0 < int(resumed.removeprefix("bytes=").removesuffix("-")) <= cut
    assert resumes(client) == 1
    await cached(client, digest, data)


@BOTH_BODY_READINGS
async def test_a_resumed_download_goes_through_the_registry_again_for_a_fresh_cdn_url(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    registry = fake_upstream.registry
    data = os.urandom(400_000)
    digest = registry.add_blob(data)
    registry.blob_redirect_to = fake_upstream.url  # a signed URL on "another host", each time new
    registry.cuts[digest] = [200_000]
    client = await mirror(**FAST)

    outcome = await fetch(client, blob_url(digest))
    assert outcome.body == data
    assert registry.count("GET", f"/blobs/{digest}") == 2  # re-resolved, not the old signed URL
    assert registry.count("GET", f"/cdn/{digest}") == 2
    await cached(client, digest, data)


@BOTH_BODY_READINGS
@pytest.mark.parametrize("answer", ["200", "another-size", "another-etag"])
async def test_a_resume_answered_with_another_body_starts_over_and_is_never_spliced(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image, answer: str
) -> None:
    registry = fake_upstream.registry
    data = os.urandom(600_000)
    digest = registry.add_blob(data)
    if answer == "200":
        registry.ignore_range.add(digest)
    elif answer == "another-size":
        registry.ranged_variant[digest] = (os.urandom(700_000), f'"{digest}"')
    else:
        registry.ranged_variant[digest] = (os.urandom(len(data)), '"another"')
    registry.cuts[digest] = [300_000]
    client = await mirror(**FAST)

    outcome = await fetch(client, blob_url(digest))
    # It had bytes of the first body when the download started over: it is cut off.
    assert_exact_or_broken(outcome, data)
    assert outcome.broken
    await settle(client)
    first, resumed, again = ranges_asked(fake_upstream, digest)
    assert (first, again) == (None, None)  # the resume, then a whole new start
    assert resumed is not None
    assert resumed.startswith("bytes=")
    await cached(client, digest, data)


@BOTH_BODY_READINGS
async def test_a_connection_that_never_gets_further_fails_after_the_bounded_attempts(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    data = os.urandom(500_000)
    digest = fake_upstream.registry.add_blob(data)
    fake_upstream.registry.truncate[digest] = 250_000  # every connection breaks there
    client = await mirror(resume_attempts=3, resume_backoff=0.01)

    outcome = await fetch(client, blob_url(digest))
    assert_exact_or_broken(outcome, data)
    assert outcome.broken
    await settle(client)
    assert ranges_asked(fake_upstream, digest) == [None] + ["bytes=250000-"] * 3
    assert Digest.parse(digest) not in client.app[state.STORE]
    assert_cache_sound(cache_dir(client))


@BOTH_BODY_READINGS
async def test_a_download_past_its_time_limit_breaks_its_readers_and_caches_nothing(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    registry = fake_upstream.registry
    data = os.urandom(4 * MiB)
    digest = registry.add_blob(data)
    gate = registry.gate[digest] = Gate(after_bytes=2 * MiB)  # then nothing, for ever
    client = await mirror(download_timeout=0.5)  # far less than the read timeout

    outcome = await fetch(client, blob_url(digest))
    await broke_and_cached_nothing(client, outcome, digest, data)

    gate.release.set()
    assert (await fetch(client, blob_url(digest))).body == data
    await cached(client, digest, data)


# ------------------------------------------------------------------------ parallel parts


@BOTH_BODY_READINGS
async def test_a_large_blob_is_fetched_in_ranged_parts_and_served_in_order(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    data = os.urandom(4 * MiB)
    digest = fake_upstream.registry.add_blob(data)
    client = await mirror(**PARALLEL)

    outcomes = await asyncio.gather(*(fetch(client, blob_url(digest)) for _ in range(3)))
    assert all(o.body == data for o in outcomes)
    assert sorted(ranges_asked(fake_upstream, digest), key=str) == [
        None, "bytes=1048576-2097151", "bytes=2097152-3145727", "bytes=3145728-",
    ]  # fmt: skip
    await cached(client, digest, data)


@BOTH_BODY_READINGS
async def test_a_small_blob_and_a_blob_of_an_upstream_ignoring_ranges_keep_one_connection(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    registry = fake_upstream.registry
    small = os.urandom(MiB)
    small_digest = registry.add_blob(small)
    large = os.urandom(4 * MiB)
    large_digest = registry.add_blob(large)
    registry.ignore_range.add(large_digest)
    client = await mirror(**PARALLEL, **FAST)

    assert (await fetch(client, blob_url(small_digest))).body == small
    assert ranges_asked(fake_upstream, small_digest) == [None]
    outcome = await fetch(client, blob_url(large_digest))
    assert_exact_or_broken(outcome, large)
    await cached(client, large_digest, large)
    # The parts were answered 200: the download went on over one connection.
    assert ranges_asked(fake_upstream, large_digest)[-1] is None


@BOTH_BODY_READINGS
async def test_a_part_that_breaks_is_resumed_while_the_others_complete(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    data = os.urandom(4 * MiB)
    digest = fake_upstream.registry.add_blob(data)
    # In the first part: the first response is its connection, and the only one to reach it.
    cut = 500_000
    fake_upstream.registry.cuts[digest] = [cut]
    client = await mirror(**PARALLEL, **FAST)

    outcomes = await asyncio.gather(*(fetch(client, blob_url(digest)) for _ in range(2)))
    assert all(o.body == data for o in outcomes)
    ranges = ranges_asked(fake_upstream, digest)
    assert len(ranges) == 5
    resumed = [r for r in ranges if r and r.endswith("-1048575")]
    assert len(resumed) == 1  # the first part, from where its connection broke, to its end
    assert 0 < int(resumed[0].removeprefix("bytes=").split("-")[0]) <= cut
    assert resumes(client) == 1
    await cached(client, digest, data)


@BOTH_BODY_READINGS
async def test_a_part_that_keeps_failing_fails_the_download_and_nothing_is_cached(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    data = os.urandom(4 * MiB)
    digest = fake_upstream.registry.add_blob(data)
    fake_upstream.registry.reset_after[digest] = 3 * MiB + 5  # in the last part, every time
    client = await mirror(**PARALLEL, resume_attempts=2, resume_backoff=0.01)

    outcome = await fetch(client, blob_url(digest))
    await broke_and_cached_nothing(client, outcome, digest, data)


@BOTH_BODY_READINGS
async def test_a_digest_mismatch_found_only_once_the_parts_are_joined_serves_no_whole_body(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    data = os.urandom(4 * MiB)
    digest = fake_upstream.registry.add_blob(data)
    wrong = bytearray(data)
    wrong[3 * MiB + 1234] ^= 0xFF  # in the last part, same size, same ETag
    fake_upstream.registry.ranged_variant[digest] = (bytes(wrong), f'"{digest}"')
    client = await mirror(**PARALLEL)

    outcomes = await asyncio.gather(*(fetch(client, blob_url(digest)) for _ in range(3)))
    for outcome in outcomes:
        assert_exact_or_broken(outcome, data)
        assert outcome.broken
    await settle(client)
    assert client.app[state.STORE].digest_mismatches == 1
    assert_cache_sound(cache_dir(client))


@BOTH_BODY_READINGS
async def test_parts_count_against_the_download_slots_and_never_exceed_them(
    mirror: StartMirror,
    fake_upstream: FakeUpstreamServer,
    image: Image,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = os.urandom(4 * MiB)
    digest = fake_upstream.registry.add_blob(data)
    client = await mirror(**PARALLEL, max_downloads_per_upstream=2)
    slots = client.app[state.UPSTREAMS].default.download_slots[-1]
    peak = 0
    acquire = slots.acquire

    async def counted() -> bool:
        nonlocal peak
        await acquire()
        peak = max(peak, getattr(slots, "taken", 0))
        return True

    monkeypatch.setattr(slots, "acquire", counted)
    assert (await fetch(client, blob_url(digest))).body == data
    assert len(ranges_asked(fake_upstream, digest)) == 4
    assert peak == 2
    await cached(client, digest, data)


# ------------------------------------------------------------ split only when one is slow


def large_downloads(client: Client, connections: str) -> float:
    found = client.app[state.METRICS].registry.get_sample_value(
        "registry_proxy_upstream_large_downloads_total",
        {"upstream": "fake", "connections": connections},
    )
    return 0.0 if found is None else found


async def until(condition: Callable[[], bool]) -> None:
    """Wait for `condition`, which the mirror makes true (a request it sends, a count): polled,
    as neither the fake upstream nor the metrics have an event for it."""
    async with asyncio.timeout(10):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


PROBED = {
    "parallel_download_threshold": MiB,
    "parallel_download_parts": 4,
    "parallel_download_probe": 0.05,
}


@BOTH_BODY_READINGS
async def test_a_slow_first_connection_is_split_after_the_probe(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    data = os.urandom(8 * MiB)
    digest = fake_upstream.registry.add_blob(data)
    # Every response pauses after its first MiB: 1 MiB in the probe's 50 ms is 20 MiB/s.
    gate = fake_upstream.registry.gate[digest] = Gate(after_bytes=MiB)
    client = await mirror(**PROBED, parallel_download_below=64 * MiB)

    fetching = asyncio.create_task(fetch(client, blob_url(digest)))
    await until(lambda: gate.hits == 4)  # the first connection, and three ranged parts
    first, *ranges = ranges_asked(fake_upstream, digest)
    assert first is None
    spans = [r.removeprefix("bytes=").split("-") for r in ranges if r is not None]
    starts = [int(start) for start, _ in spans]
    # The first connection keeps at least 4 MiB past where it was (a socket step in flight may
    # write that far); the other three share the rest, back to back, the last to the end.
    assert 4 * MiB <= starts[0] <= 5 * MiB
    assert [int(end) + 1 for _, end in spans[:-1]] == starts[1:]
    assert spans[-1][1] == ""
    assert large_downloads(client, "several") == 1
    gate.release.set()
    assert (await fetching).body == data
    await cached(client, digest, data)


@BOTH_BODY_READINGS
async def test_a_fast_first_connection_keeps_the_blob(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    data = os.urandom(16 * MiB)
    digest = fake_upstream.registry.add_blob(data)
    gate = fake_upstream.registry.gate[digest] = Gate(after_bytes=2 * MiB)
    # 2 MiB in the probe's 50 ms is 40 MiB/s; the bar is 1 MiB/s. (Split, 10 MiB would be left
    # for three more connections.)
    client = await mirror(**PROBED, parallel_download_below=MiB)

    fetching = asyncio.create_task(fetch(client, blob_url(digest)))
    await until(lambda: large_downloads(client, "one") == 1)  # the probe's decision
    gate.release.set()
    assert (await fetching).body == data
    assert ranges_asked(fake_upstream, digest) == [None]
    assert large_downloads(client, "several") == 0
    await cached(client, digest, data)


async def test_a_blob_complete_within_the_probe_is_neither_split_nor_held_back(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer, image: Image
) -> None:
    data = os.urandom(4 * MiB)
    digest = fake_upstream.registry.add_blob(data)
    client = await mirror(**{**PROBED, "parallel_download_probe": 30.0})

    started = time.monotonic()
    assert (await fetch(client, blob_url(digest))).body == data
    assert time.monotonic() - started < 15  # not kept until the probe's 30 s are up
    assert ranges_asked(fake_upstream, digest) == [None]
    assert large_downloads(client, "one") == 1
    await cached(client, digest, data)


# ------------------------------------------------------------------------------- SIGKILL


async def test_a_mirror_killed_during_a_parallel_download_leaves_nothing_after_restart(
    fake_upstream: FakeUpstreamServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REGISTRY_PROXY_PARALLEL_DOWNLOAD_THRESHOLD", "1M")
    monkeypatch.setenv("REGISTRY_PROXY_PARALLEL_DOWNLOAD_PARTS", "4")
    monkeypatch.setenv("REGISTRY_PROXY_PARALLEL_DOWNLOAD_PROBE", "0")
    registry = fake_upstream.registry
    registry.add_image(REPOSITORY, "1.0", [b"x"])
    data = os.urandom(4 * MiB)
    digest = registry.add_blob(data)
    gate = registry.gate[digest] = Gate(after_bytes=256 * 1024)  # every part pauses there
    mirror = Mirror(tmp_path, fake_upstream.url)
    await asyncio.to_thread(mirror.start)
    try:
        async with aiohttp.ClientSession() as session:
            url = f"{mirror.url}/v2/{REPOSITORY}/blobs/{digest}"

            async def pull() -> bytes | None:
                try:
                    async with session.get(url) as response:
                        return await response.read()
                except aiohttp.ClientError:
                    return None

            reader = asyncio.create_task(pull())
            deadline = time.monotonic() + 20
            while gate.hits < 4:  # a subprocess gives no event: poll, bounded
                assert time.monotonic() < deadline, f"{gate.hits} parts started"
                await asyncio.sleep(0.01)
            await asyncio.to_thread(mirror.kill)
            assert await reader in (None, data)  # never a complete wrong body
            assert audit_cache(mirror.cache_dir).problems == []  # at most a file in tmp/

            gate.release.set()
            await asyncio.to_thread(mirror.start)
            assert await pull() == data
            deadline = time.monotonic() + 20
            while audit_cache(mirror.cache_dir).temp:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert assert_cache_sound(mirror.cache_dir).blobs[digest] == len(data)
    finally:
        await asyncio.to_thread(mirror.stop)
