"""How a download's first connection is cut into parts (proxy.cache.fetch)."""

from __future__ import annotations

from proxy.cache.fetch import MIN_PART, SOCKET_STEP, FetchPolicy, Part, _split

MiB = 1024 * 1024


def spans(parts: list[Part]) -> list[tuple[int, int]]:
    return [(part.start, part.end) for part in parts]


def test_at_once_the_blob_is_cut_in_equal_parts() -> None:
    assert spans(_split(Part(0, 4 * MiB), 4)) == [
        (0, MiB), (MiB, 2 * MiB), (2 * MiB, 3 * MiB), (3 * MiB, 4 * MiB),
    ]  # fmt: skip


def test_later_the_first_part_keeps_a_margin_past_its_position_and_the_rest_is_shared() -> None:
    first = Part(0, 100 * MiB, position=10 * MiB)
    parts = _split(first, 4, SOCKET_STEP)
    assert parts[0] is first
    # 90 MiB left in four: the first keeps 22.5 MiB past its position, the others share 67.5.
    assert spans(parts) == [
        (0, 32 * MiB + MiB // 2),
        (32 * MiB + MiB // 2, 55 * MiB),
        (55 * MiB, 77 * MiB + MiB // 2),
        (77 * MiB + MiB // 2, 100 * MiB),
    ]
    near_end = Part(0, 8 * MiB, position=MiB)
    assert spans(_split(near_end, 4, SOCKET_STEP)) == [
        (0, 5 * MiB), (5 * MiB, 6 * MiB), (6 * MiB, 7 * MiB), (7 * MiB, 8 * MiB),
    ]  # fmt: skip


def test_no_part_is_smaller_than_the_minimum_and_too_little_left_changes_nothing() -> None:
    parts = _split(Part(0, 8 * MiB, position=MiB), 4, SOCKET_STEP + MiB // 2)
    assert all(part.end - part.start >= MIN_PART for part in parts)
    # 2.5 MiB left after the first part's 4.5: two parts of 1.25 MiB, not three of 0.83.
    assert spans(parts) == [
        (0, 5 * MiB + MiB // 2),
        (5 * MiB + MiB // 2, 6 * MiB + 3 * MiB // 4),
        (6 * MiB + 3 * MiB // 4, 8 * MiB),
    ]
    first = Part(0, 6 * MiB, position=2 * MiB)
    assert _split(first, 4, SOCKET_STEP) == [first]
    assert first.end == 6 * MiB


def test_a_blob_is_split_only_over_the_threshold_and_when_the_upstream_takes_ranges() -> None:
    policy = FetchPolicy(parallel_threshold=64 * MiB, parallel_parts=4)
    assert policy.parts(64 * MiB, ranges=True) == 1
    assert policy.parts(65 * MiB, ranges=True) == 4
    assert policy.parts(65 * MiB, ranges=False) == 1
