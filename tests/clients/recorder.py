"""A recording HTTP forwarder between real clients and the mirror.

Clients are configured with the recorder's address as their mirror; it forwards every request to
the mirror unchanged (method, path, query, headers, body; responses streamed back byte for byte)
and remembers each request's method and path with its query. Tests then assert on exactly what a
client sent: ``/v2/library/<name>/...`` from ``docker pull <name>``, ``?ns=docker.io`` from
containerd, ``/v2/ghcr.io/...`` from a ``registries.conf`` path prefix. The mirror's own rewrites
(such as adding ``library/`` towards Docker Hub) cannot hide what the client did.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiohttp import web
from harness.ports import free_port
from harness.threads import LoopThread

# RFC 9110 section 7.6.1: connection-specific fields are not forwarded.
HOP_BY_HOP = frozenset(
    name.lower()
    for name in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
    )
)


@dataclass(frozen=True)
class Recorded:
    method: str
    path_qs: str


class RecordingForwarder(LoopThread):
    """Listens on 127.0.0.1 in a thread of its own and forwards to ``target`` (a base URL)."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target.rstrip("/")
        self.port = free_port()
        self.requests: list[Recorded] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def paths(self) -> list[str]:
        return [request.path_qs for request in self.requests]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        self.requests.append(Recorded(request.method, request.path_qs))
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        body = await request.read()
        async with self._session.request(
            request.method,
            self.target + request.path_qs,
            headers=headers,
            data=body or None,
            allow_redirects=False,
            auto_decompress=False,
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            await response.prepare(request)
            if request.method != "HEAD":
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            await response.write_eof()
            return response

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_read=60), auto_decompress=False
        )
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
