"""What handlers note on a request for the access log and metrics (aiohttp `RequestKey`s)."""

from __future__ import annotations

from typing import Final

from aiohttp import web

ROUTE: Final = web.RequestKey("route", str)  # ping | manifest | blob | tags | referrers
CACHE_KIND: Final = web.RequestKey("cache_kind", str)  # blob | manifest | tag
UPSTREAM: Final = web.RequestKey("upstream", str)
IDENTITY: Final = web.RequestKey("identity", str)  # who authenticated, or "anonymous"
BYTES_SENT: Final = web.RequestKey("bytes_sent", int)  # sendfile bypasses aiohttp's own count
# Why a body was cut short after its status line went out: client | upstream | mirror.
ABORTED: Final = web.RequestKey("aborted", str)
