"""A bounded soak and a fan-out: does the mirror stay correct and flat under hours-like load?

    python -m bench.soak [--minutes 10] [--fanout-clients 20] [--large-mib 1024] [--workers 1]

1. fan-out: `--fanout-clients` concurrent cold fetches of one large blob (a layer nobody has
   yet), checking every byte count, sampling the mirror's peak RSS;
2. soak: `wrk` for `--minutes` at 32 connections over a mix of manifests by digest and by tag
   and small blobs, all cache hits, sampling RSS every 10 s; any non-2xx answer or socket
   error fails the run.

Not a CI test (it takes minutes); the numbers go into the issue notes and the README.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import tempfile
import time
from pathlib import Path

import aiohttp
from harness.processes import Distribution

from bench.client import CONTAINERD_ACCEPT
from bench.images import Fixtures, Sizes, push_fixtures
from bench.peers import MemorySampler, Ours, _status_kib
from bench.scenarios import _communicate, _curl_blob

LUA = """
paths = {PATHS}
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", paths[(counter % #paths) + 1], {{["Accept"] = "{ACCEPT}"}})
end
"""
NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
SOCKET_ERRORS = re.compile(r"Socket errors: (.*)")
REQUESTS = re.compile(r"(\d+) requests in")


async def soak(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    with Distribution(workdir / "upstream") as upstream:
        fixtures = await push_fixtures(upstream.url, Sizes.full(large_mib=args.large_mib), workdir)
        mirror = Ours("ours", workdir / "mirror", upstream.url, workers=args.workers)
        mirror.start()
        try:
            return await _measure(args, workdir, mirror, fixtures)
        finally:
            mirror.stop()


async def _measure(
    args: argparse.Namespace, workdir: Path, mirror: Ours, fixtures: Fixtures
) -> dict[str, object]:
    large, small = fixtures.large, fixtures.small
    digest, size = large.largest_blob
    url = f"{mirror.url}/v2/{large.repo}/blobs/{digest}"
    async with MemorySampler(mirror.pids()) as memory:
        started = time.monotonic()
        fetched = await asyncio.gather(*(_curl_blob(url) for _ in range(args.fanout_clients)))
        fanout_wall = time.monotonic() - started
    short = [got for got, _ in fetched if got != size]

    paths = [
        f"/v2/{small.repo}/manifests/{small.manifest_digest}",
        f"/v2/{small.repo}/manifests/{small.tag}",
        *(f"/v2/{small.repo}/blobs/{blob}" for blob, _ in small.blobs),
    ]
    async with aiohttp.ClientSession() as session:
        for path in paths:  # warm every path so the soak measures hits
            async with session.get(
                f"{mirror.url}{path}", headers={"Accept": CONTAINERD_ACCEPT}
            ) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"warm-up of {path}: {response.status}")
    script = workdir / "mixed.lua"
    lua_paths = "{" + ", ".join(json.dumps(p) for p in paths) + "}"
    script.write_text(LUA.format(PATHS=lua_paths, ACCEPT=CONTAINERD_ACCEPT))
    samples: list[tuple[float, float]] = []

    async def sample_rss() -> None:
        started = time.monotonic()
        while True:
            rss = sum(_status_kib(pid, "VmRSS") for pid in mirror.pids()) / 1024
            samples.append((round(time.monotonic() - started), round(rss, 1)))
            await asyncio.sleep(10)

    sampler = asyncio.create_task(sample_rss())
    try:
        output = await _communicate(
            ["wrk", "-t2", "-c32", f"-d{int(args.minutes * 60)}s", "-s", str(script), mirror.url]
        )
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    non_2xx = NON_2XX.search(output)
    errors = SOCKET_ERRORS.search(output)
    requests = REQUESTS.search(output)
    return {
        "fanout": {
            "clients": args.fanout_clients,
            "blob_bytes": size,
            "short_reads": len(short),
            "wall_s": round(fanout_wall, 2),
            "peak_rss_mib": round(memory.peak_mib, 1),
        },
        "soak": {
            "minutes": args.minutes,
            "requests": int(requests.group(1)) if requests else None,
            "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
            "socket_errors": errors.group(1) if errors else "none",
            "rss_mib_over_time": samples,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--fanout-clients", type=int, default=20)
    parser.add_argument("--large-mib", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as directory:
        result = asyncio.run(soak(args, Path(directory)))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
