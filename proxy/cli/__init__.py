"""The `registry-proxy` command line: `serve` runs the mirror; `warm` and `cache` are client
tools that talk to a running mirror over HTTP (its pull API, its admin API)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy.cli import cache, serve, warm
from proxy.config import ENV_PREFIX, ConfigError
from proxy.config.load import load_settings

PROG = "registry-proxy"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A pull-through caching mirror for OCI and Docker registries.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve.add_command(commands)
    warm.add_command(commands)
    cache.add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "warm":
        return warm.main(args)
    if args.command == "cache":
        return cache.main(args)
    flags = {
        key: value
        for key, value in vars(args).items()
        if key not in ("command", "config") and value is not None
    }
    config = args.config
    if config is None and (from_env := os.environ.get(f"{ENV_PREFIX}CONFIG")):
        config = Path(from_env)  # containers point at a mounted file without extra arguments
    try:
        settings = load_settings(config, flags=flags)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    return serve.run(settings)
