"""The mirror under test as a process: ``python -m proxy serve``, built in one place.

- :func:`proxy_command`: ``python -m proxy ARGS``, the command line tests run the mirror's
  program with (``serve``, ``warm``, ``cache``), from the checkout under test.
- :func:`serve_command`: ``serve`` on a loopback port with a cache directory and a size.
- :class:`Mirror`: that command as a :class:`~harness.processes.Service`, with its upstream on
  the command line or in a TOML file (``config``).
- :class:`MirrorProcesses`: starts mirrors in fresh directories and stops them all at the end.
- :data:`StartMirror`: the type of the ``mirror`` fixture that starts the app in-process.
- :class:`MirrorTestServer`: aiohttp's test server with the mirror's own connection handler.
"""

from __future__ import annotations

import http.client
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from pathlib import Path
from typing import Any, Self

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from harness.ports import free_port
from harness.processes import Service
from proxy.server.runner import MirrorRunner

REPO_ROOT = Path(__file__).resolve().parents[2]
# How long the mirror's log writer may take to write a line out (it batches every 10 ms).
LOG_SETTLE_SECONDS = 10.0

# The ``mirror`` fixture of tests/conftest.py: ``await mirror(**settings)`` starts the app
# in-process in front of the fake upstream and returns a test client for it.
StartMirror = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


class MirrorTestServer(TestServer):
    """The app served as `proxy serve` serves it: with `MirrorRequestHandler`, which answers
    malformed requests and repeated manifest hits itself."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return MirrorRunner(self.app, **kwargs)


def proxy_command(*args: str) -> list[str]:
    """``python -m proxy ARGS`` with the interpreter running the tests."""
    return [sys.executable, "-m", "proxy", *args]


def serve_command(port: int, cache_dir: Path, *options: str) -> list[str]:
    """``serve`` on 127.0.0.1:``port``, caching up to 1 GiB in ``cache_dir``, then ``options``."""
    return proxy_command(
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--cache-dir",
        str(cache_dir),
        "--cache-max-size",
        "1GiB",
        *options,
    )


def upstream_tables(upstreams: dict[str, str], *, passing: Collection[str] = ()) -> str:
    """``[[upstreams]]`` TOML tables, one per ``name: url``, in order (the first is the default);
    those named in ``passing`` pass clients' credentials on."""
    return "".join(
        f'\n[[upstreams]]\nname = "{name}"\nurl = "{url}"\n'
        + ("pass_client_credentials = true\n" if name in passing else "")
        for name, url in upstreams.items()
    )


class Mirror(Service):
    """``python -m proxy serve`` on 127.0.0.1, its cache and log under ``workdir``.

    The upstream is ``--upstream URL`` or, given ``config`` (TOML text, e.g. from
    :func:`upstream_tables`), whatever that file says, passed as ``--config``. ``ready`` are the
    answers to ``GET /v2/`` that mean it is up (401 once the ping challenges clients).
    """

    name = "mirror"

    def __init__(
        self,
        workdir: Path,
        upstream: str | None,
        *extra_args: str,
        config: str | None = None,
        log_level: str = "debug",
        ready: Sequence[int] = (200,),
    ) -> None:
        super().__init__(workdir / "mirror.log")
        self.workdir = workdir
        self.upstream = upstream
        self.extra_args = extra_args
        self.config = config
        self._log_level = log_level
        self.ready = ready
        self.cache_dir = workdir / "cache"
        self.config_path = workdir / "registry-proxy.toml"

    @property
    def url(self) -> str:
        if self._proc is None:
            raise RuntimeError("Mirror is not running")
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def settled_log(self, timeout: float = LOG_SETTLE_SECONDS) -> str:
        """The log once every line for requests answered before this call is in it.

        The mirror's log writer batches lines in a thread, in order; so a marker request
        (a ping, logged at info) is sent, and the log is read until the marker's line is there.
        """
        marker = f"log-marker-{uuid.uuid4().hex}"
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request("GET", f"/v2/?{marker}")
            connection.getresponse().read()  # 200, or 401 when it challenges: logged alike
        finally:
            connection.close()
        deadline = time.monotonic() + timeout
        while (text := self.log_text()).find(marker) < 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"the mirror did not log {marker} within {timeout} s")
            time.sleep(0.02)  # polling a file for a line known to come
        return text

    def command(self) -> list[str]:
        if self.config is not None:
            source = ["--config", str(self.config_path)]
        elif self.upstream is not None:
            source = ["--upstream", self.upstream]
        else:
            raise ValueError("a mirror needs an upstream or a config")
        return serve_command(
            self.port, self.cache_dir, *source, "--log-level", self._log_level, *self.extra_args
        )

    def start(self) -> Self:
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError("Mirror already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(exist_ok=True)
        if self.config is not None:
            self.config_path.write_text(self.config)
        if self.port == 0:
            self.port = free_port()
        # Append, so a restart on the same cache keeps the earlier log.
        self._spawn(self.command(), cwd=REPO_ROOT, append=True, ready=self.ready)
        return self


class MirrorProcesses:
    """Starts :class:`Mirror` s in fresh directories under ``root`` and remembers them, so
    that :meth:`stop_all` (the fixture's teardown) stops every one."""

    def __init__(self, root: Path, default_upstream: str) -> None:
        self.root = root
        self.default_upstream = default_upstream
        self.mirrors: list[Mirror] = []

    def __call__(self, *extra_args: str, upstream: str | None = None) -> Mirror:
        workdir = self.root / f"mirror-{len(self.mirrors)}"
        mirror = Mirror(workdir, upstream or self.default_upstream, *extra_args)
        self.mirrors.append(mirror)
        return mirror.start()

    def stop_all(self) -> None:
        for mirror in self.mirrors:
            mirror.stop()
