"""`registry-proxy warm`: pull images through a running mirror so that its cache holds them.

Everything goes through the mirror's own pull API, exactly as a node's pull would, so the same
command fills a mirror on this host or one across the LAN. For each image (`proxy.cli.warmer`
does the work):

1. the manifest by tag or digest (`ghcr.io/org/app:1.2` is `/v2/ghcr.io/org/app/...` on the
   mirror, `nginx` is `/v2/library/nginx/...`, see `references`);
2. for an index, the platform manifests that match `--platform` (default: this host's
   linux/<arch>), or all of them with `--all-platforms`;
3. every config and layer blob, read to the end and hashed: a blob whose bytes do not hash to
   its digest, or whose size is not its descriptor's, fails the image.

Blobs shared by several images are fetched once. At most `--concurrency` images and requests
are in flight. The tag resolution `warm` leaves in the mirror serves every kind of client, not
just the Accept list `warm` sends, also while the upstream is down (`proxy.tags`). The
mirror's `X-Cache` header says whether a blob was already cached (HIT) or came from the
upstream now. Running it again fetches nothing new: the command is idempotent.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any, Final

import aiohttp
from rich.console import Console
from rich.filesize import pick_unit_and_suffix
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from yarl import URL

from proxy.cli.warmer import ImageReport, Platform, Warmer

DEFAULT_MIRROR: Final = "http://127.0.0.1:5000"
MIRROR_ENV: Final = "REGISTRY_PROXY_MIRROR"
DEFAULT_CONCURRENCY: Final = 4


# --- output: progress bars on a terminal, plain lines elsewhere, then a summary table


def binary_size(count: int) -> str:
    unit, suffix = pick_unit_and_suffix(count, ["B", "KiB", "MiB", "GiB", "TiB", "PiB"], 1024)
    return f"{count} B" if unit == 1 else f"{count / unit:.1f} {suffix}"


class ProgressBars:
    """A bar per image in flight and one for the total; finished images scroll above them."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}", style="bold"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.total = self.progress.add_task("total", total=0)
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> ProgressBars:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def image_started(self, image: str, blobs: int, total: int) -> None:
        self._tasks[image] = self.progress.add_task(image, total=total)
        grand_total = self.progress.tasks[self.total].total or 0
        self.progress.update(self.total, total=grand_total + total)

    def advance(self, image: str, count: int) -> None:
        self.progress.advance(self._tasks[image], count)
        self.progress.advance(self.total, count)

    def image_finished(self, report: ImageReport) -> None:
        task = self._tasks.pop(report.reference, None)
        if task is not None:
            self.progress.remove_task(task)
        self.console.print(_finished_line(report), markup=False, highlight=False, soft_wrap=True)


class ProgressLines:
    """Plain log lines, for a pipe or a file (a CI log, `kubectl ... | registry-proxy warm`)."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def image_started(self, image: str, blobs: int, total: int) -> None:
        self.console.print(
            f"warming {image}: {blobs} blobs, {binary_size(total)}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )

    def advance(self, image: str, count: int) -> None:
        pass

    def image_finished(self, report: ImageReport) -> None:
        self.console.print(_finished_line(report), markup=False, highlight=False, soft_wrap=True)


def _finished_line(report: ImageReport) -> str:
    if report.failure is not None:
        return f"FAILED {report.reference}: {report.failure}"
    return (
        f"warmed {report.reference}: {report.blobs} blobs, {binary_size(report.fetched_bytes)} "
        f"fetched, {binary_size(report.cached_bytes)} already cached"
    )


def print_summary(console: Console, reports: list[ImageReport]) -> None:
    table = Table(title="warm summary", title_justify="left")
    table.add_column("image", overflow="fold")
    table.add_column("platforms")
    table.add_column("blobs", justify="right")
    table.add_column("fetched", justify="right")
    table.add_column("cached", justify="right")
    table.add_column("result")
    for report in reports:
        table.add_row(
            report.reference,
            ", ".join(report.platforms) or "-",
            str(report.blobs),
            binary_size(report.fetched_bytes),
            binary_size(report.cached_bytes),
            "ok" if report.ok else "[red]FAILED[/red]",
        )
    console.print(table)
    failed = [report for report in reports if not report.ok]
    console.print(
        f"{len(reports)} images ({len(failed)} failed), "
        f"{sum(r.blobs for r in reports)} blobs, "
        f"{binary_size(sum(r.fetched_bytes for r in reports))} fetched, "
        f"{binary_size(sum(r.cached_bytes for r in reports))} already cached",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    for report in failed:
        console.print(
            f"failed: {report.reference}: {report.failure}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


async def warm_images(
    references: list[str],
    *,
    mirror: URL,
    platforms: frozenset[Platform] | None,
    concurrency: int = DEFAULT_CONCURRENCY,
    console: Console,
) -> list[ImageReport]:
    """Warm `references` through the mirror, showing progress on `console`."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
    view = ProgressBars(console) if console.is_terminal else ProgressLines(console)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        with view:
            warmer = Warmer(
                session, mirror, platforms=platforms, concurrency=concurrency, view=view
            )
            return await warmer.warm_all(references)


