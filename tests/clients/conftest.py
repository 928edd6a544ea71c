"""Fixtures for the client matrix: real upstreams, the mirror, and real engines pulling through it.

Session-scoped, so each daemon starts once for the whole matrix:

- ``hub``: a Distribution registry playing Docker Hub (the mirror's ``docker.io`` upstream).
- ``ghcr``: a second Distribution playing ``ghcr.io``.
- ``mirror``: the mirror with both upstreams in its TOML config (``[[upstreams]]``, docker.io
  first, so it is the default), see :func:`configured_mirror`.
- ``forwarder``: a :class:`RecordingForwarder` in front of the mirror; clients are configured with
  its address, so tests see exactly which paths each client sent.
- ``dockerd``: Docker Engine with ``registry-mirrors`` = the forwarder.
- ``containerd``: containerd; ``ctr`` pulls with ``--hosts-dir``.
- ``publish(registry, repo, tag)``: pushes a fresh runnable image (busybox + random data, its
  command prints ``hello``) and returns it.

Every test module here sets ``pytestmark = pytest.mark.clients``. A missing program fails the
session naming the Debian package to install (``scripts/install-system-deps`` installs them all);
nothing is skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import aiohttp
import pytest
from harness.images import Image
from harness.mirror import Mirror, upstream_tables
from harness.processes import Distribution
from harness.push import push_image

from .daemons import Containerd, Dockerd, missing_programs
from .images import build_runnable_image
from .recorder import RecordingForwarder

REQUIRED = (
    "docker-registry",
    "skopeo",
    "podman",
    "containerd",
    "ctr",
    "runc",
    "dockerd",
    "docker",
    "busybox",
)
LOG_LIMIT = 20_000


@pytest.fixture(scope="session", autouse=True)
def _require_client_programs() -> None:
    message = missing_programs(REQUIRED)
    if message is not None:
        pytest.fail(f"client tests: {message}", pytrace=False)


def configured_mirror(workdir: Path, upstreams: dict[str, str], settings: str = "") -> Mirror:
    """The mirror started with ``--config FILE``: ``settings`` (TOML) and its upstreams
    (``[[upstreams]]``), ``upstreams`` mapping a name to a URL, the first one the default."""
    return Mirror(workdir, None, config=settings + upstream_tables(upstreams))


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Distribution]:
    with Distribution(tmp_path_factory.mktemp("hub")) as registry:
        yield registry


@pytest.fixture(scope="session")
def ghcr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Distribution]:
    with Distribution(tmp_path_factory.mktemp("ghcr")) as registry:
        yield registry


@pytest.fixture(scope="session")
def mirror(
    tmp_path_factory: pytest.TempPathFactory, hub: Distribution, ghcr: Distribution
) -> Iterator[Mirror]:
    upstreams = {"docker.io": hub.url, "ghcr.io": ghcr.url}
    with configured_mirror(tmp_path_factory.mktemp("mirror"), upstreams) as running:
        yield running


@pytest.fixture(scope="session")
def forwarder(mirror: Mirror) -> Iterator[RecordingForwarder]:
    with RecordingForwarder(mirror.url) as running:
        yield running


@pytest.fixture(scope="session")
def dockerd(forwarder: RecordingForwarder) -> Iterator[Dockerd]:
    # The snippet from README "Docker Engine", with the forwarder standing in for the mirror.
    with Dockerd({"registry-mirrors": [forwarder.url]}) as daemon:
        yield daemon.start()


@pytest.fixture(scope="session")
def containerd() -> Iterator[Containerd]:
    with Containerd() as daemon:
        yield daemon.start()


Publish = Callable[[Distribution, str, str], Image]


@pytest.fixture(scope="session")
def publish() -> Publish:
    def push(registry: Distribution, repo: str, tag: str) -> Image:
        image = build_runnable_image("docker")

        async def upload() -> None:
            async with aiohttp.ClientSession() as session:
                await push_image(session, registry.url, repo, image, tag)

        asyncio.run(upload())
        return image

    return push


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and isinstance(item, pytest.Function):
        for name in ("mirror", "dockerd", "containerd"):
            running = item.funcargs.get(name)
            if isinstance(running, Mirror):
                report.sections.append(("mirror log", running.log_text()[-LOG_LIMIT:]))
            elif isinstance(running, Dockerd | Containerd):
                report.sections.append((f"{running.name} log", running.log_text()[-LOG_LIMIT:]))
        recorder = item.funcargs.get("forwarder")
        if isinstance(recorder, RecordingForwarder):
            report.sections.append(("requests sent to the mirror", "\n".join(recorder.paths())))
    return report
