"""`registry-proxy warm`: references, platforms, progress on and off a terminal, idempotency,
failures in the summary and the exit status, reference lists from kubectl."""

from __future__ import annotations

import asyncio
import fcntl
import io
import os
import pty
import struct
import sys
import termios
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from fakeupstream import FakeRegistry, FakeUpstreamServer, Image
from harness.mirror import StartMirror, proxy_command
from rich.console import Console
from yarl import URL

from proxy.cli.warm import binary_size, print_summary, read_references, warm_images
from proxy.cli.warmer import ImageReport, Platform
from proxy.config import UpstreamSettings
from proxy.oci import Digest
from proxy.oci.references import ImageReference, InvalidReference
from proxy.server import keys as state

Mirror = TestClient[web.Request, web.Application]
AMD64 = frozenset({Platform("linux", "amd64")})
CLI_TIMEOUT = 60


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "mirror_name"),
    [
        ("nginx", "docker.io", "library/nginx", "latest", "library/nginx"),
        ("nginx:1.27", "docker.io", "library/nginx", "1.27", "library/nginx"),
        ("docker.io/bitnami/redis:7", "docker.io", "bitnami/redis", "7", "bitnami/redis"),
        ("index.docker.io/library/nginx", "docker.io", "library/nginx", "latest", "library/nginx"),
        ("ghcr.io/org/app:1.2", "ghcr.io", "org/app", "1.2", "ghcr.io/org/app"),
        (
            "localhost:5000/team/app",
            "localhost:5000",
            "team/app",
            "latest",
            "localhost:5000/team/app",
        ),
        ("127.0.0.1:5000/app:v1", "127.0.0.1:5000", "app", "v1", "127.0.0.1:5000/app"),
    ],
)
def test_references_are_read_as_docker_reads_them(
    text: str, registry: str, repository: str, tag: str, mirror_name: str
) -> None:
    reference = ImageReference.parse(text)
    assert (reference.registry, reference.repository.name) == (registry, repository)
    assert reference.tag is not None
    assert reference.tag.name == tag
    assert reference.mirror_name == mirror_name


def test_a_digest_reference_is_fetched_by_its_digest_even_with_a_tag() -> None:
    digest = "sha256:" + "a" * 64
    reference = ImageReference.parse(f"registry.k8s.io/pause:3.10@{digest}")
    assert reference.manifest_reference == Digest.parse(digest)
    assert str(reference) == f"registry.k8s.io/pause:3.10@{digest}"


@pytest.mark.parametrize("text", ["", "team/UPPER:1", "app:bad tag", "app@sha256:short", "a//b"])
def test_bad_references_are_refused_with_the_text_in_the_message(text: str) -> None:
    with pytest.raises(InvalidReference, match="'"):
        ImageReference.parse(text)


