"""Real programs for integration tests: Distribution, the mirror itself, and skopeo.

- :class:`Distribution` runs the CNCF reference registry (`docker-registry serve`) with filesystem
  storage in a directory the test owns; it is the upstream the mirror pulls from.
- :func:`build_image` / :func:`build_index` make real images in memory: gzip-compressed tar layers
  of random files, a config whose ``rootfs.diff_ids`` are the digests of the uncompressed tars, and
  an OCI or Docker schema 2 manifest (or an OCI index / Docker manifest list over two platforms).
- :func:`push_blob`, :func:`push_manifest`, :func:`push_image`, :func:`push_index` upload them over
  the distribution HTTP API (OCI distribution spec, "Pushing blobs" and "Pushing Manifests").
- :class:`Mirror` runs ``python -m proxy serve`` as a subprocess, logging to a file.
- :func:`skopeo_copy` pulls with a real client into a ``dir:`` layout, and :func:`verify_dir` checks
  that every file there hashes to the digest it is named after.

Every process is started here, in a directory the caller gives, and stopped by its own handle:
nothing touches a daemon it did not start.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Self

import aiohttp
from yarl import URL

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

Format = Literal["oci", "docker"]

# Layer sizes (uncompressed random bytes per layer). Random data does not compress, so the blob
# sizes on the wire are about the same.
SMALL_LAYERS: tuple[int, ...] = (64 * 1024, 128 * 1024, 192 * 1024)
LARGE_LAYERS: tuple[int, ...] = (256 * 1024, 3 * 1024 * 1024, 1024 * 1024)

START_DEADLINE_SECONDS = 20.0
# How long one wait for the process to exit lasts between two readiness probes.
POLL_INTERVAL_SECONDS = 0.05
STOP_GRACE_SECONDS = 10.0
SKOPEO_TIMEOUT_SECONDS = 90.0


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ProcessStartError(RuntimeError):
    """A helper process exited, or did not answer ``GET /v2/``, before the start-up deadline."""


def _probe_v2(port: int) -> int | None:
    """The status of ``GET /v2/`` on 127.0.0.1:port, or None when nothing answers yet."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2.0)
    try:
        conn.request("GET", "/v2/")
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


