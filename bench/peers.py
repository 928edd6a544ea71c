"""The mirrors under test, each started with an empty cache in front of a given upstream URL.

- ``ours``: ``python -m proxy serve`` (the integration harness's :class:`Mirror`) at the
  defaults a user gets: log level info, so one JSON access-log line per request on stderr, written
  to a file as a container's log driver would, and the default number of workers; only the cache
  budget is raised to hold every image;
- ``ours-tuned``: the same with the access log off (``--log-level warning``), reported beside the
  defaults, never instead of them; ``ours-2w``: the defaults with ``--workers 2``;
- ``floor``: a bare aiohttp app answering one fixed manifest (:mod:`bench.floor`), measured on
  manifest hits only: the framework's own ceiling on this machine; ``floor-2w``: the same in two
  processes, measured when ``ours-2w`` is;
- ``distribution``: the CNCF registry in proxy mode (``proxy: remoteurl``);
- ``nginx``: a caching reverse proxy with ``proxy_cache``, ``proxy_cache_lock`` (one upstream
  request per key, others wait for it) and ranges served from the cache; the config is
  :data:`NGINX_CONFIG`.

Every process is ours, started in a directory we own and stopped by its own handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO

from harness.mirror import Mirror
from harness.ports import free_port
from harness.processes import Distribution, Service
from harness.processes import stop_process as _stop_process
from harness.processes import wait_until_ready as _wait_until_ready

PEERS = ("ours", "distribution", "nginx", "ours-tuned", "ours-2w")
# Our own variants are measured beside the peers, never counted as a peer to beat.
OURS = frozenset({"ours", "ours-tuned", "ours-2w"})


class Peer(ABC):
    name: str

    def __init__(self, workdir: Path, upstream: str) -> None:
        self.workdir = workdir
        self.upstream = upstream

    @property
    @abstractmethod
    def url(self) -> str: ...

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> None: ...

    @abstractmethod
    def main_pid(self) -> int: ...

    def pids(self) -> list[int]:
        """The main process and its children (nginx's workers and cache manager)."""
        return [self.main_pid(), *_children(self.main_pid())]


class _BenchMirror(Mirror):
    def __init__(
        self, workdir: Path, upstream: str, source: Path | None, log_level: str | None, *extra: str
    ) -> None:
        super().__init__(workdir, upstream, *extra)
        self.source = source
        self.log_level = log_level

    def command(self) -> list[str]:
        command = super().command()
        # The tests' debug logging goes; without a level of our own, the default (info) applies.
        at = command.index("--log-level")
        if self.log_level is None:
            del command[at : at + 2]
        else:
            command[at + 1] = self.log_level
        command[command.index("--cache-max-size") + 1] = "64GiB"
        if self.source is not None:
            # Run the snapshot taken at the start of the run, ahead of the editable install.
            bootstrap = (
                f"import runpy, sys; sys.path.insert(0, {str(self.source)!r}); "
                "runpy.run_module('proxy', run_name='__main__')"
            )
            command[1:3] = ["-c", bootstrap]
        return command


class Ours(Peer):
    name = "ours"

    def __init__(
        self,
        name: str,
        workdir: Path,
        upstream: str,
        source: Path | None = None,
        *,
        workers: int | None = None,
        log_level: str | None = None,
    ) -> None:
        super().__init__(workdir, upstream)
        self.name = name
        extra = () if workers is None else ("--workers", str(workers))
        self.mirror = _BenchMirror(workdir, upstream, source, log_level, *extra)

    @property
    def url(self) -> str:
        return self.mirror.url

    def start(self) -> None:
        self.mirror.start()

    def stop(self) -> None:
        self.mirror.stop()

    def main_pid(self) -> int:
        return self.mirror.pid


class DistributionProxy(Peer):
    name = "distribution"

    def __init__(self, workdir: Path, upstream: str) -> None:
        super().__init__(workdir, upstream)
        self.registry = Distribution(workdir, proxy_remote_url=upstream)

    @property
    def url(self) -> str:
        return self.registry.url

    def start(self) -> None:
        self.registry.start()

    def stop(self) -> None:
        self.registry.stop()

    def main_pid(self) -> int:
        proc: subprocess.Popen[bytes] | None = self.registry._proc
        assert proc is not None
        return proc.pid


# Tags are cached for 60 s (a common choice in nginx registry-mirror configs); digests forever.
# `proxy_cache_lock_timeout` is raised from 5 s so a slow first download is never duplicated.
NGINX_CONFIG = """\
{user}
worker_processes auto;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy_temp;
    fastcgi_temp_path {dir}/fastcgi_temp;
    uwsgi_temp_path {dir}/uwsgi_temp;
    scgi_temp_path {dir}/scgi_temp;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    proxy_cache_path {dir}/cache levels=1:2 keys_zone=registry:32m max_size=64g
                     inactive=30d use_temp_path=off;
    upstream registry {{
        server {upstream};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_read_timeout 900s;
        proxy_cache registry;
        proxy_cache_lock on;
        proxy_cache_lock_timeout 1h;
        proxy_cache_lock_age 1h;
        proxy_cache_use_stale error timeout updating;
        proxy_ignore_headers Cache-Control Expires Set-Cookie;
        location ~ "^/v2/.+/blobs/sha256:[0-9a-f]{{64}}$" {{
            proxy_cache_key $uri;
            proxy_cache_valid 200 206 365d;
            proxy_pass http://registry;
        }}
        location ~ "^/v2/.+/manifests/sha256:[0-9a-f]{{64}}$" {{
            proxy_cache_key $uri$http_accept;
            proxy_cache_valid 200 365d;
            proxy_pass http://registry;
        }}
        location ~ ^/v2/.+/manifests/ {{
            proxy_cache_key $uri$http_accept;
            proxy_cache_valid 200 60s;
            proxy_cache_revalidate on;
            proxy_pass http://registry;
        }}
        location / {{
            proxy_cache off;
            proxy_pass http://registry;
        }}
    }}
}}
"""


class Nginx(Peer):
    name = "nginx"

    def __init__(self, workdir: Path, upstream: str) -> None:
        super().__init__(workdir, upstream)
        self.port = 0
        self.log_path = workdir / "nginx.out"
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> str:
        # As root, nginx would drop its workers to `nobody`, who cannot enter our 0700 temp dir.
        user = "user root;" if os.geteuid() == 0 else ""
        upstream = self.upstream.removeprefix("http://").rstrip("/")
        return NGINX_CONFIG.format(user=user, dir=self.workdir, upstream=upstream, port=self.port)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = self.workdir / "nginx.conf"
        config.write_text(self.config())
        self._output = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            ["nginx", "-p", str(self.workdir), "-c", str(config), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_until_ready(self._proc, self.port, (200,), "nginx", self.log_path)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._proc is not None:
            # SIGTERM is nginx's fast shutdown; the master stops its own workers.
            _stop_process(self._proc)
        if self._output is not None:
            self._output.close()
            self._output = None

    def main_pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid


class Floor(Peer):
    """:mod:`bench.floor` in processes of its own; ``upstream`` is not used."""

    def __init__(self, name: str, workdir: Path, upstream: str, processes: int = 1) -> None:
        super().__init__(workdir, upstream)
        self.name = name
        self.processes = processes
        self.service = Service(workdir / "floor.log")
        self.service.name = name

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.service.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.service.port = free_port()
        command = [sys.executable, "-m", "bench.floor", "--port", str(self.service.port)]
        command += ["--processes", str(self.processes)]
        self.service._spawn(command, cwd=Path(__file__).resolve().parents[1])

    def stop(self) -> None:
        self.service.stop()

    def main_pid(self) -> int:
        return self.service.pid


def make_peer(name: str, workdir: Path, upstream: str, ours_source: Path | None) -> Peer:
    if name == "ours":
        return Ours(name, workdir / name, upstream, ours_source)
    if name == "ours-tuned":
        return Ours(name, workdir / name, upstream, ours_source, log_level="warning")
    if name == "ours-2w":
        return Ours(name, workdir / name, upstream, ours_source, workers=2)
    if name == "floor":
        return Floor(name, workdir / name, upstream)
    if name == "floor-2w":
        return Floor(name, workdir / name, upstream, processes=2)
    classes: dict[str, type[Peer]] = {"distribution": DistributionProxy, "nginx": Nginx}
    return classes[name](workdir / name, upstream)


SNAPSHOT_ATTEMPTS = 12
SNAPSHOT_RETRY_SECONDS = 5.0


def snapshot_ours(repo_root: Path, dest: Path) -> Path:
    """Copy ``proxy/`` so every instance in a run is the same code, even while it is edited.

    A copy taken mid-edit may not import; try again a few times before giving up.
    """
    for attempt in range(SNAPSHOT_ATTEMPTS):
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(
            repo_root / "proxy", dest / "proxy", ignore=shutil.ignore_patterns("__pycache__")
        )
        check = subprocess.run(
            [sys.executable, "-c", "import proxy.cli, proxy.app"],
            cwd=dest,
            capture_output=True,
            text=True,
            check=False,
        )
        if check.returncode == 0:
            return dest
        if attempt == SNAPSHOT_ATTEMPTS - 1:
            raise RuntimeError(f"the mirror's code does not import:\n{check.stderr[-3000:]}")
        time.sleep(SNAPSHOT_RETRY_SECONDS)
    raise AssertionError("unreachable")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            # Field 4 is the parent pid; the command name (field 2) may hold spaces.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _reset_peaks(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


def _status_kib(pid: int, field: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class MemorySampler:
    """Peak resident memory of a set of processes while a scenario runs.

    Polls the sum of ``VmRSS`` every 20 ms; for a single process also resets and reads the
    kernel's own peak (``VmHWM``, reset by writing 5 to ``clear_refs``), which catches spikes
    between two polls.
    """

    INTERVAL = 0.02

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak_kib = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> MemorySampler:
        _reset_peaks(self.pids)
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._sample()
        if len(self.pids) == 1:
            self.peak_kib = max(self.peak_kib, _status_kib(self.pids[0], "VmHWM"))

    @property
    def peak_mib(self) -> float:
        return self.peak_kib / 1024

    def _sample(self) -> None:
        self.peak_kib = max(self.peak_kib, sum(_status_kib(pid, "VmRSS") for pid in self.pids))

    async def _poll(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(self.INTERVAL)


def interrupt_safe_stop(peer: Peer) -> None:
    """Stop ``peer`` even when a second Ctrl-C arrives while it shuts down."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        peer.stop()
    finally:
        signal.signal(signal.SIGINT, previous)