def test_a_kubectl_image_list_is_read_once_per_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What `kubectl get pods -A -o jsonpath='{range .items[*]}{range .spec.containers[*]}
    # {.image}{"\n"}{end}{end}'` prints: one image per container, repeats, blank lines.
    listing = tmp_path / "images.txt"
    listing.write_text("nginx:1.27\n\nghcr.io/org/app:1.2\nnginx:1.27\n  # a comment\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("redis:7\nnginx:1.27\n"))
    found = read_references(["busybox"], [str(listing), "-"])
    assert found == ["busybox", "nginx:1.27", "ghcr.io/org/app:1.2", "redis:7"]


# --- against the mirror in front of the fake upstream


@pytest.fixture
async def mirror_client(mirror: StartMirror, fake_upstream: FakeUpstreamServer) -> Mirror:
    # The upstream is named by its host, so `<host>/team/app:1` routes by path prefix, and,
    # being the default, `app:1` (docker.io/library/app) routes to it too.
    upstream = UpstreamSettings(fake_upstream.host, URL(fake_upstream.url))
    return await mirror(upstreams=(upstream,))


def mirror_url(client: Mirror) -> URL:
    return URL(str(client.make_url("/"))).with_path("")


def add_multi_platform_app(registry: FakeRegistry, tag: str = "1") -> dict[str, Image]:
    images = {
        "linux/amd64": registry.add_image(
            "team/app", None, [b"amd64 layer one" * 3000, b"amd64 layer two" * 2000]
        ),
        "linux/arm64": registry.add_image(
            "team/app", None, [b"arm64 layer" * 3000], platform="linux/arm64"
        ),
    }
    registry.add_index("team/app", tag, images)
    return images


def blob_digests(image: Image) -> list[str]:
    return [image.config_digest, *image.layer_digests]


async def warm(
    client: Mirror, *references: str, console: Console | None = None
) -> list[ImageReport]:
    return await warm_images(
        list(references),
        mirror=mirror_url(client),
        platforms=AMD64,
        concurrency=3,
        console=console or Console(file=io.StringIO()),
    )


async def test_warm_fetches_the_chosen_platform_and_its_blobs_into_the_cache(
    mirror_client: Mirror, fake_upstream: FakeUpstreamServer
) -> None:
    images = add_multi_platform_app(fake_upstream.registry)
    amd64, arm64 = images["linux/amd64"], images["linux/arm64"]

    [report] = await warm(mirror_client, f"{fake_upstream.host}/team/app:1")

    assert report.ok, report.failure
    assert report.platforms == ["linux/amd64"]
    assert report.blobs == 3
    sizes = [
        len(amd64.config_bytes),
        len(b"amd64 layer one") * 3000,
        len(b"amd64 layer two") * 2000,
    ]
    assert (report.fetched_bytes, report.cached_bytes) == (sum(sizes), 0)
    store = mirror_client.app[state.STORE]
    assert all(Digest.parse(d) in store for d in blob_digests(amd64))
    assert not any(Digest.parse(d) in store for d in blob_digests(arm64))
    assert fake_upstream.registry.count("GET", arm64.layer_digests[0]) == 0


async def test_warming_again_fetches_nothing_new_every_blob_is_a_hit(
    mirror_client: Mirror, fake_upstream: FakeUpstreamServer
) -> None:
    add_multi_platform_app(fake_upstream.registry)
    fake_upstream.registry.add_image("library/tool", "2.0", [b"tool" * 5000])
    references = [f"{fake_upstream.host}/team/app:1", "tool:2.0"]  # docker-style: the default
    first = await warm(mirror_client, *references)
    upstream_blob_gets = fake_upstream.registry.count("GET", "/blobs/")

    second = await warm(mirror_client, *references)

    assert all(report.ok for report in first + second)
    assert all(report.fetched_bytes > 0 for report in first)
    assert [r.fetched_bytes for r in second] == [0, 0]
    assert [r.cached_bytes for r in second] == [r.fetched_bytes for r in first]
    assert fake_upstream.registry.count("GET", "/blobs/") == upstream_blob_gets


async def test_a_failing_image_is_reported_with_its_reason_and_the_others_still_warm(
    mirror_client: Mirror, fake_upstream: FakeUpstreamServer
) -> None:
    images = add_multi_platform_app(fake_upstream.registry)
    arm_only = fake_upstream.registry.add_image(
        "team/arm", None, [b"x" * 100], platform="linux/arm64"
    )
    fake_upstream.registry.add_index("team/arm", "1", {"linux/arm64": arm_only})
    host = fake_upstream.host
    output = io.StringIO()
    console = Console(file=output, width=200)

    reports = await warm(
        mirror_client, f"{host}/team/app:1", f"{host}/team/missing:1", f"{host}/team/arm:1"
    )
    print_summary(console, reports)

    ok, missing, arm = reports
    assert ok.ok
    assert ok.blobs == len(blob_digests(images["linux/amd64"]))
    assert missing.failure is not None
    assert "MANIFEST_UNKNOWN" in missing.failure
    assert arm.failure == "no manifest for linux/amd64 (the index has linux/arm64)"
    text = output.getvalue()
    assert "3 images (2 failed)" in text
    assert f"failed: {host}/team/missing:1: manifest 1: HTTP 404 MANIFEST_UNKNOWN" in text


# --- the command line, as a subprocess (the in-process mirror keeps serving meanwhile)


def cli_env() -> dict[str, str]:
    drop = ("REGISTRY_PROXY_", "FORCE_COLOR", "NO_COLOR", "TTY_", "COLUMNS", "LINES")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, "TERM": "xterm-256color"}


