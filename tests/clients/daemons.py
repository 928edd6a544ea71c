"""Real container engines, each started by a test in its own directories and stopped by its PID.

- :class:`Dockerd` runs Debian's Docker Engine (``docker.io``) with its own ``data-root``,
  ``exec-root``, pidfile and unix socket, the ``vfs`` storage driver, no iptables and no bridge,
  and the ``daemon.json`` a test gives it (``registry-mirrors``). :meth:`Dockerd.docker` runs the
  ``docker`` CLI against it.
- :class:`Containerd` runs ``containerd`` with its own root, state, sockets and ``opt`` dir (the
  CRI plugin disabled: no kubelet here); :meth:`Containerd.ctr` runs ``ctr`` against it.
- :func:`podman_env` writes the ``containers.conf`` / ``storage.conf`` / ``registries.conf``
  podman, buildah and skopeo read, all roots inside a temp dir.

Every engine gets the environment of :func:`harness.skopeo.client_env`: HTTP(S) proxies on
a dead loopback port, so any attempt to fall back to the real Docker Hub fails at once instead of
leaving the machine, while 127.0.0.1 is reached directly. Readiness is polled (an external daemon
gives no event to wait on), boundedly, noticing at once when the daemon dies.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from harness.skopeo import client_env

START_DEADLINE_SECONDS = 30.0
POLL_INTERVAL_SECONDS = 0.1
STOP_GRACE_SECONDS = 20.0
COMMAND_TIMEOUT_SECONDS = 120.0

# Debian packages that provide each program the client tests run.
PACKAGES = {
    "dockerd": "docker.io",
    "docker": "docker.io",
    "containerd": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "podman": "podman",
    "buildah": "buildah",
    "skopeo": "skopeo",
    "busybox": "busybox-static",
    "docker-registry": "docker-registry",
}


def missing_programs(programs: Sequence[str]) -> str | None:
    """None when every program is on PATH, else a message saying how to install the rest."""
    missing = [program for program in programs if shutil.which(program) is None]
    if not missing:
        return None
    packages = sorted({PACKAGES.get(program, program) for program in missing})
    return (
        f"missing {', '.join(missing)}: run scripts/install-system-deps "
        f"(Debian packages: {' '.join(packages)})"
    )


class DaemonError(RuntimeError):
    pass


class CommandError(RuntimeError):
    def __init__(self, args: Sequence[str], returncode: int | None, output: str) -> None:
        super().__init__(f"{' '.join(args)} failed ({returncode}):\n{output[-8000:]}")
        self.returncode = returncode
        self.output = output


def run(
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = COMMAND_TIMEOUT_SECONDS,
    input_text: str | None = None,
) -> str:
    """Run a command to completion; return stdout, raise :class:`CommandError` on failure."""
    try:
        result = subprocess.run(
            list(args),
            input=input_text,
            capture_output=True,
            text=True,
            env=env if env is not None else client_env(),
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandError(args, None, f"timed out after {timeout} s") from exc
    if result.returncode != 0:
        raise CommandError(args, result.returncode, result.stdout + result.stderr)
    return result.stdout


def short_tempdir(prefix: str) -> Path:
    """A directory with a short path: unix socket paths are limited to 107 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class _Daemon:
    """A daemon process of ours: started with :meth:`_spawn`, stopped by its PID."""

    name = "daemon"

    def __init__(self) -> None:
        self.root = short_tempdir(f"rp-{self.name}-")
        self.log_path = self.root / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def _spawn(self, args: Sequence[str]) -> None:
        self._log = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=client_env(),
            start_new_session=True,
        )

    def _ready(self) -> bool:
        raise NotImplementedError

    def _wait_until_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_DEADLINE_SECONDS
        while not self._ready():
            try:
                code = self._proc.wait(timeout=POLL_INTERVAL_SECONDS)
            except subprocess.TimeoutExpired:
                pass
            else:
                raise DaemonError(f"{self.name} exited with {code}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise DaemonError(
                    f"{self.name} not ready within {START_DEADLINE_SECONDS:.0f} s:\n"
                    f"{self.log_text()}"
                )

    def stop(self) -> None:
        """SIGTERM our own process, wait, SIGKILL if it lingers; then remove its directories."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_GRACE_SECONDS)
        if self._log is not None:
            self._log.close()
            self._log = None

    def remove(self) -> None:
        """Unmount what the daemon left mounted in its own directory (dockerd keeps its
        ``exec-root/netns/default`` bind mount after exit), deepest first, then delete it."""
        prefix = f"{self.root}/"
        mounts = [
            fields[1]
            for fields in (line.split() for line in Path("/proc/mounts").read_text().splitlines())
            if len(fields) > 1 and fields[1].startswith(prefix)
        ]
        for mountpoint in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "--lazy", mountpoint], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.remove()


class Dockerd(_Daemon):
    """Docker Engine in a temp dir; ``daemon_config`` is merged into its ``daemon.json``."""

    name = "dockerd"

    def __init__(self, daemon_config: dict[str, object] | None = None) -> None:
        super().__init__()
        self.socket = self.root / "docker.sock"
        self.config_path = self.root / "daemon.json"
        self.config: dict[str, object] = {
            "data-root": str(self.root / "data"),
            "exec-root": str(self.root / "exec"),
            "pidfile": str(self.root / "docker.pid"),
            "hosts": [f"unix://{self.socket}"],
            "storage-driver": "vfs",
            "iptables": False,
            "ip6tables": False,
            "ip-masq": False,
            "ip-forward": False,
            "bridge": "none",
            **(daemon_config or {}),
        }

    def start(self) -> Self:
        self.config_path.write_text(json.dumps(self.config, indent=2))
        self._spawn(["dockerd", "--config-file", str(self.config_path)])
        self._wait_until_ready()
        return self

    @property
    def env(self) -> dict[str, str]:
        env = client_env()
        env["DOCKER_HOST"] = f"unix://{self.socket}"
        # The CLI's own config (contexts, credentials) stays in the temp dir too.
        env["DOCKER_CONFIG"] = str(self.root / "cli")
        return env

    def _ready(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            run(["docker", "version", "--format", "{{.Server.Version}}"], env=self.env, timeout=5)
        except CommandError:
            return False
        return True

    def docker(self, *args: str, timeout: float = COMMAND_TIMEOUT_SECONDS) -> str:
        return run(["docker", *args], env=self.env, timeout=timeout)

    def container_logs(self, container: str) -> str:
        """A container's stdout and stderr together (`docker logs` splits them as it found them)."""
        result = subprocess.run(
            ["docker", "logs", container],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
            check=False,
        )
        return result.stdout + result.stderr


