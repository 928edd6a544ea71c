"""Fixtures for the fault suite: a fake upstream with one known repository, and its blobs."""

from __future__ import annotations

import os

import pytest
from fakeupstream import FakeUpstreamServer, Image

from faults.support import REPOSITORY
from proxy.upstream import socket_body


@pytest.fixture
def image(fake_upstream: FakeUpstreamServer) -> Image:
    """`team/app:1.0`, two small layers; its presence makes the repository known upstream."""
    return fake_upstream.registry.add_image(REPOSITORY, "1.0", [os.urandom(3000), os.urandom(5000)])


@pytest.fixture(params=["parser", "socket"])
def body_reading(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """How the mirror reads the upstream's blob bodies: every one through aiohttp's parser, or
    every one not complete with its headers from the socket (`proxy.upstream.socket_body`; by
    default, those with a MiB or more to come)."""
    limit = 0 if request.param == "socket" else 1 << 62
    monkeypatch.setattr(socket_body, "MIN_SOCKET_BODY", limit)