async def run_cli(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *proxy_command(*args),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=cli_env(),
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(stdin), CLI_TIMEOUT)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def _read_terminal(master: int) -> bytes:
    output = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child exited and the terminal closed
            return bytes(output)
        if not chunk:
            return bytes(output)
        output += chunk


async def run_cli_on_terminal(*args: str) -> tuple[int, str]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    try:
        process = await asyncio.create_subprocess_exec(
            *proxy_command(*args),
            stdin=asyncio.subprocess.DEVNULL, stdout=slave, stderr=slave, env=cli_env(),
        )  # fmt: skip
    finally:
        os.close(slave)
    try:
        output = await asyncio.wait_for(asyncio.to_thread(_read_terminal, master), CLI_TIMEOUT)
        returncode = await asyncio.wait_for(process.wait(), CLI_TIMEOUT)
    finally:
        os.close(master)
    return returncode, output.decode(errors="replace")


async def test_on_a_terminal_warm_draws_progress_bars_and_a_summary_table(
    mirror_client: Mirror, fake_upstream: FakeUpstreamServer
) -> None:
    add_multi_platform_app(fake_upstream.registry)
    reference = f"{fake_upstream.host}/team/app:1"

    returncode, output = await run_cli_on_terminal(
        "warm", reference, "--mirror", str(mirror_url(mirror_client)), "--platform", "linux/amd64"
    )

    assert returncode == 0, output
    assert "\x1b[" in output  # the terminal gets escape sequences: a live display
    assert "━" in output  # rich's bar
    assert "total" in output
    assert f"warmed {reference}: 3 blobs" in output
    assert "warm summary" in output
    assert "1 images (0 failed)" in output


async def test_without_a_terminal_warm_prints_plain_lines_and_fails_on_a_bad_image(
    mirror_client: Mirror, fake_upstream: FakeUpstreamServer
) -> None:
    amd64 = add_multi_platform_app(fake_upstream.registry)["linux/amd64"]
    size = binary_size(len(amd64.config_bytes) + 45000 + 30000)
    host = fake_upstream.host
    kubectl_output = f"{host}/team/app:1\n\n{host}/team/app:1\n{host}/team/gone:3\n".encode()

    returncode, stdout, stderr = await run_cli(
        "warm",
        "--file",
        "-",
        "--platform",
        "linux/amd64",
        "--mirror",
        str(mirror_url(mirror_client)),
        stdin=kubectl_output,
    )

    assert returncode == 1, stderr
    assert "\x1b" not in stdout  # no escape sequences in a log
    lines = stdout.splitlines()
    assert f"warming {host}/team/app:1: 3 blobs, {size}" in lines
    assert f"warmed {host}/team/app:1: 3 blobs, {size} fetched, 0 B already cached" in lines
    assert f"FAILED {host}/team/gone:3: manifest 3: HTTP 404 MANIFEST_UNKNOWN: " in stdout
    assert "2 images (1 failed)" in stdout


async def test_an_unreachable_mirror_fails_every_image_with_that_reason() -> None:
    returncode, stdout, _ = await run_cli("warm", "nginx", "--mirror", "http://127.0.0.1:9")
    assert returncode == 1
    assert "cannot connect to the mirror at http://127.0.0.1:9" in stdout