CONTAINERD_CONFIG = """\
version = 2
root = "{root}/root"
state = "{root}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{root}/containerd.sock"

[ttrpc]
  address = "{root}/containerd.sock.ttrpc"

[debug]
  address = "{root}/debug.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"
"""


class Containerd(_Daemon):
    """containerd in a temp dir (no CRI); pull with ``ctr ... --hosts-dir``."""

    name = "containerd"

    def __init__(self) -> None:
        super().__init__()
        self.socket = self.root / "containerd.sock"
        self.config_path = self.root / "config.toml"

    def start(self) -> Self:
        self.config_path.write_text(CONTAINERD_CONFIG.format(root=self.root))
        self._spawn(["containerd", "--config", str(self.config_path)])
        self._wait_until_ready()
        return self

    def _ready(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            self.ctr("version", timeout=5)
        except CommandError:
            return False
        return True

    def ctr(self, *args: str, timeout: float = COMMAND_TIMEOUT_SECONDS) -> str:
        return run(["ctr", "--address", str(self.socket), *args], timeout=timeout)


# --------------------------------------------------------------------------------------------
# podman / buildah / skopeo
# --------------------------------------------------------------------------------------------

CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

STORAGE_CONF = """\
[storage]
driver = "vfs"
graphroot = "{root}/storage"
runroot = "{root}/run"
"""


def podman_env(root: Path, registries_conf: Path) -> dict[str, str]:
    """Environment that points podman and buildah at configs and storage under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    containers_conf = root / "containers.conf"
    containers_conf.write_text(CONTAINERS_CONF)
    storage_conf = root / "storage.conf"
    storage_conf.write_text(STORAGE_CONF.format(root=root))
    env = client_env()
    env["CONTAINERS_CONF"] = str(containers_conf)
    env["CONTAINERS_STORAGE_CONF"] = str(storage_conf)
    env["CONTAINERS_REGISTRIES_CONF"] = str(registries_conf)
    env["XDG_RUNTIME_DIR"] = str(root / "xdg")
    env["TMPDIR"] = str(root / "tmp")
    (root / "tmp").mkdir(exist_ok=True)
    return env


def version_of(*args: str) -> str:
    """The first line a ``--version`` style command prints (for the test report)."""
    try:
        return run(args, timeout=15).strip().splitlines()[0]
    except (CommandError, IndexError, OSError):
        return "unknown"
