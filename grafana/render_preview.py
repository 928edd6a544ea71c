"""Render grafana/dashboard-preview.png from a real run, the way the dashboard would show it.

Starts Distribution, the mirror (12 MiB cache, so it evicts) and Prometheus scraping it every
second, pushes five generated images, pulls them with skopeo through the mirror for about a
minute (popular images more often), then evaluates six of the dashboard's queries over the run
with /api/v1/query_range and plots them with matplotlib. Nothing is simulated or smoothed.

    pip install matplotlib && python grafana/render_preview.py

Needs the integration tests' programs (docker-registry, skopeo, prometheus).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the test harness, importable as pytest names it

from harness.images import LARGE_LAYERS, SMALL_LAYERS, build_image  # noqa: E402
from harness.mirror import Mirror  # noqa: E402
from harness.processes import Distribution  # noqa: E402
from harness.push import push_image  # noqa: E402
from harness.skopeo import skopeo_copy  # noqa: E402
from integration.test_prometheus import Prometheus  # noqa: E402

OUTPUT = ROOT / "grafana" / "dashboard-preview.png"
DASHBOARD = ROOT / "grafana" / "dashboards" / "registry-proxy.json"
RUN_SECONDS = 60
RATE_INTERVAL = "15s"
PANELS = (
    "Request rate by route and cache result",
    "Hit ratio over time",
    "Request latency by route (p50 / p95 / p99)",
    "Blob time to first byte (p50 / p95)",
    "Bytes served vs fetched",
    "Cache fill vs budget",
)


def panel_queries() -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Panel title -> (unit, [(query, legend format)])."""
    found = {}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["title"] in PANELS:
            targets = [
                (t["expr"].replace("$__rate_interval", RATE_INTERVAL), t["legendFormat"])
                for t in panel["targets"]
            ]
            found[panel["title"]] = (panel["fieldConfig"]["defaults"]["unit"], targets)
    return found


def legend(template: str, labels: dict[str, str]) -> str:
    for key, value in labels.items():
        template = template.replace("{{" + key + "}}", value)
    return template


async def traffic(mirror: Mirror, repo: str, count: int, workdir: Path) -> None:
    rng = random.Random(5)
    weights = [8, 4, 2, 1, 1]  # a few popular images, a long tail
    deadline = time.monotonic() + RUN_SECONDS
    pull = 0
    while time.monotonic() < deadline:
        number = rng.choices(range(count), weights)[0]
        dest = workdir / f"pull-{pull}"
        await asyncio.to_thread(skopeo_copy, f"{mirror.host}/{repo}:v{number}", dest)
        pull += 1
        await asyncio.sleep(rng.uniform(0.2, 1.5))


async def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory() as temp:
        workdir = Path(temp)
        with (
            Distribution(workdir / "distribution") as distribution,
            Mirror(workdir / "mirror", distribution.url, "--cache-max-size", "12MiB") as mirror,
            Prometheus(workdir / "prometheus", [mirror.host]) as prometheus,
        ):
            repo = "preview/app"
            timeout = aiohttp.ClientTimeout(total=60)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                for number in range(5):
                    sizes = LARGE_LAYERS if number % 2 else SMALL_LAYERS
                    image = build_image("oci", layer_sizes=sizes)
                    await push_image(session, distribution.url, repo, image, f"v{number}")
                started = time.time()
                await traffic(mirror, repo, 5, workdir)
                await asyncio.sleep(3)  # let the last scrapes land
                ended = time.time()
                series: dict[str, tuple[str, list[tuple[str, list[float], list[float]]]]] = {}
                for title, (unit, targets) in panel_queries().items():
                    lines = []
                    for expr, legend_format in targets:
                        params = {
                            "query": expr,
                            "start": str(started),
                            "end": str(ended),
                            "step": "2",
                        }
                        url = f"{prometheus.url}/api/v1/query_range"
                        async with session.post(url, data=params) as response:
                            answer = await response.json()
                        assert answer["status"] == "success", answer
                        for result in answer["data"]["result"]:
                            xs = [float(t) - started for t, _ in result["values"]]
                            ys = [float(v) for _, v in result["values"]]
                            lines.append((legend(legend_format, result["metric"]), xs, ys))
                    series[title] = (unit, lines)

    figure, axes = plt.subplots(2, 3, figsize=(18, 8.5))
    for axis, title in zip(axes.flat, PANELS, strict=True):
        unit, lines = series[title]
        for label, xs, ys in lines:
            axis.plot(xs, ys, label=label, linewidth=1.4)
        axis.set_title(title, fontsize=11)
        axis.set_xlabel("seconds into the run")
        axis.set_ylabel(unit)
        if unit == "s":
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="best")
    when = datetime.fromtimestamp(started).strftime("%Y-%m-%d %H:%M")
    figure.suptitle(
        f"registry-proxy dashboard queries over a real {RUN_SECONDS} s run ({when}): skopeo "
        "pulls of 5 images through the mirror (12 MiB cache) from Distribution, scraped by "
        "Prometheus every 1 s",
        fontsize=11,
    )
    figure.tight_layout()
    figure.savefig(OUTPUT, dpi=80)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    asyncio.run(main())