def _wait_until_ready(
    proc: subprocess.Popen[bytes],
    port: int,
    ready: Sequence[int],
    describe: str,
    output: Path,
) -> None:
    """Poll ``GET /v2/`` until it answers one of ``ready``, the process dies or the deadline passes.

    An external process gives no event to wait on, so this polls; the interval is spent in
    ``proc.wait`` so a process that dies is noticed at once.
    """
    deadline = time.monotonic() + START_DEADLINE_SECONDS
    while True:
        status = _probe_v2(port)
        if status is not None and status in ready:
            return
        try:
            code = proc.wait(timeout=POLL_INTERVAL_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        else:
            raise ProcessStartError(
                f"{describe} exited with status {code} during start-up:\n{_tail(output)}"
            )
        if time.monotonic() > deadline:
            _stop_process(proc)
            raise ProcessStartError(
                f"{describe} did not answer GET /v2/ with {list(ready)} within "
                f"{START_DEADLINE_SECONDS:.0f} s (last status: {status}):\n{_tail(output)}"
            )


def _stop_process(proc: subprocess.Popen[bytes], *, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Only ever called on our own children."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


def _tail(path: Path, limit: int = 8000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no output: {exc})"
    return text[-limit:]


# --------------------------------------------------------------------------------------------
# Distribution
# --------------------------------------------------------------------------------------------


class Service:
    """A server process the tests start and own: its output in a log file, ready once it
    answers on its port, stopped (SIGTERM, then SIGKILL) by its own handle only."""

    name = "service"

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def _spawn(
        self,
        command: list[str],
        *,
        cwd: Path | None = None,
        append: bool = False,
        ready: Sequence[int] = (200,),
    ) -> None:
        """Start `command` and wait until `GET /v2/` on its port answers one of `ready`."""
        self._output = self.log_path.open("ab" if append else "wb")
        self._proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            cwd=cwd,
        )
        try:
            _wait_until_ready(self._proc, self.port, ready, self.name, self.log_path)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM, wait, then SIGKILL."""
        if self._proc is not None:
            _stop_process(self._proc)
        self._close_output()

    def kill(self) -> None:
        """SIGKILL at once (a crash), then reap."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=STOP_GRACE_SECONDS)
        self._close_output()

    def signal(self, signum: int) -> None:
        """Send a signal, as an operator or a crash would."""
        if self._proc is not None:
            self._proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self._proc is not None
        return self._proc.wait(timeout)

    def _close_output(self) -> None:
        if self._output is not None:
            self._output.close()
            self._output = None

    def log_text(self) -> str:
        return _tail(self.log_path, limit=1_000_000)

    def __enter__(self) -> Self:
        self.start()
        return self

    def start(self) -> Self:
        raise NotImplementedError

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Distribution(Service):
    """The reference registry (``docker-registry serve``) on 127.0.0.1, storage under ``workdir``.

    ``proxy_remote_url`` turns it into a pull-through cache of that URL (for benchmarks against a
    peer). ``htpasswd`` (a file of bcrypt entries) makes every request need HTTP Basic
    credentials, as a private registry does. Use as a context manager or call :meth:`start` and
    :meth:`stop`.
    """

    name = "docker-registry"

    def __init__(
        self,
        workdir: Path,
        *,
        proxy_remote_url: str | None = None,
        htpasswd: Path | None = None,
    ) -> None:
        super().__init__(workdir / "registry.log")
        self.workdir = workdir
        self.proxy_remote_url = proxy_remote_url
        self.htpasswd = htpasswd
        self.config_path = workdir / "config.yml"
        self.storage_dir = workdir / "storage"
        self.output_path = self.log_path

    @property
    def url(self) -> str:
        if self._proc is None:
            raise RuntimeError("Distribution is not running")
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the registry part of an image reference."""
        return f"127.0.0.1:{self.port}"

    def _config(self) -> dict[str, object]:
        # JSON is YAML, so the config needs no YAML library.
        config: dict[str, object] = {
            "version": "0.1",
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
            },
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": "integration-test-secret"},
        }
        if self.proxy_remote_url is not None:
            config["proxy"] = {"remoteurl": self.proxy_remote_url}
        if self.htpasswd is not None:
            config["auth"] = {"htpasswd": {"realm": "private", "path": str(self.htpasswd)}}
        return config

    def start(self) -> Self:
        if self._proc is not None:
            raise RuntimeError("Distribution already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(exist_ok=True)
        self.port = free_port()
        self.config_path.write_text(json.dumps(self._config(), indent=2))
        ready = (401,) if self.htpasswd is not None else (200,)
        self._spawn(["docker-registry", "serve", str(self.config_path)], ready=ready)
        return self


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes
    digest: str

    @classmethod
    def of(cls, media_type: str, data: bytes) -> Blob:
        return cls(media_type, data, sha256_digest(data))

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "size": len(self.data), "digest": self.digest}


@dataclass(frozen=True)
class Image:
    """One image manifest with its config and layers, exactly as it will be pushed."""

    media_type: str
    manifest: bytes
    digest: str
    config: Blob
    layers: tuple[Blob, ...]
    architecture: str
    os: str = "linux"

    @property
    def blobs(self) -> tuple[Blob, ...]:
        return (self.config, *self.layers)

    @property
    def blob_digests(self) -> frozenset[str]:
        return frozenset(blob.digest for blob in self.blobs)


@dataclass(frozen=True)
class ImageIndex:
    """An OCI index or Docker manifest list over several :class:`Image` s."""

    media_type: str
    manifest: bytes
    digest: str
    images: tuple[Image, ...]

    def image_for(self, architecture: str) -> Image:
        for image in self.images:
            if image.architecture == architecture:
                return image
        raise KeyError(architecture)

    @property
    def blob_digests(self) -> frozenset[str]:
        return frozenset(d for image in self.images for d in image.blob_digests)


def make_layer(size: int, *, files: int = 3) -> tuple[bytes, bytes]:
    """A gzip-compressed tar of ``files`` random files totalling about ``size`` bytes.

    Returns ``(compressed, uncompressed)``. The content is random so no two layers are equal.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directory = tarfile.TarInfo(f"data-{os.urandom(4).hex()}")
        directory.type = tarfile.DIRTYPE
        directory.mode = 0o755
        tar.addfile(directory)
        remaining = size
        for index in range(files):
            chunk = remaining if index == files - 1 else size // files
            remaining -= chunk
            content = os.urandom(chunk)
            info = tarfile.TarInfo(f"{directory.name}/file-{index}.bin")
            info.size = len(content)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    uncompressed = buffer.getvalue()
    return gzip.compress(uncompressed, compresslevel=1, mtime=0), uncompressed


def _canonical(document: dict[str, object]) -> bytes:
    return json.dumps(document, indent=3).encode()


def build_image(
    fmt: Format = "oci",
    *,
    layer_sizes: Sequence[int] = SMALL_LAYERS,
    architecture: str = "amd64",
    os_name: str = "linux",
) -> Image:
    """A real image: gzip tar layers, a valid config and an OCI or Docker schema 2 manifest."""
    layer_type = OCI_LAYER_GZIP if fmt == "oci" else DOCKER_LAYER_GZIP
    layers: list[Blob] = []
    diff_ids: list[str] = []
    history: list[dict[str, object]] = []
    for number, size in enumerate(layer_sizes):
        compressed, uncompressed = make_layer(size)
        layers.append(Blob.of(layer_type, compressed))
        diff_ids.append(sha256_digest(uncompressed))
        history.append(
            {
                "created": "2024-01-01T00:00:00Z",
                "created_by": f"/bin/sh -c #(nop) ADD layer {number} of {size} bytes",
            }
        )
    config_document: dict[str, object] = {
        "architecture": architecture,
        "os": os_name,
        "created": "2024-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }
    config = Blob.of(OCI_CONFIG if fmt == "oci" else DOCKER_CONFIG, _canonical(config_document))
    media_type = OCI_MANIFEST if fmt == "oci" else DOCKER_MANIFEST
    manifest = _canonical(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": config.descriptor(),
            "layers": [layer.descriptor() for layer in layers],
        }
    )
    return Image(
        media_type=media_type,
        manifest=manifest,
        digest=sha256_digest(manifest),
        config=config,
        layers=tuple(layers),
        architecture=architecture,
        os=os_name,
    )


def build_index(
    fmt: Format = "oci",
    *,
    layer_sizes: Sequence[int] = SMALL_LAYERS,
    architectures: Sequence[str] = ("amd64", "arm64"),
) -> ImageIndex:
    """An OCI index (or Docker manifest list) over one linux image per architecture."""
    images = tuple(
        build_image(fmt, layer_sizes=layer_sizes, architecture=arch) for arch in architectures
    )
    media_type = OCI_INDEX if fmt == "oci" else DOCKER_LIST
    manifests: list[dict[str, object]] = []
    for image in images:
        platform: dict[str, str] = {"architecture": image.architecture, "os": image.os}
        if image.architecture == "arm64":
            platform["variant"] = "v8"
        manifests.append(
            {
                "mediaType": image.media_type,
                "size": len(image.manifest),
                "digest": image.digest,
                "platform": platform,
            }
        )
    body = _canonical({"schemaVersion": 2, "mediaType": media_type, "manifests": manifests})
    return ImageIndex(
        media_type=media_type, manifest=body, digest=sha256_digest(body), images=images
    )


# --------------------------------------------------------------------------------------------
# Pushing over the distribution API
# --------------------------------------------------------------------------------------------


class PushError(RuntimeError):
    pass


async def push_blob(session: aiohttp.ClientSession, base_url: str, repo: str, data: bytes) -> str:
    """Monolithic upload: ``POST /v2/<repo>/blobs/uploads/`` then ``PUT <location>&digest=``."""
    digest = sha256_digest(data)
    start = URL(base_url) / "v2" / repo / "blobs" / "uploads" / ""
    async with session.post(start) as response:
        if response.status != 202:
            raise PushError(f"POST {start}: {response.status} {await response.text()}")
        location = response.headers["Location"]
    # Location may be relative (spec) or absolute (Distribution); it keeps its own query.
    upload = URL(base_url).join(URL(location)).update_query({"digest": digest})
    headers = {"Content-Type": "application/octet-stream"}
    # A BytesIO body: aiohttp warns (an error under filterwarnings) about large raw bytes bodies.
    async with session.put(upload, data=io.BytesIO(data), headers=headers) as response:
        if response.status != 201:
            raise PushError(f"PUT {upload}: {response.status} {await response.text()}")
        answered = response.headers.get("Docker-Content-Digest", digest)
    if answered != digest:
        raise PushError(f"registry stored blob as {answered}, expected {digest}")
    return digest


async def push_manifest(
    session: aiohttp.ClientSession,
    base_url: str,
    repo: str,
    ref: str,
    body: bytes,
    media_type: str,
) -> str:
    """``PUT /v2/<repo>/manifests/<ref>``; returns the digest the registry reports."""
    url = URL(base_url) / "v2" / repo / "manifests" / ref
    async with session.put(url, data=body, headers={"Content-Type": media_type}) as response:
        if response.status != 201:
            raise PushError(f"PUT {url}: {response.status} {await response.text()}")
        digest = response.headers.get("Docker-Content-Digest", sha256_digest(body))
    if digest != sha256_digest(body):
        raise PushError(f"registry digest {digest} differs from {sha256_digest(body)}")
    return digest


async def push_image(
    session: aiohttp.ClientSession,
    base_url: str,
    repo: str,
    image: Image,
    *tags: str,
) -> str:
    """Push blobs, then the manifest by digest and under each tag."""
    for blob in image.blobs:
        await push_blob(session, base_url, repo, blob.data)
    for ref in (image.digest, *tags):
        await push_manifest(session, base_url, repo, ref, image.manifest, image.media_type)
    return image.digest


async def push_index(
    session: aiohttp.ClientSession,
    base_url: str,
    repo: str,
    index: ImageIndex,
    *tags: str,
) -> str:
    """Push every child image by digest, then the index by digest and under each tag."""
    for image in index.images:
        await push_image(session, base_url, repo, image)
    for ref in (index.digest, *tags):
        await push_manifest(session, base_url, repo, ref, index.manifest, index.media_type)
    return index.digest


# --------------------------------------------------------------------------------------------
# The mirror under test
# --------------------------------------------------------------------------------------------


class Mirror(Service):
    """``python -m proxy serve`` on 127.0.0.1, its cache and log under ``workdir``."""

    name = "mirror"

    def __init__(self, workdir: Path, upstream: str, *extra_args: str) -> None:
        super().__init__(workdir / "mirror.log")
        self.workdir = workdir
        self.upstream = upstream
        self.extra_args = extra_args
        self.cache_dir = workdir / "cache"

    @property
    def url(self) -> str:
        if self._proc is None:
            raise RuntimeError("Mirror is not running")
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--upstream",
            self.upstream,
            "--cache-dir",
            str(self.cache_dir),
            "--cache-max-size",
            "1GiB",
            "--log-level",
            "debug",
            *self.extra_args,
        ]

    def start(self) -> Self:
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError("Mirror already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(exist_ok=True)
        if self.port == 0:
            self.port = free_port()
        # Append, so a restart on the same cache keeps the earlier log.
        self._spawn(self.command(), cwd=Path(__file__).resolve().parents[2], append=True)
        return self


# --------------------------------------------------------------------------------------------
# skopeo
# --------------------------------------------------------------------------------------------


class SkopeoError(RuntimeError):
    def __init__(self, args: Sequence[str], returncode: int | None, stderr: str) -> None:
        super().__init__(f"{' '.join(args)} failed ({returncode}):\n{stderr}")
        self.returncode = returncode
        self.stderr = stderr


def _dead_port() -> int:
    """A loopback port nobody listens on: connecting is refused at once."""
    return free_port()


def client_env() -> dict[str, str]:
    """Environment for real clients: any attempt to leave the machine fails at once."""
    dead = f"http://127.0.0.1:{_dead_port()}"
    env = dict(os.environ)
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        env[name] = dead
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def skopeo_copy(
    src: str,
    dest_dir: Path,
    *extra: str,
    timeout: float = SKOPEO_TIMEOUT_SECONDS,
) -> None:
    """``skopeo copy --src-tls-verify=false docker://SRC dir:DEST [extra...]``.

    ``src`` is ``HOST:PORT/repo:tag`` or ``HOST:PORT/repo@digest``. ``extra`` are copy options
    (skopeo also accepts its global options, such as ``--override-arch``, after ``copy``).
    """
    args = [
        "skopeo",
        "--insecure-policy",
        "--command-timeout",
        f"{int(timeout)}s",
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--src-no-creds",
        *extra,
        f"docker://{src}",
        f"dir:{dest_dir}",
    ]
    try:
        result = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=client_env(),
            timeout=timeout + 5,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if exc.stderr else ""
        raise SkopeoError(args, None, f"timed out after {timeout} s\n{stderr}") from exc
    if result.returncode != 0:
        raise SkopeoError(args, result.returncode, result.stderr.decode(errors="replace"))


# Files skopeo's dir: transport writes that are not named by a digest.
DIR_MANIFEST = "manifest.json"
DIR_VERSION = "version"


class VerificationError(AssertionError):
    pass


def verify_dir(dest_dir: Path) -> dict[str, str]:
    """Check a skopeo ``dir:`` output and return ``{file name: sha256 digest of its content}``.

    skopeo 1.9 writes ``version``, ``manifest.json`` (the manifest bytes as pulled), each blob as a
    file named by the hex part of its sha256 digest, and with ``--all`` each instance manifest as
    ``<hex>.manifest.json``. Every digest-named file must hash to its name.
    """
    found: dict[str, str] = {}
    if not (dest_dir / DIR_MANIFEST).is_file():
        raise VerificationError(f"{dest_dir} has no {DIR_MANIFEST}")
    for path in sorted(dest_dir.iterdir()):
        if path.name == DIR_VERSION:
            continue
        if not path.is_file():
            raise VerificationError(f"unexpected entry {path}")
        digest = sha256_digest(path.read_bytes())
        if path.name != DIR_MANIFEST:
            named = path.name.removesuffix(".manifest.json")
            if len(named) != 64 or any(c not in "0123456789abcdef" for c in named):
                raise VerificationError(f"{path.name} is not named by a sha256 digest")
            if digest != f"sha256:{named}":
                raise VerificationError(f"{path.name} hashes to {digest}")
        found[path.name] = digest
    return found


def blob_digests(found: dict[str, str]) -> frozenset[str]:
    """The digests of the blobs (not manifests) in a :func:`verify_dir` result."""
    return frozenset(
        digest
        for name, digest in found.items()
        if name != DIR_MANIFEST and not name.endswith(".manifest.json")
    )
