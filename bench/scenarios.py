"""One function per group of scenarios; each returns ``{scenario: {metric: value}}``.

A group shares one mirror instance, started with an empty cache by the caller:

- :func:`pulls`: 1 cold pull, 2 warm pull, 4 manifest hits (wrk), 5 large warm blob (curl), and
  the memory of 5 for scenario 6;
- :func:`herd`: 3 thundering herd, and its memory for scenario 6;
- :func:`wan`: 7 cold and warm pull through the simulated WAN; :func:`direct` pulls without a
  mirror, the baseline of 1, 7 and the scenarios below;
- :func:`wan_cuts`: the large layer pulled by 6 clients at once while the WAN cuts the first
  upstream connections part-way (resume);
- :func:`wan_parallel`: a cold fetch of the large layer over a WAN that caps each connection
  (several connections per blob);
- :func:`prefetch` and :func:`prefetch_herd`: a cold pull, and a herd of them, of the 10-layer
  image over the WAN with a per-connection cap (prefetch).

Clients always run in processes of their own (``bench.client``, ``wrk``, ``curl``, ``skopeo``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.skopeo import skopeo_copy
from harness.verify import blob_digests, verify_dir

from bench import REPO_ROOT
from bench.client import CONTAINERD_ACCEPT
from bench.images import Fixtures, PushedImage
from bench.peers import MemorySampler, Peer
from bench.relay import Relay

Metrics = dict[str, float]
Results = dict[str, Metrics]

LARGE_BLOB_CLIENTS = 4
WRK_CONNECTIONS = 64
WRK_THREADS = 2
CHILD_TIMEOUT_SECONDS = 1800
CUT_CLIENTS = 6
PREFETCH_HERD_CLIENTS = 8
# A mirror may finish a download after its clients are done (or gave up): wait for it, as long
# as a 1 GiB layer takes over the slowest WAN profile.
WAN_SETTLE_SECONDS = 180.0


@dataclass
class Context:
    fixtures: Fixtures
    lan: Relay
    wan: Relay
    herd_clients: int
    herd_processes: int
    wrk_seconds: float
    scenarios: frozenset[str]
    profile_dir: Path | None
    # The WAN profiles of the fault scenarios (see bench.run for their shapes).
    wan_cuts: Relay | None = None
    wan_capped: Relay | None = None
    wan_prefetch: Relay | None = None
    skopeo_check: bool = True


class BenchError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------
# Child processes
# ------------------------------------------------------------------------------------------


async def _communicate(args: Sequence[str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(CHILD_TIMEOUT_SECONDS):
            stdout, _ = await proc.communicate()
    finally:
        await _reap(proc)
    if proc.returncode != 0:
        raise BenchError(f"{args[0]} exited with {proc.returncode}")
    return stdout.decode()


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Kill our child if it still runs (cancelled or timed out), then wait for it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    await proc.wait()


@dataclass
class Pull:
    start: float
    end: float
    first_byte: float | None
    bytes: int
    error: str | None = None

    @property
    def seconds(self) -> float:
        return self.end - self.start


async def run_pulls(
    base: str,
    image: PushedImage,
    *,
    pulls: int = 1,
    processes: int = 1,
    allow_errors: bool = False,
) -> tuple[float, list[Pull]]:
    """Start ``processes`` clients sharing ``pulls`` pulls, release them at once.

    Returns the release time and every pull. The clients import and connect nothing before the
    release, so process start-up is not part of any time measured. A failed pull (the clients
    never retry) raises, or with ``allow_errors`` is returned with its error.
    """
    shares = [pulls // processes + (1 if i < pulls % processes else 0) for i in range(processes)]
    procs: list[asyncio.subprocess.Process] = []
    try:
        for share in shares:
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bench.client",
                    "--base",
                    base,
                    "--repo",
                    image.repo,
                    "--ref",
                    image.tag,
                    "--pulls",
                    str(share),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    cwd=REPO_ROOT,
                )
            )
        for proc in procs:
            assert proc.stdout is not None
            if (await proc.stdout.readline()).strip() != b"ready":
                raise BenchError("a pull client failed to start")
        released = time.monotonic()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        outputs = await asyncio.gather(*(proc.communicate() for proc in procs))
    finally:
        for proc in procs:
            await _reap(proc)
    found: list[Pull] = []
    for stdout, _ in outputs:
        for item in json.loads(stdout):
            if item["error"] is not None and not allow_errors:
                raise BenchError(f"pull of {image.repo}:{image.tag} from {base}: {item['error']}")
            found.append(
                Pull(item["start"], item["end"], item["first_byte"], item["bytes"], item["error"])
            )
    return released, found


async def settle_disks() -> None:
    """Write back every dirty page before a timed block, so what a mirror (or the phase before)
    left for the disk does not land in another's measurement: nginx and Distribution leave
    their cache files to the kernel's write-back, ours syncs them in the background."""
    await asyncio.to_thread(os.sync)


