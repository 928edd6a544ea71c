"""Shared fixtures for the unit tests.

- ``fake_upstream``: a started :class:`FakeUpstreamServer` (an in-process fake registry that
  records requests and misbehaves on demand), stopped at teardown.
- ``fake_cdn``: a second one, the host a blob redirect points at (``blob_redirect_to``).
- ``mirror``: starts the mirror app in-process in front of ``fake_upstream``.

Property tests run the same examples on every run (Hypothesis profile ``repeatable``), so the
suite passes or fails the same way each time and a failure replays as is. To search afresh
while working on a parser or the LRU: ``HYPOTHESIS_PROFILE=explore`` (or
``--hypothesis-profile=explore``), which also keeps failing examples in ``.hypothesis/``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from fakeupstream import FakeUpstreamServer
from harness.mirror import MirrorTestServer, StartMirror
from harness.ports import free_port
from hypothesis import settings as hypothesis_settings
from pytest_aiohttp import AiohttpClient
from yarl import URL

from proxy.app import create_app
from proxy.config import Settings, UpstreamSettings

# No deadline: on a loaded 2-core machine a slow example is not a failure, only a slow one.
hypothesis_settings.register_profile("repeatable", derandomize=True, deadline=None, print_blob=True)
hypothesis_settings.register_profile("explore", deadline=None, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture
async def fake_upstream() -> AsyncIterator[FakeUpstreamServer]:
    async with FakeUpstreamServer() as server:
        yield server


@pytest.fixture
async def fake_cdn() -> AsyncIterator[FakeUpstreamServer]:
    async with FakeUpstreamServer() as server:
        yield server


@pytest.fixture
def mirror(
    aiohttp_client: AiohttpClient, fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> StartMirror:
    """Start the mirror in-process in front of the fake upstream; keyword args are settings."""

    async def start(**overrides: object) -> TestClient[web.Request, web.Application]:
        options: dict[str, object] = {
            "upstreams": (UpstreamSettings("fake", URL(fake_upstream.url)),),
            "cache_dir": tmp_path / "cache",
            "cache_max_size": 1024**3,
            "connect_timeout": 2.0,
            "read_timeout": 5.0,
            # Background blob fetches would change the upstream requests most tests count;
            # tests/unit/test_prefetch.py switches it on (the product's default).
            "prefetch": False,
        }
        options.update(overrides)
        server = MirrorTestServer(create_app(Settings(**options)))  # type: ignore[arg-type]
        # pytest-aiohttp types a client of a server as having no app; this one has.
        return cast(TestClient[web.Request, web.Application], await aiohttp_client(server))

    return start


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on loopback for the session, stopped at the end."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is missing: run scripts/install-system-deps")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:  # an external process: poll its port until it answers, with a deadline
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("redis-server did not start")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)
