"""An upstream's pull quota, read from its answers, and when to stop spending it on freshness.

Docker Hub answers manifest requests (GET and HEAD) with

    ratelimit-limit: 100;w=21600        requests allowed per window (w: its length in seconds)
    ratelimit-remaining: 76;w=21600     requests left in the current window
    docker-ratelimit-source: 203.0.113.7    whom it counts: the IP address when anonymous,
                                            the account's id when the credentials were applied

(the form of draft-ietf-httpapi-ratelimit-headers' early versions), and a 429 with
`Retry-After` once the quota is spent. Below `quota_reserve` remaining requests, or after a 429,
the quota is *saving*: cached tags are served without revalidation (`X-Cache: STALE` and a
`Warning: 110` header) until the window resets, or until an answer shows the quota is back;
new tags and digests still go upstream (`proxy.cache.manifests`).
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from proxy.metrics import Metrics

log = logging.getLogger(__name__)

LIMIT_HEADER: Final = "ratelimit-limit"
REMAINING_HEADER: Final = "ratelimit-remaining"
SOURCE_HEADER: Final = "docker-ratelimit-source"
# When an upstream says it is low (or 429s) without saying how long its window or wait is.
DEFAULT_WAIT: Final = 60.0
# An upstream cannot make the mirror stop revalidating for longer than this on its own say-so.
MAX_WAIT: Final = 86400.0

# `76;w=21600`, `76`, `76, 100;w=60` (the draft's list of policies: the first is the one in force)
_COUNT: Final = re.compile(r"\s*(\d+)\s*(?:;(.*))?")
_WINDOW: Final = re.compile(r"(?:^|;)\s*w\s*=\s*(\d+)")


@dataclass(frozen=True, slots=True)
class RateLimit:
    count: int
    window: float | None  # seconds


def parse_ratelimit(value: str | None) -> RateLimit | None:
    """A `ratelimit-limit` / `ratelimit-remaining` value; None when absent or malformed."""
    if value is None:
        return None
    first = value.split(",", 1)[0]
    match = _COUNT.fullmatch(first)
    if match is None:
        return None
    window = _WINDOW.search(match.group(2) or "")
    return RateLimit(int(match.group(1)), float(window.group(1)) if window else None)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a `Retry-After` (RFC 9110 section 10.2.3: seconds or an HTTP
    date, `now` being wall-clock time); None when absent or malformed."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


class Quota:
    """One upstream's quota as its latest answers said. `clock` is monotonic (tests inject one)."""

    def __init__(
        self,
        upstream: str,
        *,
        reserve: int = 0,
        credentials: bool = False,
        metrics: Metrics | None = None,
        label: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.reserve = reserve
        # Whether the operator configured credentials for it (not a pass-through upstream).
        self.credentials = credentials
        self.metrics = metrics
        self.label = label or upstream
        self.clock = clock
        self.limit: int | None = None
        self.remaining: int | None = None
        self.window: float | None = None
        self.source: str | None = None
        self.saving_until = 0.0
        self._warned_anonymous = False

    @property
    def saving(self) -> bool:
        """Whether cached tags are served without revalidation now."""
        saving = self.clock() < self.saving_until
        if self.metrics is not None:  # brought up to date whenever a tag request asks
            self.metrics.quota_saving.labels(self.label).set(1 if saving else 0)
        return saving

    def observe(self, status: int, headers: Mapping[str, str]) -> None:
        """Take in what one upstream answer says about the quota."""
        now = self.clock()
        limit = parse_ratelimit(headers.get(LIMIT_HEADER))
        remaining = parse_ratelimit(headers.get(REMAINING_HEADER))
        if limit is not None:
            self.limit = limit.count
            self.window = limit.window or self.window
        if remaining is not None:
            self.remaining = remaining.count
            self.window = remaining.window or self.window
            if remaining.count <= self.reserve:
                self._save_until(now + (self.window or DEFAULT_WAIT), "its remaining quota is low")
            else:
                self.saving_until = 0.0  # the window reset, or the upstream raised the limit
        if status == 429:
            wait = parse_retry_after(headers.get("Retry-After"), time.time())
            self._save_until(now + (wait if wait is not None else self.window or DEFAULT_WAIT),
                             "it answered 429")  # fmt: skip
        if (source := headers.get(SOURCE_HEADER)) is not None:
            self.source = source.strip()
            self._check_source()
        self._export()

    def _save_until(self, until: float, why: str) -> None:
        until = min(until, self.clock() + MAX_WAIT)
        if not self.clock() < self.saving_until:
            log.warning(
                "upstream %s: %s (%s of %s left); serving cached tags without revalidation "
                "for up to %.0fs",
                self.upstream, why, self.remaining, self.limit, until - self.clock(),
            )  # fmt: skip
        self.saving_until = max(self.saving_until, until)

    def _check_source(self) -> None:
        """Docker Hub counts an anonymous pull against the IP address it came from: with
        credentials configured, that means they were not applied (once in the log)."""
        if not self.credentials or self._warned_anonymous or self.source is None:
            return
        try:
            ipaddress.ip_address(self.source)
        except ValueError:
            return
        self._warned_anonymous = True
        log.warning(
            "upstream %s counts pulls against address %s, as anonymous: the configured "
            "credentials were not applied (check username and password; a 401 challenge "
            "naming another token realm host needs token_realm_hosts)",
            self.upstream, self.source,
        )  # fmt: skip

    def _export(self) -> None:
        if self.metrics is None:
            return
        for gauge, value in (
            (self.metrics.quota_limit, self.limit),
            (self.metrics.quota_remaining, self.remaining),
            (self.metrics.quota_window, self.window),
        ):
            if value is not None:
                gauge.labels(self.label).set(value)
        _ = self.saving  # sets its gauge

    def snapshot(self) -> dict[str, Any]:
        """What `cache stats` shows: None for what the upstream never said."""
        saving = self.saving
        left = self.saving_until - self.clock()
        return {
            "limit": self.limit,
            "remaining": self.remaining,
            "window_seconds": self.window,
            "source": self.source,
            "saving": saving,
            "saving_for_seconds": math.ceil(left) if saving else 0,
        }
