"""What the access log costs a manifest hit, measured in one mirror process.

    python -m bench.log_cost [--pairs 15] [--seconds 3]

Comparing two mirrors (one at `info`, one at `warning`) mixes the log's cost with how two
processes happen to run on a shared machine, which differs by more than the log costs. Here one
mirror serves the medium manifest by tag to `wrk` (one thread, 16 connections) while its root
log level flips between `info` (the default: one JSON access line per request) and `warning`
on SIGUSR1 (a hook this tool adds to the mirror's start-up), in alternating runs. Each run's
CPU time per request is the process's (every thread's, the log writer's included) from
`/proc`; the cost is the median of (info - warning) / info over neighbouring runs.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import signal
import statistics
import subprocess
import tempfile
from pathlib import Path

from harness.processes import Distribution

from bench import REPO_ROOT
from bench.client import CONTAINERD_ACCEPT
from bench.images import Sizes, push_fixtures
from bench.peers import Ours
from bench.scenarios import cpu_seconds

# Prepended to the mirror's bootstrap: SIGUSR1 toggles the root level between info and warning.
FLIP_HOOK = """\
import logging, signal
def _flip(*_):
    root = logging.getLogger()
    root.setLevel(logging.WARNING if root.level <= logging.INFO else logging.INFO)
signal.signal(signal.SIGUSR1, _flip)
"""
TOTAL = re.compile(r"(\d+) requests in")


class FlippingOurs(Ours):
    def __init__(self, workdir: Path, upstream: str) -> None:
        super().__init__("ours", workdir, upstream, REPO_ROOT)
        command = self.mirror.command

        def with_hook() -> list[str]:
            argv = command()
            argv[2] = FLIP_HOOK + argv[2]  # [python, -c, bootstrap, ...]
            return argv

        self.mirror.command = with_hook  # type: ignore[method-assign]


def wrk(url: str, seconds: int) -> int:
    output = subprocess.run(
        ["wrk", "-t1", "-c16", f"-d{seconds}s", "-H", f"Accept: {CONTAINERD_ACCEPT}", url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    found = TOTAL.search(output)
    if found is None:
        raise RuntimeError(f"cannot parse wrk output:\n{output}")
    return int(found.group(1))


async def measure(pairs: int, seconds: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-log-cost-"))
    upstream = Distribution(workdir / "upstream")
    upstream.start()
    try:
        image = (await push_fixtures(upstream.url, Sizes.quick(), workdir)).medium
        mirror = FlippingOurs(workdir / "ours", upstream.url)
        mirror.start()
        try:
            pid = mirror.main_pid()
            url = f"{mirror.url}/v2/{image.repo}/manifests/{image.tag}"
            wrk(url, 1)  # warm: the tag resolved, the answer prepared
            runs: list[tuple[str, float]] = []
            level = "info"
            for run in range(2 * pairs):
                before = cpu_seconds([pid])
                requests = wrk(url, seconds)
                runs.append((level, (cpu_seconds([pid]) - before) * 1e6 / requests))
                print(f"run {run + 1}: {level:7s} {runs[-1][1]:6.1f} us/request", flush=True)
                os.kill(pid, signal.SIGUSR1)
                level = "warning" if level == "info" else "info"
            # Every run against each neighbour: info before warning as often as after.
            costs = []
            for (level_a, a), (_, b) in itertools.pairwise(runs):
                info, warning = (a, b) if level_a == "info" else (b, a)
                costs.append(100 * (info - warning) / info)
            info, warning = (
                statistics.median(us for name, us in runs if name == key)
                for key in ("info", "warning")
            )
            print(
                f"CPU per manifest hit, medians of {pairs} runs each: {info:.1f} us with the "
                f"access log, {warning:.1f} us without; the log costs "
                f"{statistics.median(costs):.1f} % (median of neighbouring runs; quartiles "
                f"{_quartiles(costs)})"
            )
        finally:
            mirror.stop()
    finally:
        upstream.stop()


def _quartiles(values: list[float]) -> str:
    low, _, high = statistics.quantiles(values, n=4)
    return f"{low:.1f} to {high:.1f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--seconds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(measure(args.pairs, args.seconds))


if __name__ == "__main__":
    main()
