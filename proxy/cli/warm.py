"""`registry-proxy warm`: pull images through a running mirror so that its cache holds them.

Everything goes through the mirror's own pull API, exactly as a node's pull would, so the same
command fills a mirror on this host or one across the LAN. For each image:

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
import hashlib
import json
import os
import platform
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

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

from proxy.errors import ErrorCode, RegistryError
from proxy.oci import Descriptor, Digest, MediaType
from proxy.oci.media import (
    image_blobs,
    index_children,
    is_image_manifest,
    is_index,
    manifest_document,
)
from proxy.oci.references import ImageReference, InvalidReference

DEFAULT_MIRROR: Final = "http://127.0.0.1:5000"
MIRROR_ENV: Final = "REGISTRY_PROXY_MIRROR"
DEFAULT_CONCURRENCY: Final = 4
MANIFEST_LIMIT: Final = 4 * 1024 * 1024
CHUNK: Final = 256 * 1024
ACCEPT: Final = ", ".join(sorted(MediaType.MANIFESTS))
# platform.machine() -> the GOARCH[/variant] names image indexes use.
_ARCHITECTURES: Final = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm/v7",
    "armv6l": "arm/v6",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


class WarmFailure(Exception):
    """Why an image could not be warmed, as the summary shows it."""


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"{text!r} is not a platform (examples: linux/amd64, linux/arm/v7)")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls) -> Platform:
        machine = platform.machine().lower()
        return cls.parse(f"linux/{_ARCHITECTURES.get(machine, machine)}")

    def matches(self, described: Any) -> bool:
        """Whether an index entry's `platform` object is this platform (any variant when
        this one names none, as `docker pull` picks arm64/v8 for linux/arm64)."""
        if not isinstance(described, dict):
            return False
        if (described.get("os"), described.get("architecture")) != (self.os, self.architecture):
            return False
        return self.variant is None or described.get("variant") == self.variant

    def __str__(self) -> str:
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)


def _platform_of(described: Any) -> str:
    if not isinstance(described, dict):
        return "unknown"
    parts = (described.get("os"), described.get("architecture"), described.get("variant"))
    return "/".join(str(part) for part in parts if part)


@dataclass(slots=True)
class ImageReport:
    reference: str
    platforms: list[str] = field(default_factory=list)
    manifests: int = 0
    blobs: int = 0
    fetched_bytes: int = 0  # came from the upstream through the mirror during this run
    cached_bytes: int = 0  # the mirror already had them (X-Cache: HIT)
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


@dataclass(frozen=True, slots=True)
class BlobResult:
    size: int
    cached: bool


class ProgressView(Protocol):
    def image_started(self, image: str, blobs: int, total: int) -> None: ...

    def advance(self, image: str, count: int) -> None: ...

    def image_finished(self, report: ImageReport) -> None: ...


class Warmer:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        mirror: URL,
        *,
        platforms: frozenset[Platform] | None,
        concurrency: int,
        view: ProgressView,
    ) -> None:
        self.session = session
        self.mirror = mirror
        self.platforms = platforms  # None: every platform
        self.concurrency = concurrency
        self.view = view
        self._requests = asyncio.Semaphore(concurrency)
        # One fetch per blob digest, whichever images share it.
        self._blobs: dict[Digest, asyncio.Task[BlobResult]] = {}

    async def warm_all(self, references: Iterable[str]) -> list[ImageReport]:
        images = asyncio.Semaphore(self.concurrency)

        async def one(text: str) -> ImageReport:
            async with images:
                return await self.warm(text)

        return list(await asyncio.gather(*(one(text) for text in references)))

    async def warm(self, text: str) -> ImageReport:
        report = ImageReport(text)
        try:
            reference = ImageReference.parse(text)
            blobs = await self._manifest_tree(reference, report)
            report.blobs = len(blobs)
            self.view.image_started(text, len(blobs), sum(blobs.values()))
            results = await asyncio.gather(
                *(self._blob(reference, digest, size, text) for digest, size in blobs.items()),
                return_exceptions=True,
            )
            failures = [str(r) for r in results if isinstance(r, Exception)]
            for result in results:
                if isinstance(result, BlobResult):
                    if result.cached:
                        report.cached_bytes += result.size
                    else:
                        report.fetched_bytes += result.size
                elif isinstance(result, BaseException) and not isinstance(result, Exception):
                    raise result
            if failures:
                more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
                raise WarmFailure(failures[0] + more)
        except (WarmFailure, InvalidReference) as exc:
            report.failure = str(exc)
        self.view.image_finished(report)
        return report

    async def _manifest_tree(
        self, reference: ImageReference, report: ImageReport
    ) -> dict[Digest, int]:
        """Fetch the manifest (and platform manifests); returns every blob digest: its size."""
        body = await self._manifest(reference, str(reference.manifest_reference), reference.digest)
        report.manifests += 1
        blobs: dict[Digest, int] = {}
        if not is_index(body):
            report.platforms.append("single")
            _add_blobs(body, blobs)
            return blobs
        entries = _walked(index_children, body)
        chosen = [
            entry
            for entry in entries
            if self.platforms is None or any(p.matches(entry.platform) for p in self.platforms)
        ]
        if not chosen:
            offered = ", ".join(sorted({_platform_of(e.platform) for e in entries}))
            wanted = ", ".join(sorted(str(p) for p in self.platforms or ()))
            raise WarmFailure(f"no manifest for {wanted} (the index has {offered})")
        for entry in chosen:
            child = await self._manifest(reference, str(entry.digest), entry.digest)
            report.manifests += 1
            report.platforms.append(_platform_of(entry.platform))
            _add_blobs(child, blobs)
        return blobs

    async def _manifest(
        self, reference: ImageReference, ref: str, expected: Digest | None
    ) -> bytes:
        url = self._url(reference, "manifests", ref)
        async with self._requests:
            try:
                async with self.session.get(url, headers={"Accept": ACCEPT}) as response:
                    if response.status != 200:
                        raise WarmFailure(f"manifest {ref}: {await _http_error(response)}")
                    body = await response.content.read(MANIFEST_LIMIT + 1)
                    said = response.headers.get("Docker-Content-Digest")
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise WarmFailure(_connection_error(self.mirror, exc)) from None
        if len(body) > MANIFEST_LIMIT:
            raise WarmFailure(f"manifest {ref} is larger than {MANIFEST_LIMIT} bytes")
        actual = Digest.of(body)
        if expected is not None and actual != expected:
            raise WarmFailure(f"manifest {ref}: the mirror sent bytes whose digest is {actual}")
        if said is not None and said != str(actual):
            raise WarmFailure(
                f"manifest {ref}: Docker-Content-Digest {said}, bytes hash to {actual}"
            )
        return body

    async def _blob(
        self, reference: ImageReference, digest: Digest, size: int, image: str
    ) -> BlobResult:
        task = self._blobs.get(digest)
        if task is not None:  # another image fetches it: count it for this one when done
            result = await asyncio.shield(task)
            self.view.advance(image, size)
            return result
        task = asyncio.create_task(self._fetch_blob(reference, digest, size, image))
        self._blobs[digest] = task
        return await asyncio.shield(task)

    async def _fetch_blob(
        self, reference: ImageReference, digest: Digest, size: int, image: str
    ) -> BlobResult:
        hasher = hashlib.new(digest.algorithm)
        received = 0
        async with self._requests:
            try:
                async with self.session.get(self._url(reference, "blobs", str(digest))) as response:
                    if response.status != 200:
                        raise WarmFailure(f"blob {digest}: {await _http_error(response)}")
                    cached = response.headers.get("X-Cache", "").upper() == "HIT"
                    async for chunk in response.content.iter_chunked(CHUNK):
                        hasher.update(chunk)
                        received += len(chunk)
                        self.view.advance(image, len(chunk))
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise WarmFailure(f"blob {digest}: {_connection_error(self.mirror, exc)}") from None
        if received != size:
            raise WarmFailure(f"blob {digest}: {received} bytes, the manifest says {size}")
        if hasher.hexdigest() != digest.encoded:
            raise WarmFailure(f"blob {digest}: the bytes do not match the digest")
        return BlobResult(size, cached)

    def _url(self, reference: ImageReference, kind: str, ref: str) -> URL:
        return self.mirror.with_path(f"/v2/{reference.mirror_name}/{kind}/{ref}", encoded=True)


def _walked(walk: Callable[[dict[str, Any]], list[Descriptor]], body: bytes) -> list[Descriptor]:
    """The descriptors `walk` finds in a manifest; a malformed one fails the image."""
    try:
        return walk(manifest_document(body))
    except RegistryError as exc:
        raise WarmFailure(exc.message) from None


def _add_blobs(body: bytes, blobs: dict[Digest, int]) -> None:
    def blobs_of(document: dict[str, Any]) -> list[Descriptor]:
        if not is_image_manifest(document):
            raise RegistryError(
                ErrorCode.MANIFEST_INVALID, "not an image manifest (schema 2 or OCI)"
            )
        return image_blobs(document)

    blobs.update((blob.digest, blob.size) for blob in _walked(blobs_of, body))


async def _http_error(response: aiohttp.ClientResponse) -> str:
    """`HTTP 404 MANIFEST_UNKNOWN: manifest unknown`, from an OCI error body when there is one."""
    text = f"HTTP {response.status}"
    try:
        errors = json.loads(await response.content.read(64 * 1024)).get("errors")
        first = errors[0]
        return f"{text} {first['code']}: {first['message']}"
    except (ValueError, AttributeError, LookupError, TypeError):
        return f"{text} {response.reason or ''}".rstrip()


def _connection_error(mirror: URL, exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"the mirror at {mirror} timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to the mirror at {mirror}: {exc.os_error.strerror or exc}"
    return f"the connection to the mirror at {mirror} broke: {exc}"


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
