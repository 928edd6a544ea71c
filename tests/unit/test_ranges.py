"""Byte ranges (RFC 9110 section 14) as the OCI conformance tests exercise them."""

from __future__ import annotations

from http import HTTPStatus

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.errors import ErrorCode, RegistryError
from proxy.server.ranges import ByteRange, parse_range

SIZE = 2048  # the conformance tests' blob


@pytest.mark.parametrize(
    ("header", "start", "end", "content_range"),
    [
        ("bytes=500-1499", 500, 1499, "bytes 500-1499/2048"),
        ("bytes=500-", 500, 2047, "bytes 500-2047/2048"),
        ("bytes=-500", 1548, 2047, "bytes 1548-2047/2048"),
        ("bytes=2000-5000", 2000, 2047, "bytes 2000-2047/2048"),
        ("bytes=0-0", 0, 0, "bytes 0-0/2048"),
        ("bytes=0-", 0, 2047, "bytes 0-2047/2048"),
        ("bytes=2047-2047", 2047, 2047, "bytes 2047-2047/2048"),
        ("bytes=-5000", 0, 2047, "bytes 0-2047/2048"),
        (" bytes=500-1499 ", 500, 1499, "bytes 500-1499/2048"),
    ],
)
def test_a_satisfiable_range_selects_those_bytes_and_names_them_in_content_range(
    header: str, start: int, end: int, content_range: str
) -> None:
    byte_range = parse_range(header, SIZE)
    assert byte_range == ByteRange(start, end, SIZE)
    assert byte_range.length == end - start + 1
    assert byte_range.content_range() == content_range


def test_the_first_conformance_range_is_a_thousand_bytes() -> None:
    byte_range = parse_range("bytes=500-1499", SIZE)
    assert byte_range is not None
    assert byte_range.length == 1000


@pytest.mark.parametrize(
    "header", ["bytes=500-0", "bytes=5000-10000", "bytes=2048-", "bytes=2048-2048", "bytes=-0"]
)
def test_an_unsatisfiable_range_is_a_416_naming_the_size(header: str) -> None:
    with pytest.raises(RegistryError) as raised:
        parse_range(header, SIZE)
    assert raised.value.status == HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE
    assert raised.value.code is ErrorCode.RANGE_INVALID
    assert raised.value.headers == {"Content-Range": "bytes */2048"}


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "garbage",
        "bytes=",
        "bytes=-",
        "bytes=a-b",
        "bytes=0-1,5-9",
        "bytes=0-1, 5-9",
        "items=0-1",
        "bytes 0-1",
        "bytes=1.5-2",
        "bytes=+1-2",
        "bytes=" + "9" * 20 + "-",
        # RFC 9110 DIGIT is ASCII; other scripts' digits are not a range.
        "bytes=\u0665\u0660\u0660-",
        "bytes=-\u0665",
    ],
)
def test_a_missing_malformed_or_multi_range_header_means_the_whole_body(
    header: str | None,
) -> None:
    assert parse_range(header, SIZE) is None


def test_an_empty_body_satisfies_no_range() -> None:
    with pytest.raises(RegistryError) as raised:
        parse_range("bytes=-1", 0)
    assert raised.value.headers == {"Content-Range": "bytes */0"}


range_headers = (
    st.builds(
        lambda first, last: f"bytes={first}-{last}",
        st.one_of(st.just(""), st.integers(0, 10**6).map(str)),
        st.one_of(st.just(""), st.integers(0, 10**6).map(str)),
    )
    | st.text(alphabet="bytes=0123456789-, \t", max_size=30)
    | st.text(max_size=30)
)


@given(st.integers(1, 10**6), range_headers)
@example(1, "bytes=0-0")
@example(1, "bytes=-1")
@example(2048, "bytes=-9999999999999999999")
@example(2048, "bytes=9999999999999999999-")
def test_any_header_gives_no_range_a_range_inside_the_body_or_a_416(size: int, header: str) -> None:
    try:
        byte_range = parse_range(header, size)
    except RegistryError as error:
        assert error.status == HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE
        assert error.headers == {"Content-Range": f"bytes */{size}"}
        return
    if byte_range is not None:
        assert 0 <= byte_range.start <= byte_range.end < size
        assert byte_range.size == size
        assert 1 <= byte_range.length <= size
        assert byte_range.content_range() == (f"bytes {byte_range.start}-{byte_range.end}/{size}")


@given(st.integers(1, 10**6), st.integers(0, 2 * 10**6), st.integers(0, 2 * 10**6))
def test_a_well_formed_range_starting_inside_the_body_is_clamped_to_it(
    size: int, first: int, last: int
) -> None:
    header = f"bytes={first}-{last}"
    if first >= size or last < first:
        with pytest.raises(RegistryError):
            parse_range(header, size)
    else:
        assert parse_range(header, size) == ByteRange(first, min(last, size - 1), size)


@given(st.integers(1, 10**6), st.integers(1, 2 * 10**6))
def test_a_suffix_range_is_the_last_bytes_or_the_whole_body(size: int, suffix: int) -> None:
    assert parse_range(f"bytes=-{suffix}", size) == ByteRange(max(size - suffix, 0), size - 1, size)
