"""Fixtures for the security suite: the attacker's view of a mirror with `allow_any_registry`.

- ``internal``: a loopback listener standing in for an internal service (a metadata endpoint,
  Redis, an admin page). It counts connections and answers any HTTP request with `SECRET`, so a
  test sees both whether the mirror connected and whether the answer leaked to the client.
- ``hostile``: a registry the attacker controls, served over HTTPS on loopback under the name
  `hostile.test` with a certificate the mirror is told to trust; it redirects every request, or
  names a token realm, wherever the test says.
- ``dynamic_mirror``: the mirror with `allow_any_registry = true`, whose resolver maps every
  name to 127.0.0.1 (DNS pointing a public-looking name at an internal address) and whose
  address policy treats only the hostile registry's own port as a public address.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from ipaddress import ip_address
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestClient
from fakeupstream import FakeUpstreamServer
from pytest_aiohttp import AiohttpClient
from yarl import URL

from proxy.app import create_app
from proxy.config import Settings, UpstreamSettings
from proxy.upstream.egress import Egress, PublicAddresses
from proxy.upstream.routing import Upstreams

SECRET = b"internal-secret-9f2c"
TEST_NAMES = ("hostile.test", "metadata.test", "internal.test")


class LoopbackResolver(AbstractResolver):
    """Every name resolves to 127.0.0.1, as an attacker's DNS record would make it."""

    def __init__(self) -> None:
        self.names: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.names.append(host)
        return [
            ResolveResult(
                hostname=host, host="127.0.0.1", port=port, family=socket.AF_INET,
                proto=0, flags=socket.AI_NUMERICHOST,
            )
        ]  # fmt: skip

    async def close(self) -> None:
        return None


class InternalService:
    """A loopback listener that counts connections and answers any request with `SECRET`."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            first = await reader.readexactly(1)
            if first == b"\x16":  # a TLS handshake: hang up, as a service speaking no TLS would
                return
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(SECRET)).encode() + b"\r\nConnection: close\r\n\r\n" + SECRET
            )  # fmt: skip
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class HostileRegistry:
    """An attacker's registry: `/v2/` answers (or challenges with `realm`), everything else is
    redirected to `redirect_to`, or, without one, answers an empty tag list."""

    def __init__(self) -> None:
        self.redirect_to: str | None = None
        self.realm: str | None = None
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def name(self) -> str:
        return f"hostile.test:{self.port}"

    async def start(self, context: ssl.SSLContext) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.realm is not None and "Authorization" not in request.headers:
            challenge = f'Bearer realm="{self.realm}",service="hostile"'
            return web.Response(status=401, headers={"WWW-Authenticate": challenge})
        if request.path == "/v2/":
            return web.json_response({})
        if self.redirect_to is not None:
            raise web.HTTPFound(self.redirect_to)
        return web.json_response({"name": "x", "tags": []})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "test.crt", directory / "test.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=hostile.test", "-keyout", str(key), "-out", str(cert),
         "-addext", "subjectAltName=" + ",".join(f"DNS:{name}" for name in TEST_NAMES)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
async def internal() -> AsyncIterator[InternalService]:
    service = InternalService()
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
async def hostile(certificate: tuple[Path, Path]) -> AsyncIterator[HostileRegistry]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    registry = HostileRegistry()
    await registry.start(context)
    yield registry
    await registry.stop()


Client = TestClient[web.Request, web.Application]
DynamicMirror = Callable[..., Awaitable[Client]]


@pytest.fixture
def dynamic_mirror(
    aiohttp_client: AiohttpClient,
    fake_upstream: FakeUpstreamServer,
    hostile: HostileRegistry,
    certificate: tuple[Path, Path],
    tmp_path: Path,
) -> DynamicMirror:
    """The mirror with `allow_any_registry`; `public_ports` are loopback ports the address
    policy takes for public addresses (the hostile registry's always is)."""

    async def start(*public_ports: int, **overrides: object) -> Client:
        settings = Settings(
            upstreams=(UpstreamSettings("fake", URL(fake_upstream.url)),),
            cache_dir=tmp_path / "cache",
            cache_max_size=1024**3,
            connect_timeout=2.0,
            read_timeout=5.0,
            allow_any_registry=True,
            **overrides,  # type: ignore[arg-type]
        )
        loopback = ip_address("127.0.0.1")
        egress = Egress(
            dynamic=PublicAddresses(
                trusted={(loopback, port) for port in (hostile.port, *public_ports)}
            ),
            resolver=LoopbackResolver(),
            ssl=ssl.create_default_context(cafile=str(certificate[0])),
        )
        upstreams = Upstreams(settings, egress=egress)
        return await aiohttp_client(create_app(settings, upstreams=upstreams))

    return start
