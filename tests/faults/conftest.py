"""Fixtures for the fault suite: a fake upstream with one known repository, and its blobs."""

from __future__ import annotations

import os
from typing import Any

import pytest
from fakeupstream import FakeUpstreamServer, Image

from faults.support import REPOSITORY
from proxy.upstream import socket_body
from proxy.upstream.socket_body import SocketBody


@pytest.fixture
def image(fake_upstream: FakeUpstreamServer) -> Image:
    """`team/app:1.0`, two small layers; its presence makes the repository known upstream."""
    return fake_upstream.registry.add_image(REPOSITORY, "1.0", [os.urandom(3000), os.urandom(5000)])


@pytest.fixture(params=["parser", "socket"])
def body_reading(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> list[SocketBody]:
    """How the mirror reads the upstream's blob bodies: every one through aiohttp's parser, or
    every one not complete with its headers from the socket (`proxy.upstream.socket_body`; by
    default, those with a MiB or more to come). The bodies read from the socket are listed."""
    taken: list[SocketBody] = []
    limit = 0 if request.param == "socket" else 1 << 62
    monkeypatch.setattr(socket_body, "MIN_SOCKET_BODY", limit)
    take = SocketBody.take.__func__  # type: ignore[attr-defined]

    def recorded(cls: type[SocketBody], *args: Any) -> SocketBody | None:
        body: SocketBody | None = take(cls, *args)
        if body is not None:
            taken.append(body)
        return body

    monkeypatch.setattr(SocketBody, "take", classmethod(recorded))
    return taken
