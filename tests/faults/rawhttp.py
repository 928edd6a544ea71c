"""Raw HTTP/1.1 for abuse tests: bytes on a socket exactly as given, and a mirror in a thread.

An HTTP client library normalises `..`, `%2e` and header values before sending; these tests need
the request as written. Hypothesis drives synchronous tests, so the mirror (and its fake
upstream) runs on an event loop in a background thread, and requests are plain blocking sockets.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from fakeupstream import FakeUpstreamServer
from harness.threads import LoopThread
from multidict import CIMultiDict
from yarl import URL

from proxy.app import create_app
from proxy.config import Settings, UpstreamSettings
from proxy.server.runner import MirrorRunner

API_VERSION = "Docker-Distribution-API-Version"


@dataclass(frozen=True)
class RawResponse:
    status: int
    reason: str
    headers: CIMultiDict[str]
    body: bytes

    @property
    def from_a_handler(self) -> bool:
        """Requests aiohttp's parser refused never reach the app's hooks: they are answered by
        `proxy.server.MirrorRequestHandler`, without the registry's API version header."""
        return API_VERSION in self.headers


def send_raw(port: int, request: bytes, *, timeout: float = 10.0) -> RawResponse:
    """Send `request` verbatim to 127.0.0.1:port and read until the server closes.

    A server that refuses a request before reading all of it (a header over the limit) closes
    with bytes unread, and the kernel then ends the connection with a reset, not a FIN: the
    client may be cut off while still sending, and reads the response before the reset (Linux
    hands over what arrived first). So a reset ends the response, which must then be complete."""
    chunks = []
    reset = False
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except (ConnectionResetError, BrokenPipeError):
            reset = True
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            reset = True
    response = parse_response(b"".join(chunks))
    length = response.headers.get("Content-Length")
    if reset and length is not None and not request.startswith(b"HEAD "):
        assert len(response.body) == int(length), f"cut off by the reset: {response}"
    return response


def parse_response(raw: bytes) -> RawResponse:
    head, separator, body = raw.partition(b"\r\n\r\n")
    assert separator, f"no complete response: {raw[:200]!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    _, status, *reason = status_line.split(" ", 2)
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    if headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return RawResponse(int(status), reason[0] if reason else "", headers, body)


def _dechunk(data: bytes) -> bytes:
    body = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        body += data[:size]
        data = data[size + 2 :]
    return bytes(body)


def build_request(method: str, target: str, headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


@dataclass
class ThreadedMirror(LoopThread):
    """The mirror app and a fake upstream, served from an event loop in a background thread."""

    root: Path
    cache_max_size: int = 64 * 1024 * 1024
    port: int = 0
    upstream: FakeUpstreamServer = field(default_factory=FakeUpstreamServer)
    _runner: MirrorRunner | None = None

    def __post_init__(self) -> None:
        super().__init__()

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    async def _start(self) -> None:
        await self.upstream.start()
        settings = Settings(
            upstreams=(UpstreamSettings("fake", URL(self.upstream.url)),),
            cache_dir=self.cache_dir,
            cache_max_size=self.cache_max_size,
            connect_timeout=2.0,
            read_timeout=5.0,
        )
        # The runner `registry-proxy serve` uses, so malformed HTTP is answered as in production.
        self._runner = MirrorRunner(create_app(settings), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.upstream.stop()
