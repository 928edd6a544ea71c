"""HTTP byte ranges (RFC 9110, section 14) for blob responses.

Only a single range is honoured; a multi-range request is answered with the whole body, which
RFC 9110 section 14.2 allows ("a server MAY ignore the Range header field").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from proxy.errors import ErrorCode, RegistryError

# byte-range-spec = first-pos "-" [ last-pos ]; suffix-range = "-" suffix-length
_SINGLE_RANGE: Final = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})")


@dataclass(frozen=True, slots=True)
class ByteRange:
    """The inclusive byte range `start`..`end` of a body of `size` bytes."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end}/{self.size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The range asked for, None for the whole body, or 416 when it cannot be satisfied.

    A header that is not a valid single byte range is ignored (RFC 9110 section 14.2).
    """
    if header is None:
        return None
    match = _SINGLE_RANGE.fullmatch(header.strip().replace(" ", ""))
    if match is None:
        return None
    first, last = match.groups()
    if first == "" and last == "":
        return None
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise _unsatisfiable(size)
        return ByteRange(max(size - suffix, 0), size - 1, size)
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        # RFC 9110 14.1.1: a last-pos below first-pos makes the range invalid; like the OCI
        # conformance tests (bytes=500-0) we refuse it rather than ignore it.
        raise _unsatisfiable(size)
    if start >= size:
        raise _unsatisfiable(size)
    return ByteRange(start, min(end, size - 1), size)


def _unsatisfiable(size: int) -> RegistryError:
    return RegistryError(
        ErrorCode.RANGE_INVALID,
        "requested range not satisfiable",
        headers={"Content-Range": f"bytes */{size}"},
    )