async def pull_seconds(base: str, image: PushedImage) -> float:
    await settle_disks()
    _, [pull] = await run_pulls(base, image)
    return pull.seconds


@contextlib.asynccontextmanager
async def profiled(peer: Peer, ctx: Context, label: str) -> AsyncIterator[None]:
    """Record our mirror with py-spy (collapsed stacks) while the block runs, if asked to."""
    if ctx.profile_dir is None or peer.name != "ours":
        yield
        return
    output = ctx.profile_dir / f"profile-{label}.txt"
    spy = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "py-spy"),
        "record",
        "--pid",
        str(peer.main_pid()),
        "--rate",
        "200",
        "--format",
        "raw",
        "--output",
        str(output),
        "--nonblocking",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.sleep(0.5)  # let py-spy attach
    try:
        yield
    finally:
        # py-spy writes its output on SIGINT.
        with contextlib.suppress(ProcessLookupError):
            spy.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(spy.wait(), 30)
        finally:
            await _reap(spy)


# ------------------------------------------------------------------------------------------
# Scenario groups
# ------------------------------------------------------------------------------------------


async def pulls(peer: Peer, ctx: Context, *, first_rep: bool) -> Results:
    """Cold, then warm pulls of the small (multi-arch) and medium images; then hits."""
    fixtures, lan = ctx.fixtures, ctx.lan
    out: Results = {}
    cold: Metrics = {}
    for image in (fixtures.small, fixtures.medium):
        lan.reset()
        pids = peer.pids()
        before = cpu_seconds(pids)
        cold[f"{image.name}_s"] = await pull_seconds(peer.url, image)
        # The CPU the server spent on the pull: where the pull keeps the cores busy, it comes
        # out of the client's, the relay's and the upstream's share.
        cold[f"{image.name}_cpu_s"] = cpu_seconds(pids) - before
        cold[f"{image.name}_upstream_ratio"] = (await lan.settle()).downstream / image.pull_bytes
    out["cold_pull"] = cold

    warm: Metrics = {}
    lan.reset()
    for image in (fixtures.small, fixtures.medium):
        warm[f"{image.name}_s"] = await pull_seconds(peer.url, image)
    warm["upstream_bytes"] = (await lan.settle()).downstream
    if first_rep and ctx.skopeo_check:
        warm["skopeo_ok"] = await _skopeo_check(peer, fixtures.small)
    out["warm_pull"] = warm

    if "manifest_hits" in ctx.scenarios:
        async with profiled(peer, ctx, "manifest_hits"):
            out["manifest_hits"] = await manifest_hits(peer, ctx)
    if ctx.scenarios & {"large_blob", "memory"}:
        out["large_blob"], peak = await large_blob(peer, ctx)
        out["memory"] = {"large_blob_peak_mib": peak}
    return out


async def _skopeo_check(peer: Peer, image: PushedImage) -> float:
    """One pull of the multi-arch image with a real client (skopeo), every file verified."""
    host = peer.url.removeprefix("http://")
    with tempfile.TemporaryDirectory(prefix="bench-skopeo-") as tmp:
        dest = Path(tmp) / "out"
        ref = f"{host}/{image.repo}:{image.tag}"
        await asyncio.to_thread(skopeo_copy, ref, dest, "--override-arch", "amd64")
        found = verify_dir(dest)
    expected = {digest for digest, _ in image.blobs}
    return 1.0 if blob_digests(found) == expected else 0.0


WRK_LATENCY = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
WRK_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
WRK_TOTAL = re.compile(r"^\s+(\d+) requests in", re.MULTILINE)
WRK_ERRORS = re.compile(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)")
UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


