"""skopeo, a real client: :func:`skopeo_copy` pulls into a ``dir:`` layout, in the environment
:func:`client_env` gives every real client (nothing leaves the machine)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from harness.ports import free_port

SKOPEO_TIMEOUT_SECONDS = 90.0


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
