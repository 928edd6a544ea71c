"""How a large blob is cut into ranged parts (`proxy.cache.fetch.FetchPolicy.parts`): parts are
taken in order a few at a time, so none is so large that the hashed prefix (what readers get)
trails the download by most of the blob."""

from __future__ import annotations

import itertools

from proxy.cache.fetch import MAX_PART, FetchPolicy

MiB = 1024 * 1024
POLICY = FetchPolicy(parallel_threshold=64 * MiB, parallel_parts=4)


def spans(size: int, policy: FetchPolicy = POLICY, *, ranges: bool = True) -> list[int]:
    parts = policy.parts(size, ranges=ranges)
    assert parts[0].start == 0
    assert parts[-1].end == size
    assert all(a.end == b.start for a, b in itertools.pairwise(parts))
    return [part.end - part.start for part in parts]


def test_a_blob_under_the_threshold_or_without_ranges_is_one_part() -> None:
    assert spans(64 * MiB) == [64 * MiB]
    assert spans(GiB := 1024 * MiB, ranges=False) == [GiB]
    assert spans(GiB, FetchPolicy(parallel_threshold=64 * MiB, parallel_parts=1)) == [GiB]


def test_a_large_blob_gets_a_part_per_connection_and_none_over_the_maximum() -> None:
    assert spans(100 * MiB) == [25 * MiB] * 4
    one_gib = spans(1024 * MiB)
    assert len(one_gib) == 1024 * MiB // MAX_PART
    assert max(one_gib) <= MAX_PART
