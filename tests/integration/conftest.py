"""Fixtures that run real programs: Distribution as the upstream, the mirror, skopeo.

- ``distribution``: one started :class:`Distribution` per test module, stopped after it.
- ``mirror_factory``: a :class:`~harness.mirror.MirrorProcesses`; ``mirror_factory(*extra_args,
  upstream=None)`` starts a mirror process in front of ``upstream`` (default: the module's
  Distribution); every mirror is stopped at teardown.
- ``mirror``: one mirror in front of the module's Distribution.
- ``http_session``: an aiohttp client session for pushing and for raw requests.
- ``repo``: a repository name unique to the test, derived from its name.

When a test fails, the logs of its mirrors and of Distribution are added to the report.
The tests need ``docker-registry`` and ``skopeo`` on PATH; without them they fail (never skip),
pointing at ``scripts/install-system-deps``.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import aiohttp
import pytest
from harness.mirror import Mirror, MirrorProcesses
from harness.processes import Distribution

REQUIRED_PROGRAMS = {"docker-registry": "docker-registry", "skopeo": "skopeo"}
LOG_SECTION_LIMIT = 30_000


@pytest.fixture(scope="session", autouse=True)
def _require_system_tools() -> None:
    missing = sorted(
        package for program, package in REQUIRED_PROGRAMS.items() if shutil.which(program) is None
    )
    if missing:
        pytest.fail(
            f"integration tests need {' and '.join(missing)} (Debian packages "
            f"{' '.join(missing)}): run scripts/install-system-deps",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def distribution(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Distribution]:
    with Distribution(tmp_path_factory.mktemp("distribution")) as registry:
        yield registry


@pytest.fixture
def mirror_factory(distribution: Distribution, tmp_path: Path) -> Iterator[MirrorProcesses]:
    factory = MirrorProcesses(tmp_path / "mirrors", distribution.url)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def mirror(mirror_factory: MirrorProcesses) -> Mirror:
    return mirror_factory()


@pytest.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=60, sock_connect=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield session


@pytest.fixture
def repo(request: pytest.FixtureRequest) -> str:
    """``it/<test name>``, reduced to the repository name grammar."""
    words = re.findall(r"[a-z0-9]+", request.node.name.lower())
    return "it/" + "-".join(words)[:120].strip("-")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and isinstance(item, pytest.Function):
        factory = item.funcargs.get("mirror_factory")
        if isinstance(factory, MirrorProcesses):
            for number, mirror in enumerate(factory.mirrors):
                report.sections.append(
                    (f"mirror {number} log ({mirror.log_path})", _tail(mirror.log_text()))
                )
        registry = item.funcargs.get("distribution")
        if isinstance(registry, Distribution) and registry.log_text():
            report.sections.append(
                (f"distribution log ({registry.output_path})", _tail(registry.log_text()))
            )
    return report


def _tail(text: str) -> str:
    if len(text) <= LOG_SECTION_LIMIT:
        return text
    return "...\n" + text[-LOG_SECTION_LIMIT:]