async def _wrk(url: str, seconds: float) -> tuple[Metrics, int]:
    output = await _communicate(
        [
            "wrk",
            f"-t{WRK_THREADS}",
            f"-c{WRK_CONNECTIONS}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-H",
            f"Accept: {CONTAINERD_ACCEPT}",
            url,
        ]
    )
    if errors := WRK_ERRORS.search(output):
        raise BenchError(f"wrk {url}: {errors.group(0)}")
    latency = {p: float(v) * UNIT_MS[u] for p, v, u in WRK_LATENCY.findall(output)}
    rate = WRK_RATE.search(output)
    total = WRK_TOTAL.search(output)
    if rate is None or total is None or set(latency) != {"50", "99"}:
        raise BenchError(f"cannot parse wrk output:\n{output}")
    return {
        "rps": float(rate.group(1)),
        "p50_ms": latency["50"],
        "p99_ms": latency["99"],
    }, int(total.group(1))


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU seconds of the processes `pids` so far (0 for one that is gone)."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


class HostSteal:
    """The share of this machine's CPU time its host took back while a block ran (`steal` in
    /proc/stat, in per cent): a virtual machine whose host throttles it stops for whole
    scheduling periods, so a run with steal is slower, and its tail latency longer, through no
    fault of the mirror's. Also how many cores were busy meanwhile (`busy_cores`): a transfer
    that keeps every core busy takes longer by whatever CPU one more process in its path
    spends. (Not around a pull: it includes starting the client processes.)"""

    def __init__(self) -> None:
        self.percent = 0.0
        self.busy_cores = 0.0
        self._start = (0, 0, 0)

    @staticmethod
    def _counters() -> tuple[int, int, int]:
        """Ticks stolen, ticks idle (waiting for I/O included) and all ticks, over every CPU."""
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return 0, 0, 0
        ticks = [int(field) for field in fields]
        steal = ticks[7] if len(ticks) > 7 else 0
        return steal, ticks[3] + ticks[4], sum(ticks)

    def __enter__(self) -> HostSteal:
        self._start = self._counters()
        return self

    def __exit__(self, *exc: object) -> None:
        counted = zip(self._counters(), self._start, strict=True)
        steal, idle, total = (now - then for now, then in counted)
        if total > 0:
            self.percent = 100 * steal / total
            self.busy_cores = (os.cpu_count() or 1) * (total - idle - steal) / total


async def manifest_hits(peer: Peer, ctx: Context) -> Metrics:
    """``wrk`` at 64 connections: the medium manifest by digest, then by tag (already pulled)."""
    image = ctx.fixtures.medium
    base = f"{peer.url}/v2/{image.repo}/manifests"
    out: Metrics = {}
    for kind, ref in (("digest", image.manifest_digest), ("tag", image.tag)):
        await settle_disks()
        ctx.lan.reset()
        pids = peer.pids()
        served_before = cpu_seconds(pids)
        clients_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with HostSteal() as steal:
            metrics, requests = await _wrk(f"{base}/{ref}", ctx.wrk_seconds)
        served, clients = cpu_seconds(pids), resource.getrusage(resource.RUSAGE_CHILDREN)
        upstream = (await ctx.lan.settle()).downstream
        out.update({f"{kind}_{name}": value for name, value in metrics.items()})
        out[f"{kind}_steal_pct"] = steal.percent
        # CPU per request, of the peer's processes and of wrk's: on a machine that wrk shares,
        # they bound what more workers can add (bench.report).
        requests_us = max(requests, 1) / 1e6
        out[f"{kind}_cpu_us"] = (served - served_before) / requests_us
        out[f"{kind}_client_cpu_us"] = (
            clients.ru_utime - clients_before.ru_utime + clients.ru_stime - clients_before.ru_stime
        ) / requests_us
        # Bytes the upstream sent per request served: 0 when hits never leave the mirror.
        out[f"{kind}_upstream_bytes_per_req"] = upstream / max(requests, 1)
    return out


async def floor_hits(peer: Peer, ctx: Context) -> Results:
    """The same wrk runs against the bare-aiohttp floor (:mod:`bench.floor`)."""
    return {"manifest_hits": await manifest_hits(peer, ctx)}


async def _curl_blob(url: str) -> tuple[int, float]:
    output = await _communicate(
        ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url]
    )
    size, seconds = output.split()
    return int(size), float(seconds)


