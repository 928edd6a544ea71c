"""Shared fixtures for the unit tests.

- ``fake_upstream``: a started :class:`FakeUpstreamServer` (an in-process fake registry that
  records requests and misbehaves on demand), stopped at teardown.
- ``fake_cdn``: a second one, the host a blob redirect points at (``blob_redirect_to``).
- ``mirror``: starts the mirror app in-process in front of ``fake_upstream``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from fakeupstream import FakeUpstreamServer
from pytest_aiohttp import AiohttpClient
from yarl import URL

from proxy.app import create_app
from proxy.config import Settings, UpstreamSettings


@pytest.fixture
async def fake_upstream() -> AsyncIterator[FakeUpstreamServer]:
    async with FakeUpstreamServer() as server:
        yield server


@pytest.fixture
async def fake_cdn() -> AsyncIterator[FakeUpstreamServer]:
    async with FakeUpstreamServer() as server:
        yield server


MirrorFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def mirror(
    aiohttp_client: AiohttpClient, fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> MirrorFactory:
    """Start the mirror in-process in front of the fake upstream; keyword args are settings."""

    async def start(**overrides: object) -> TestClient[web.Request, web.Application]:
        options: dict[str, object] = {
            "upstreams": (UpstreamSettings("fake", URL(fake_upstream.url)),),
            "cache_dir": tmp_path / "cache",
            "cache_max_size": 1024**3,
            "connect_timeout": 2.0,
            "read_timeout": 5.0,
        }
        options.update(overrides)
        return await aiohttp_client(create_app(Settings(**options)))  # type: ignore[arg-type]

    return start