# --- the command line


def add_command(commands: Any) -> None:
    """Add `warm` to the `registry-proxy` subcommands."""
    warm = commands.add_parser(
        "warm",
        help="pull images through a running mirror so that its cache holds them",
        description=(
            "Fetch images (manifests and every blob) through a running mirror's pull API, so "
            "that its cache holds them. References are written as for docker pull: nginx, "
            "nginx:1.27, ghcr.io/org/app:1.2, host:5000/team/app@sha256:... A warmed tag then "
            "answers every client type (docker, containerd and the CRI, podman, skopeo, "
            "CRI-O), whatever Accept header it sends, and keeps answering while the upstream "
            "is down, black-holed or rate limiting (for stale_ttl). Exit status 1 when any "
            "image failed."
        ),
    )
    warm.add_argument("images", nargs="*", metavar="IMAGE", help="image references")
    warm.add_argument(
        "--file",
        metavar="LIST",
        action="append",
        default=[],
        help="read references from LIST, one a line ('-': standard input); blank lines and "
        "# comments are ignored, duplicates are warmed once",
    )
    which = warm.add_mutually_exclusive_group()
    which.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        action="append",
        default=[],
        help="platforms to take from multi-platform images, repeatable "
        f"(default: this host's, {Platform.host()})",
    )
    which.add_argument(
        "--all-platforms", action="store_true", help="take every platform of an index"
    )
    warm.add_argument(
        "--mirror",
        metavar="URL",
        default=os.environ.get(MIRROR_ENV, DEFAULT_MIRROR),
        help=f"the mirror to fill (or set {MIRROR_ENV}; default {DEFAULT_MIRROR})",
    )
    warm.add_argument(
        "--concurrency",
        metavar="N",
        type=_positive,
        default=DEFAULT_CONCURRENCY,
        help=f"images and requests in flight at once (default {DEFAULT_CONCURRENCY})",
    )


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def read_references(images: list[str], files: list[str]) -> list[str]:
    """The references from the arguments and the list files, in order, each once."""
    found = list(images)
    for name in files:
        if name == "-":
            found += sys.stdin.read().splitlines()
        else:
            with open(name) as file:
                found += file.read().splitlines()
    lines = (line.split("#", 1)[0].strip() for line in found)
    return list(dict.fromkeys(line for line in lines if line))


def main(args: argparse.Namespace) -> int:
    prog = "registry-proxy warm"
    try:
        references = read_references(args.images, args.file)
        platforms = (
            None
            if args.all_platforms
            else frozenset(Platform.parse(p) for p in args.platform) or frozenset({Platform.host()})
        )
        mirror = URL(args.mirror.rstrip("/"))
        if mirror.scheme not in ("http", "https") or not mirror.host:
            raise ValueError(f"{args.mirror!r} is not an http(s) URL")
    except (OSError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if not references:
        print(f"{prog}: no images given (arguments or --file)", file=sys.stderr)
        return 2
    console = Console(highlight=False)
    reports = asyncio.run(
        warm_images(
            references,
            mirror=mirror,
            platforms=platforms,
            concurrency=args.concurrency,
            console=console,
        )
    )
    print_summary(console, reports)
    return 0 if all(report.ok for report in reports) else 1
