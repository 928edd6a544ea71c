"""`registry-proxy cache ...`: the admin API (`admin`) from the command line, as tables.

registry-proxy cache stats                 size, budget, hit ratio, top repositories, upstream quota
registry-proxy cache ls REPO               cached tags with digest and age
registry-proxy cache invalidate REPO[:TAG] the next pull revalidates with the upstream
registry-proxy cache evict DIGEST          drop one blob or manifest
registry-proxy cache verify                re-hash everything; corrupt files are evicted
registry-proxy cache pins [set REF... | clear]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
from pathlib import Path
from typing import Any, Final

import aiohttp
from rich.console import Console
from rich.table import Table
from yarl import URL

from proxy.cli.warm import binary_size

DEFAULT_ADMIN: Final = "http://127.0.0.1:5001"
ADMIN_ENV: Final = "REGISTRY_PROXY_ADMIN_URL"
TOKEN_FILE_ENV: Final = "REGISTRY_PROXY_ADMIN_TOKEN_FILE"  # noqa: S105 (a variable name)
PROG: Final = "registry-proxy cache"


class AdminUnavailable(Exception):
    """The admin API could not be reached or refused the request; the message says why."""


class AdminClient:
    def __init__(self, session: aiohttp.ClientSession, base: URL, token: str | None) -> None:
        self.session = session
        self.base = base
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def call(
        self, method: str, path: str, *, json: Any = None, params: dict[str, str] | None = None
    ) -> dict[str, Any]:
        url = self.base.with_path(path)
        try:
            async with self.session.request(
                method, url, json=json, params=params, headers=self.headers
            ) as response:
                try:
                    body = await response.json(content_type=None)
                except ValueError:
                    body = None
                if response.status >= 400 or not isinstance(body, dict):
                    why = body.get("error") if isinstance(body, dict) else None
                    raise AdminUnavailable(f"HTTP {response.status}: {why or response.reason}")
                return body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AdminUnavailable(f"cannot reach the admin API at {self.base}: {exc}") from None


def add_command(commands: Any) -> None:
    cache = commands.add_parser(
        "cache",
        help="inspect and manage a running mirror's cache (the admin API)",
        description="Talk to a running mirror's admin API (admin_listen).",
    )
    cache.add_argument(
        "--admin",
        metavar="URL",
        default=os.environ.get(ADMIN_ENV, DEFAULT_ADMIN),
        help=f"the admin API (or set {ADMIN_ENV}; default {DEFAULT_ADMIN})",
    )
    cache.add_argument(
        "--token-file",
        metavar="FILE",
        default=os.environ.get(TOKEN_FILE_ENV),
        help=f"file holding the admin bearer token (or set {TOKEN_FILE_ENV})",
    )
    actions = cache.add_subparsers(dest="action", metavar="ACTION", required=True)
    stats = actions.add_parser("stats", help="size, budget, hit ratio, top repositories")
    stats.add_argument("--top", type=int, default=10, metavar="N", help="repositories to show")
    ls = actions.add_parser("ls", help="cached tags of a repository, with digest and age")
    ls.add_argument("repository", metavar="REPO", help="e.g. nginx or ghcr.io/org/app")
    invalidate = actions.add_parser(
        "invalidate", help="make a tag (or every tag of a repository) revalidate on next pull"
    )
    invalidate.add_argument("target", metavar="REPO[:TAG]")
    evict = actions.add_parser("evict", help="remove one blob or manifest from the cache")
    evict.add_argument("digest", metavar="DIGEST")
    actions.add_parser("verify", help="re-hash every cached file; corrupt ones are evicted")
    pins = actions.add_parser("pins", help="list pinned images, or replace them")
    pins.add_argument("change", nargs="?", choices=["set", "clear"], help="set REF... or clear")
    pins.add_argument("references", nargs="*", metavar="REF")


def main(args: argparse.Namespace) -> int:
    console = Console(highlight=False)
    try:
        token = Path(args.token_file).read_text().strip() if args.token_file else None
    except OSError as exc:
        print(f"{PROG}: cannot read {args.token_file!r}: {exc.strerror}", file=sys.stderr)
        return 2
    if args.action == "pins" and (args.change == "set") != bool(args.references):
        print(
            f"{PROG}: use 'pins set REF...' to pin images, 'pins clear' to unpin", file=sys.stderr
        )
        return 2
    try:
        asyncio.run(_run(args, URL(args.admin.rstrip("/")), token, console))
    except AdminUnavailable as exc:
        print(f"{PROG} {args.action}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _run(args: argparse.Namespace, base: URL, token: str | None, console: Console) -> None:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        admin = AdminClient(session, base, token)
        if args.action == "stats":
            show_stats(console, await admin.call("GET", "/stats", params={"top": str(args.top)}))
        elif args.action == "ls":
            answer = await admin.call("GET", "/tags", params={"repository": args.repository})
            show_tags(console, answer)
        elif args.action == "invalidate":
            repository, tag = split_target(args.target)
            body = {"repository": repository, "tag": tag}
            answer = await admin.call("POST", "/invalidate", json=body)
            what = f"tag {tag} of" if tag else "every tag of"
            console.print(
                f"invalidated {what} {answer['upstream']}/{answer['repository']} "
                f"({answer['invalidated']} cached); the next pull revalidates"
            )
        elif args.action == "evict":
            answer = await admin.call("POST", "/evict", json={"digest": args.digest})
            console.print(f"evicted {answer['digest']}")
        elif args.action == "verify":
            answer = await admin.call("POST", "/verify")
            show_verify(console, answer)
        elif args.change is None:
            show_pins(console, await admin.call("GET", "/pins"))
        else:
            references = args.references if args.change == "set" else []
            show_pins(console, await admin.call("PUT", "/pins", json={"references": references}))


def split_target(text: str) -> tuple[str, str | None]:
    """`ghcr.io/org/app:1.2` -> (`ghcr.io/org/app`, `1.2`); a registry port is no tag."""
    name, sep, tag = text.rpartition(":")
    if sep and "/" not in tag:
        return name, tag
    return text, None


def show_stats(console: Console, stats: dict[str, Any]) -> None:
    table = Table(title="cache", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    budget = stats["budget"]
    table.add_row("size", f"{binary_size(stats['size'])} ({stats['size'] / budget:.1%} of budget)")
    table.add_row("budget", binary_size(budget))
    table.add_row("in flight", binary_size(stats["reserved"]))
    table.add_row("entries", str(stats["entries"]))
    pinned = stats["pinned"]
    table.add_row("pinned", f"{pinned['images']} images, {binary_size(pinned['bytes'])}")
    ratio = stats["hit_ratio"]
    table.add_row("hit ratio", "-" if ratio is None else f"{ratio:.1%}")
    lookups = stats["lookups"]
    table.add_row("lookups", ", ".join(f"{name} {count}" for name, count in lookups.items()))
    console.print(table)
    top = Table(title="top repositories by bytes served", title_justify="left")
    top.add_column("repository", overflow="fold")
    top.add_column("served", justify="right")
    top.add_column("requests", justify="right")
    for row in stats["top_repositories"]:
        top.add_row(row["repository"], binary_size(row["bytes"]), str(row["requests"]))
    console.print(top)
    show_quota(console, stats.get("quota", {}))


def show_quota(console: Console, quota: dict[str, dict[str, Any]]) -> None:
    """Upstream rate limits, for the upstreams that sent their headers."""
    said = {name: q for name, q in quota.items() if q["limit"] is not None or q["saving"]}
    if not said:
        return
    table = Table(title="upstream quota", title_justify="left")
    for column in ("upstream", "remaining", "limit", "window", "counted as", "revalidating"):
        table.add_column(
            column, justify="left" if column in ("upstream", "counted as") else "right"
        )
    for name, q in said.items():
        window = q["window_seconds"]
        table.add_row(
            name,
            "-" if q["remaining"] is None else str(q["remaining"]),
            "-" if q["limit"] is None else str(q["limit"]),
            "-" if window is None else _age(window),
            q["source"] or "-",
            f"no, for {_age(q['saving_for_seconds'])}" if q["saving"] else "yes",
        )
    console.print(table)


def show_tags(console: Console, answer: dict[str, Any]) -> None:
    table = Table(title=f"{answer['upstream']}/{answer['repository']}", title_justify="left")
    table.add_column("tag")
    table.add_column("digest")
    table.add_column("media type")
    table.add_column("age", justify="right")
    table.add_column("state")
    for row in answer["tags"]:
        age = row["age_seconds"]
        state = "fresh" if row["fresh"] else "stale" if age is not None else "invalidated"
        table.add_row(
            row["tag"],
            short_digest(row["digest"]),
            row["media_type"].rsplit("/", 1)[-1],
            "-" if age is None else _age(age),
            state + ("" if row["cached"] else ", manifest not cached"),
        )
    console.print(table)
    if not answer["tags"]:
        console.print("no cached tags")


def show_verify(console: Console, answer: dict[str, Any]) -> None:
    corrupt = answer["corrupt"]
    console.print(
        f"verified {answer['checked']} files in {answer['seconds']:.2f}s: "
        f"{len(corrupt)} corrupt" + (" (evicted)" if corrupt else "")
    )
    for digest in corrupt:
        console.print(f"  corrupt and evicted: {digest}")


def show_pins(console: Console, answer: dict[str, Any]) -> None:
    table = Table(
        title=f"pins: {binary_size(answer['pinned_bytes'])} of a "
        f"{binary_size(answer['budget'])} budget",
        title_justify="left",
    )
    table.add_column("image", overflow="fold")
    table.add_column("digest")
    table.add_column("blobs", justify="right")
    table.add_column("pinned", justify="right")
    table.add_column("cached", justify="right")
    table.add_column("resolved")
    for pin in answer["pins"]:
        resolved = pin["resolved"]
        when = (
            "never"
            if resolved is None
            else datetime.datetime.fromtimestamp(resolved).strftime("%Y-%m-%d %H:%M")
        )
        if pin["error"]:
            when += f" ({pin['error']})"
        table.add_row(
            pin["reference"],
            short_digest(pin["digest"]) if pin["digest"] else "-",
            str(pin["blobs"]),
            binary_size(pin["bytes"]),
            binary_size(pin["cached_bytes"]),
            when,
        )
    console.print(table)


def short_digest(digest: str) -> str:
    """`sha256:` and the first 12 hex digits, as `docker images` shortens IDs."""
    algorithm, _, encoded = digest.partition(":")
    return f"{algorithm}:{encoded[:12]}"


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
