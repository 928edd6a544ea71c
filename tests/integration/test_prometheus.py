"""A real Prometheus scrapes the mirror while skopeo pulls through it; every query works.

Prometheus (Debian package ``prometheus``) runs from a temporary directory, scraping the mirror
subprocess every second and evaluating ``deploy/prometheus/alerts.yml``. After a few real pulls
from Distribution, each dashboard query and each alert expression is sent to
``/api/v1/query``: none may fail, and the hit ratio and latency panels must show data.

Prometheus is an external process, so the test polls its HTTP API, each wait with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import aiohttp
import pytest
import yaml

from .registry import (
    STOP_GRACE_SECONDS,
    Distribution,
    Mirror,
    build_image,
    free_port,
    push_image,
    skopeo_copy,
    verify_dir,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "grafana" / "dashboards" / "registry-proxy.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
JOB = "registry-proxy"
# What Grafana substitutes before a dashboard query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}
DEADLINE_SECONDS = 20.0
POLL_SECONDS = 0.2
MUST_HAVE_DATA = (
    "Hit ratio (bytes)",
    "Hit ratio (requests)",
    "Hit ratio over time",
    "Request latency by route (p50 / p95 / p99)",
    "Blob time to first byte (p50 / p95)",
)


class Prometheus:
    """``prometheus`` on 127.0.0.1 scraping ``targets`` every second; data, log in ``workdir``."""

    def __init__(self, workdir: Path, targets: list[str], *, rule_files: tuple[Path, ...] = ()):
        self.workdir = workdir
        self.targets = targets
        self.rule_files = rule_files
        self.port = free_port()
        self.log_path = workdir / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail(
                "prometheus is missing: Debian package prometheus (scripts/install-system-deps)",
                pytrace=False,
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [
                {"job_name": JOB, "static_configs": [{"targets": self.targets}]},
            ],
        }
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self._output = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        return self

    def stop(self) -> None:
        """SIGTERM our own process, wait, then SIGKILL."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=STOP_GRACE_SECONDS)
        if self._output is not None:
            self._output.close()
            self._output = None

    def exited(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class PrometheusAPI:
    """The few HTTP API calls the test needs, each answer checked for ``status: success``."""

    def __init__(self, server: Prometheus, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session

    async def query(self, expr: str) -> list[dict[str, Any]]:
        async with self.session.post(
            f"{self.server.url}/api/v1/query", data={"query": expr}
        ) as response:
            answer = await response.json()
        assert answer["status"] == "success", f"{expr}: {answer}"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    async def rules(self) -> list[dict[str, Any]]:
        async with self.session.get(f"{self.server.url}/api/v1/rules") as response:
            answer = await response.json()
        assert answer["status"] == "success", answer
        return [rule for group in answer["data"]["groups"] for rule in group["rules"]]

    async def until(self, what: str, check: Callable[[], Awaitable[bool]]) -> None:
        """Poll `check` until it holds; Prometheus is another process with no event to await."""
        deadline = time.monotonic() + DEADLINE_SECONDS
        while True:
            with_error: Exception | None = None
            try:
                if await check():
                    return
            except (aiohttp.ClientError, AssertionError) as exc:
                with_error = exc
            if self.server.exited() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"Prometheus: {what} did not happen within {DEADLINE_SECONDS:.0f} s "
                    f"(last error: {with_error}; exit status: {self.server.exited()})\n"
                    f"{self.server.log_text()}",
                    pytrace=False,
                )
            await asyncio.sleep(POLL_SECONDS)


def dashboard_queries() -> Iterator[tuple[str, str]]:
    """``(panel title, query as Grafana sends it)`` for every target of every panel."""
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, replacement in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, replacement)
            yield panel["title"], expr


def alert_expressions() -> dict[str, str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def numbers(result: list[dict[str, Any]]) -> list[float]:
    """The finite values of an instant vector (histogram_quantile of no traffic is NaN)."""
    values = [float(series["value"][1]) for series in result]
    return [v for v in values if math.isfinite(v)]


async def test_prometheus_scrapes_the_mirror_and_every_dashboard_and_alert_query_evaluates(
    distribution: Distribution,
    mirror: Mirror,
    http_session: aiohttp.ClientSession,
    repo: str,
    tmp_path: Path,
) -> None:
    images = [build_image("oci"), build_image("docker")]
    for number, image in enumerate(images):
        await push_image(http_session, distribution.url, repo, image, f"v{number}")

    with Prometheus(tmp_path / "prometheus", [mirror.host], rule_files=(ALERTS,)) as server:
        api = PrometheusAPI(server, http_session)

        async def scraped_up() -> bool:
            return numbers(await api.query(f'up{{job="{JOB}"}}')) == [1.0]

        await api.until("a first successful scrape of the mirror", scraped_up)

        async def pull_twice(number: int) -> None:
            """The first pull fills the cache, the second is served from it."""
            for round_ in range(2):
                dest = tmp_path / f"pull-{number}-{round_}"
                await asyncio.to_thread(skopeo_copy, f"{mirror.host}/{repo}:v{number}", dest)
                verify_dir(dest)

        async def scraped_twice_since(moment: float) -> None:
            async def scraped() -> bool:
                stamps = numbers(await api.query(f'timestamp(up{{job="{JOB}"}})'))
                return bool(stamps) and min(stamps) > moment + 1

            await api.until("two scrapes after the pulls", scraped)

        # A labelled counter appears at its first increment, and rate() cannot see the step
        # from "absent" to its first value; a warm-up pull makes every series exist first.
        await pull_twice(0)
        await scraped_twice_since(time.time())
        await pull_twice(1)
        await scraped_twice_since(time.time())

        answers: dict[str, list[float]] = {}
        for title, expr in dashboard_queries():
            answers.setdefault(title, []).extend(numbers(await api.query(expr)))
        for expr in alert_expressions().values():
            await api.query(expr)  # evaluates without error; firing or not depends on the run

        async def every_rule_evaluated() -> bool:
            return all(rule["health"] != "unknown" for rule in await api.rules())

        await api.until("a first evaluation of every alert rule", every_rule_evaluated)
        unhealthy = {
            r["name"]: r.get("lastError") for r in await api.rules() if r["health"] != "ok"
        }
        assert unhealthy == {}

    for title in MUST_HAVE_DATA:
        assert answers[title], f"panel {title!r} shows no data"
    byte_ratio, request_ratio = answers["Hit ratio (bytes)"][0], answers["Hit ratio (requests)"][0]
    # The measured image's second pull came from the cache: half its blob bytes never crossed
    # the "WAN".
    assert 0.3 < byte_ratio < 0.7
    assert 0.3 < request_ratio < 1
    assert all(
        0 <= latency < 30 for latency in answers["Request latency by route (p50 / p95 / p99)"]
    )
    assert answers["Mirrors up"] == [1.0]
    assert answers["Digest mismatches"] == [0.0]
    # Every cause's series exists from the start, and clean pulls abort nothing.
    assert answers["Aborted transfers"]
    assert set(answers["Aborted transfers"]) == {0.0}
