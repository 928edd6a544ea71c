"""Server processes the tests start and own, and the real upstream registry.

- :class:`Service`: a process with its output in a log file, started by :meth:`Service._spawn`,
  ready once ``GET ready_path`` on its port answers as expected, and stopped (SIGTERM, then
  SIGKILL) by its own handle only: nothing touches a daemon it did not start.
- :class:`Distribution` runs the CNCF reference registry (``docker-registry serve``) with
  filesystem storage in a directory the test owns; it is the upstream the mirror pulls from.
- :func:`wait_until_ready`, :func:`stop_process`, :func:`tail`: the same for a bare ``Popen``.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from harness.ports import free_port

START_DEADLINE_SECONDS = 20.0
# How long one wait for the process to exit lasts between two readiness probes.
POLL_INTERVAL_SECONDS = 0.05
STOP_GRACE_SECONDS = 10.0


class ProcessStartError(RuntimeError):
    """A helper process exited, or did not answer its readiness probe, before the deadline."""


def _probe(port: int, path: str) -> int | None:
    """The status of ``GET path`` on 127.0.0.1:port, or None when nothing answers yet."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2.0)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


def wait_until_ready(
    proc: subprocess.Popen[bytes],
    port: int,
    ready: Sequence[int],
    describe: str,
    output: Path,
    *,
    path: str = "/v2/",
) -> None:
    """Poll ``GET path`` until it answers one of ``ready``, the process dies or the deadline passes.

    An external process gives no event to wait on, so this polls; the interval is spent in
    ``proc.wait`` so a process that dies is noticed at once.
    """
    deadline = time.monotonic() + START_DEADLINE_SECONDS
    while True:
        status = _probe(port, path)
        if status is not None and status in ready:
            return
        try:
            code = proc.wait(timeout=POLL_INTERVAL_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        else:
            raise ProcessStartError(
                f"{describe} exited with status {code} during start-up:\n{tail(output)}"
            )
        if time.monotonic() > deadline:
            stop_process(proc)
            raise ProcessStartError(
                f"{describe} did not answer GET {path} with {list(ready)} within "
                f"{START_DEADLINE_SECONDS:.0f} s (last status: {status}):\n{tail(output)}"
            )


def stop_process(proc: subprocess.Popen[bytes], *, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Only ever called on our own children."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


def tail(path: Path, limit: int = 8000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no output: {exc})"
    return text[-limit:]


class StartStop:
    """``with thing:`` starts it and stops it at the end, whatever happened in between."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Service(StartStop):
    """A server process the tests start and own: its output in a log file, ready once
    ``GET ready_path`` on its port answers as expected, stopped (SIGTERM, then SIGKILL) by its
    own handle only."""

    name = "service"
    ready_path = "/v2/"

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
        """Start `command` and wait until `GET ready_path` on its port answers one of `ready`."""
        self._output = self.log_path.open("ab" if append else "wb")
        self._proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            cwd=cwd,
        )
        try:
            wait_until_ready(
                self._proc, self.port, ready, self.name, self.log_path, path=self.ready_path
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM, wait, then SIGKILL."""
        if self._proc is not None:
            stop_process(self._proc)
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
        return tail(self.log_path, limit=1_000_000)


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
