"""Fixtures for the fault suite: a fake upstream with one known repository, and its blobs."""

from __future__ import annotations

import os

import pytest
from fakeupstream import FakeUpstreamServer, Image

from faults.support import REPOSITORY


@pytest.fixture
def image(fake_upstream: FakeUpstreamServer) -> Image:
    """`team/app:1.0`, two small layers; its presence makes the repository known upstream."""
    return fake_upstream.registry.add_image(REPOSITORY, "1.0", [os.urandom(3000), os.urandom(5000)])