async def large_blob(peer: Peer, ctx: Context) -> tuple[Metrics, float]:
    """The 1 GiB layer, cached by one cold fetch, then read by 4 clients at once (``curl`` to
    /dev/null: no hashing, so the client is cheap; its CPU share is reported to prove it)."""
    image = ctx.fixtures.large
    digest, size = image.largest_blob
    url = f"{peer.url}/v2/{image.repo}/blobs/{digest}"
    await settle_disks()
    ctx.lan.reset()
    pids = peer.pids()
    cpu_before = cpu_seconds(pids)
    with HostSteal() as host:
        got, cold_seconds = await _curl_blob(url)
    cold_cpu = cpu_seconds(pids) - cpu_before
    await ctx.lan.settle()
    if got != size:
        raise BenchError(f"cold fetch of the large blob from {peer.name}: {got} of {size} bytes")
    await settle_disks()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    async with MemorySampler(peer.pids()) as memory, profiled(peer, ctx, "large_blob"):
        started = time.monotonic()
        results = await asyncio.gather(*(_curl_blob(url) for _ in range(LARGE_BLOB_CLIENTS)))
        wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if any(got != size for got, _ in results):
        raise BenchError(f"short read of the large blob from {peer.name}")
    client_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "cold_s": cold_seconds,
        "cold_cpu_s": cold_cpu,
        "cold_busy_cores": host.busy_cores,
        "warm_gb_per_s": LARGE_BLOB_CLIENTS * size / wall / 1e9,
        # Cores the 4 curl processes used together (of 2 on the reference machine).
        "client_cpu_cores": client_cpu / wall,
    }, memory.peak_mib


async def herd(peer: Peer, ctx: Context) -> Results:
    """N concurrent cold pulls of the medium image through a fresh mirror."""
    image = ctx.fixtures.medium
    await settle_disks()
    ctx.lan.reset()
    with HostSteal() as steal:
        async with MemorySampler(peer.pids()) as memory, profiled(peer, ctx, "herd"):
            released, found = await run_pulls(
                peer.url, image, pulls=ctx.herd_clients, processes=ctx.herd_processes
            )
    upstream = (await ctx.lan.settle()).downstream
    seconds = sorted(pull.seconds for pull in found)
    first_bytes = sorted(pull.first_byte - released for pull in found if pull.first_byte)
    return {
        "herd": {
            "total_s": max(pull.end for pull in found) - released,
            "p50_client_s": statistics.median(seconds),
            "p99_client_s": _percentile(seconds, 0.99),
            "upstream_ratio": upstream / image.pull_bytes,
            "first_ttfb_s": first_bytes[0],
            "last_ttfb_s": first_bytes[-1],
            "ttfb_spread_ms": (first_bytes[-1] - first_bytes[0]) * 1000,
            "steal_pct": steal.percent,
        },
        "memory": {"herd_peak_mib": memory.peak_mib},
    }


async def wan(peer: Peer, ctx: Context) -> Results:
    """Cold then warm pull of the medium image through a mirror whose upstream is the WAN."""
    image = ctx.fixtures.medium
    ctx.wan.reset()
    cold = await pull_seconds(peer.url, image)
    cold_bytes = (await ctx.wan.settle()).downstream
    warm = await pull_seconds(peer.url, image)
    return {
        "wan": {
            "cold_s": cold,
            "warm_s": warm,
            "cold_upstream_ratio": cold_bytes / image.pull_bytes,
        }
    }


async def wan_cuts(peer: Peer, ctx: Context) -> Results:
    """6 clients pull the large image at once through a cold mirror while the WAN cuts the first
    upstream connections part-way. Clients never retry: a pull that fails is counted."""
    assert ctx.wan_cuts is not None
    relay, image = ctx.wan_cuts, ctx.fixtures.large
    relay.reset()
    released, found = await run_pulls(
        peer.url, image, pulls=CUT_CLIENTS, processes=min(3, CUT_CLIENTS), allow_errors=True
    )
    counters = await relay.settle(limit=WAN_SETTLE_SECONDS)
    # Each client checked every blob's size and sha256: no error means the whole image verified.
    verified = sum(1 for pull in found if pull.error is None and pull.bytes == image.pull_bytes)
    return {
        "wan_cuts": {
            "verified_clients": verified,
            "failed_clients": len(found) - verified,
            "total_s": max(pull.end for pull in found) - released,
            "upstream_ratio": counters.downstream / image.pull_bytes,
            "cuts": counters.cuts,
        }
    }


