"""``python -m bench``: start the upstream, the relays and each mirror; run; write the results."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.processes import Distribution

from bench import REPO_ROOT, scenarios
from bench.images import Sizes, push_fixtures
from bench.peers import OURS, PEERS, Peer, interrupt_safe_stop, make_peer, snapshot_ours
from bench.relay import Cuts, Relay
from bench.report import DEFAULT_SCENARIOS, FLOOR, FLOOR_2W, SCENARIOS, Samples, build, markdown

GIB = 1024**3

# program -> Debian package
REQUIRED_PROGRAMS = {
    "docker-registry": "docker-registry",
    "skopeo": "skopeo",
    "nginx": "nginx-light",
    "wrk": "wrk",
    "curl": "curl",
}


def ensure_programs() -> None:
    """Install missing Debian packages when we are root (like scripts/install-system-deps)."""
    missing = sorted({pkg for prog, pkg in REQUIRED_PROGRAMS.items() if shutil.which(prog) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(
            f"bench needs the Debian packages {' '.join(missing)}; install them as root with: "
            f"apt-get update && apt-get install -y --no-install-recommends {' '.join(missing)}"
        )
    print(f"installing Debian packages: {' '.join(missing)}", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release()}


def _version() -> str:
    """The commit our mirror was measured at, ``+dirty`` when proxy/ had uncommitted edits."""
    git = ["git", "-C", str(REPO_ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "proxy"], capture_output=True, text=True)
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the mirror against Distribution (proxy mode) and nginx.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny images, 1 repetition, seconds")
    parser.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}, or all "
        f"(default: {','.join(DEFAULT_SCENARIOS)})",
    )
    parser.add_argument("--mirrors", default=",".join(PEERS), help="comma-separated mirrors")
    parser.add_argument("--repeat", type=int, help="repetitions (default 3, --quick 1)")
    parser.add_argument("--herd-clients", type=int, help="concurrent herd pulls (default 32)")
    parser.add_argument("--large-mib", type=int, default=1024, help="size of the large layer")
    parser.add_argument("--wan-rtt-ms", type=float, default=50.0)
    parser.add_argument("--wan-mbit", type=float, default=200.0)
    parser.add_argument(
        "--cut-connections",
        type=int,
        default=3,
        help="wan_cuts: how many upstream connections are cut",
    )
    parser.add_argument(
        "--cut-mb",
        type=float,
        default=150.0,
        help="wan_cuts: MB each cut connection carries first (scaled with the large layer's "
        "size: this is for 1 GiB)",
    )
    parser.add_argument(
        "--capped-link-mbit", type=float, default=800.0, help="wan_parallel: the shared link"
    )
    parser.add_argument(
        "--capped-conn-mbit", type=float, default=100.0, help="wan_parallel: each connection"
    )
    parser.add_argument(
        "--prefetch-conn-mbit",
        type=float,
        default=50.0,
        help="prefetch: each connection's cap, on the WAN of --wan-rtt-ms and --wan-mbit",
    )
    parser.add_argument("--wrk-seconds", type=float, help="per wrk run (default 5, --quick 1)")
    parser.add_argument(
        "--output", type=Path, default=REPO_ROOT / "bench" / "results", help="results directory"
    )
    parser.add_argument(
        "--profile", action="store_true", help="record our mirror with py-spy into --output"
    )
    args = parser.parse_args(argv)
    args.scenarios = frozenset(s for s in args.scenarios.split(",") if s)
    if args.scenarios == {"all"}:
        args.scenarios = frozenset(SCENARIOS)
    args.mirrors = [m for m in args.mirrors.split(",") if m]
    if unknown := args.scenarios - set(SCENARIOS):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if unknown := set(args.mirrors) - set(PEERS):
        parser.error(f"unknown mirrors: {', '.join(sorted(unknown))}")
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.herd_clients = args.herd_clients or (8 if args.quick else 32)
    args.wrk_seconds = args.wrk_seconds or (1.0 if args.quick else 5.0)
    if args.profile and shutil.which("py-spy", path=str(Path(sys.executable).parent)) is None:
        parser.error(f"--profile needs py-spy: {sys.executable} -m pip install py-spy")
    return args


async def with_peer(
    name: str, workdir: Path, upstream: str, run: Any, *run_args: Any, **run_kwargs: Any
) -> scenarios.Results:
    """Start ``name`` with an empty cache, run one scenario group against it, stop it."""
    peer: Peer = make_peer(name, workdir, upstream, workdir / "ours-source")
    await asyncio.to_thread(peer.start)
    try:
        result: scenarios.Results = await run(peer, *run_args, **run_kwargs)
        return result
    finally:
        interrupt_safe_stop(peer)
        shutil.rmtree(peer.workdir, ignore_errors=True)  # caches are big; keep the disk free


async def _fault_relays(
    args: argparse.Namespace, upstream_port: int, large_layer: int
) -> tuple[Relay | None, Relay | None, Relay | None, list[str]]:
    """The WANs of the fault scenarios that were selected, and a line describing each."""
    rtt = args.wan_rtt_ms / 1000
    selected: frozenset[str] = args.scenarios
    cuts = capped = prefetch = None
    described: list[str] = []
    if "wan_cuts" in selected:
        # 150 MB of 1 GiB by default: the cut falls at the same place in a smaller layer.
        after = round(args.cut_mb * 1e6 * large_layer / GIB)
        cuts = await Relay(
            upstream_port,
            rtt=rtt,
            bandwidth=args.wan_mbit * 1e6,
            cuts=Cuts(args.cut_connections, after),
        ).start()
        described.append(
            f"wan_cuts: the WAN, first {args.cut_connections} upstream connections reset "
            f"after {after / 1e6:.3g} MB each"
        )
    if "wan_parallel" in selected:
        capped = await Relay(
            upstream_port,
            rtt=rtt,
            bandwidth=args.capped_link_mbit * 1e6,
            per_connection=args.capped_conn_mbit * 1e6,
        ).start()
        described.append(
            f"wan_parallel: {args.wan_rtt_ms:g} ms RTT, {args.capped_link_mbit:g} Mbit/s link, "
            f"{args.capped_conn_mbit:g} Mbit/s per connection"
        )
    if "prefetch" in selected:
        prefetch = await Relay(
            upstream_port,
            rtt=rtt,
            bandwidth=args.wan_mbit * 1e6,
            per_connection=args.prefetch_conn_mbit * 1e6,
        ).start()
        described.append(f"prefetch: the WAN, {args.prefetch_conn_mbit:g} Mbit/s per connection")
    return cuts, capped, prefetch, described


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    sizes = Sizes.quick() if args.quick else Sizes.full(args.large_mib)
    selected: frozenset[str] = args.scenarios
    await asyncio.to_thread(snapshot_ours, REPO_ROOT, workdir / "ours-source")
    version = _version()
    upstream = Distribution(workdir / "upstream")
    await asyncio.to_thread(upstream.start)
    lan = wan = None
    faults: list[Relay] = []
    try:
        started = time.monotonic()
        fixtures = await push_fixtures(upstream.url, sizes, workdir)
        print(f"images pushed in {time.monotonic() - started:.1f} s", file=sys.stderr)
        lan = await Relay(upstream.port).start()
        rtt = args.wan_rtt_ms / 1000
        wan = await Relay(upstream.port, rtt=rtt, bandwidth=args.wan_mbit * 1e6).start()
        wan_cuts, wan_capped, wan_prefetch, fault_profiles = await _fault_relays(
            args, upstream.port, fixtures.large.largest_blob[1]
        )
        faults = [relay for relay in (wan_cuts, wan_capped, wan_prefetch) if relay is not None]
        ctx = scenarios.Context(
            fixtures=fixtures,
            lan=lan,
            wan=wan,
            herd_clients=args.herd_clients,
            herd_processes=min(4, args.herd_clients),
            wrk_seconds=args.wrk_seconds,
            scenarios=selected,
            profile_dir=args.output if args.profile else None,
            wan_cuts=wan_cuts,
            wan_capped=wan_capped,
            wan_prefetch=wan_prefetch,
        )
        samples: Samples = {}
        groups: list[tuple[str, Any, str]] = []
        if selected & {"cold_pull", "warm_pull", "manifest_hits", "large_blob", "memory"}:
            groups.append(("pulls", scenarios.pulls, lan.url))
        if selected & {"herd", "memory"}:
            groups.append(("herd", scenarios.herd, lan.url))
        if "wan" in selected:
            groups.append(("wan", scenarios.wan, wan.url))
        if wan_prefetch is not None:
            groups.append(("prefetch", scenarios.prefetch, wan_prefetch.url))
            groups.append(("prefetch herd", scenarios.prefetch_herd, wan_prefetch.url))
        if wan_cuts is not None:
            groups.append(("wan_cuts", scenarios.wan_cuts, wan_cuts.url))
        if wan_capped is not None:
            groups.append(("wan_parallel", scenarios.wan_parallel, wan_capped.url))
        for rep in range(args.repeat):
            # Alternate: each group runs against every mirror in turn, the order rotating.
            order = (
                args.mirrors[rep % len(args.mirrors) :] + args.mirrors[: rep % len(args.mirrors)]
            )
            if selected & {"cold_pull", "wan", "wan_parallel", "prefetch"}:
                scenarios.merge(samples.setdefault("direct", {}), await scenarios.direct(ctx))
            if "manifest_hits" in selected:
                floors = [FLOOR, FLOOR_2W] if "ours-2w" in args.mirrors else [FLOOR]
                for name in floors:
                    print(f"rep {rep + 1}/{args.repeat}: manifest hits on {name}", file=sys.stderr)
                    floor = await with_peer(name, workdir, lan.url, scenarios.floor_hits, ctx)
                    scenarios.merge(samples.setdefault(name, {}), floor)
            for label, run, upstream_url in groups:
                for name in order:
                    print(f"rep {rep + 1}/{args.repeat}: {label} on {name}", file=sys.stderr)
                    kwargs = {"first_rep": rep == 0} if run is scenarios.pulls else {}
                    result = await with_peer(name, workdir, upstream_url, run, ctx, **kwargs)
                    scenarios.merge(samples.setdefault(name, {}), result)
    finally:
        for relay in (lan, wan, *faults):
            if relay is not None:
                await relay.stop()
        await asyncio.to_thread(upstream.stop)
    # Report only what was asked for (groups measure a little more).
    for scenarios_of_mirror in samples.values():
        for scenario in list(scenarios_of_mirror):
            if scenario not in selected:
                del scenarios_of_mirror[scenario]
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "quick": args.quick,
        "repeat": args.repeat,
        "mirrors": args.mirrors,
        "scenarios": sorted(selected, key=SCENARIOS.index),
        "herd_clients": args.herd_clients,
        "image_bytes": fixtures.summary(),
        "wan": f"{args.wan_rtt_ms:g} ms RTT, {args.wan_mbit:g} Mbit/s",
        "wan_faults": "; ".join(fault_profiles),
        "seconds": round(time.monotonic() - started, 1),
        "ours_version": version,
    }
    return build(samples, meta, [m for m in args.mirrors if m not in OURS])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_programs()
    args.output.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    # SIGTERM takes the same path as Ctrl-C, so every process we started is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        result = asyncio.run(bench(args, workdir))
    except KeyboardInterrupt:
        print("interrupted; every process started was stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    (args.output / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.output / "latest.md").write_text(table)
    print(table)
    return 0