async def wan_parallel(peer: Peer, ctx: Context) -> Results:
    """A cold fetch of the large layer (``curl``) through the mirror, over a WAN that caps each
    connection well below the link."""
    assert ctx.wan_capped is not None
    relay, image = ctx.wan_capped, ctx.fixtures.large
    digest, size = image.largest_blob
    relay.reset()
    got, seconds = await _curl_blob(f"{peer.url}/v2/{image.repo}/blobs/{digest}")
    counters = await relay.settle(limit=WAN_SETTLE_SECONDS)
    if got != size:
        raise BenchError(f"cold fetch of the large blob from {peer.name}: {got} of {size} bytes")
    return {
        "wan_parallel": {
            "cold_s": seconds,
            "upstream_ratio": counters.downstream / size,
            "connections": counters.connections,
        }
    }


async def prefetch(peer: Peer, ctx: Context) -> Results:
    """A containerd-style cold pull of the 10-layer image through the mirror, over the WAN with
    a per-connection cap: a mirror that fetches blobs before they are asked for finishes first."""
    assert ctx.wan_prefetch is not None
    relay, image = ctx.wan_prefetch, ctx.fixtures.wide
    relay.reset()
    seconds = await pull_seconds(peer.url, image)
    counters = await relay.settle(limit=WAN_SETTLE_SECONDS)
    return {
        "prefetch": {"cold_s": seconds, "upstream_ratio": counters.downstream / image.pull_bytes}
    }


async def prefetch_herd(peer: Peer, ctx: Context) -> Results:
    """A herd of cold pulls of the 10-layer image (fresh mirror): what the upstream sends must
    not grow with prefetch."""
    assert ctx.wan_prefetch is not None
    relay, image = ctx.wan_prefetch, ctx.fixtures.wide
    relay.reset()
    released, found = await run_pulls(
        peer.url, image, pulls=PREFETCH_HERD_CLIENTS, processes=min(4, PREFETCH_HERD_CLIENTS)
    )
    counters = await relay.settle(limit=WAN_SETTLE_SECONDS)
    return {
        "prefetch": {
            "herd_total_s": max(pull.end for pull in found) - released,
            "herd_upstream_ratio": counters.downstream / image.pull_bytes,
        }
    }


async def direct(ctx: Context) -> Results:
    """The baselines: pulls straight from the upstream, over the LAN relay and over the WANs."""
    out: Results = {}
    if "cold_pull" in ctx.scenarios:
        out["cold_pull"] = {
            f"{image.name}_s": await pull_seconds(ctx.lan.url, image)
            for image in (ctx.fixtures.small, ctx.fixtures.medium)
        }
    if "wan" in ctx.scenarios:
        seconds = await pull_seconds(ctx.wan.url, ctx.fixtures.medium)
        out["wan"] = {"cold_s": seconds, "warm_s": seconds}
    if "wan_parallel" in ctx.scenarios and ctx.wan_capped is not None:
        # One connection, as a client pulling straight from the registry uses per blob.
        image = ctx.fixtures.large
        digest, size = image.largest_blob
        got, seconds = await _curl_blob(f"{ctx.wan_capped.url}/v2/{image.repo}/blobs/{digest}")
        if got != size:
            raise BenchError(f"direct fetch of the large blob: {got} of {size} bytes")
        out["wan_parallel"] = {"cold_s": seconds}
    if "prefetch" in ctx.scenarios and ctx.wan_prefetch is not None:
        out["prefetch"] = {"cold_s": await pull_seconds(ctx.wan_prefetch.url, ctx.fixtures.wide)}
    return out


def _percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile: with fewer than 100 clients, p99 is the slowest client."""
    rank = max(1, -(-len(sorted_values) * fraction // 1))
    return sorted_values[int(rank) - 1]


def merge(into: dict[str, dict[str, list[float]]], results: Results | dict[str, Any]) -> None:
    for scenario, metrics in results.items():
        bucket = into.setdefault(scenario, {})
        for name, value in metrics.items():
            bucket.setdefault(name, []).append(float(value))
