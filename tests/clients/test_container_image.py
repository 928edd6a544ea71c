"""``deploy/Dockerfile`` builds with the real Docker Engine, runs, and serves pulls.

Docker Hub cannot be reached here, so the base image (``BASE_IMAGE``, by default
``python:3.12-slim``) is made locally: :func:`images.python_rootfs` assembles a root filesystem
from this machine's Debian Python and ``docker import`` loads it (a few seconds). The build itself
runs with ``--network host`` so pip reaches PyPI. The container then runs read-only, as the
non-root user, with settings from a TOML file and the environment; it must report healthy, serve
a skopeo pull from the upstream, and stop cleanly on SIGTERM (exit status 0, not 137).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from harness.ports import free_port
from harness.processes import Distribution
from harness.skopeo import skopeo_copy
from harness.verify import DIR_MANIFEST, verify_dir

from .conftest import Publish
from .daemons import Dockerd
from .images import python_rootfs

pytestmark = pytest.mark.clients

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE_TAG = "local/python-base:test"
IMAGE_TAG = "registry-proxy:test"
# What the Dockerfile COPYs; the test sends only these as the build context.
CONTEXT_FILES = ("pyproject.toml", "README.md", "proxy", "deploy/Dockerfile")
HEALTHY_DEADLINE_SECONDS = 30.0
POLL_INTERVAL_SECONDS = 0.2
BUILD_TIMEOUT_SECONDS = 300.0


def build_context(dest: Path) -> Path:
    for name in CONTEXT_FILES:
        source = REPO_ROOT / name
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    return dest


@pytest.fixture(scope="session")
def mirror_image(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> str:
    work = tmp_path_factory.mktemp("image")
    python_rootfs(work / "rootfs.tar")
    dockerd.docker("import", "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                   "/usr/bin:/sbin:/bin", str(work / "rootfs.tar"), BASE_TAG)  # fmt: skip
    context = build_context(work / "context")
    dockerd.docker(
        "build",
        "--network",
        "host",
        "--build-arg",
        f"BASE_IMAGE={BASE_TAG}",
        "--file",
        str(context / "deploy" / "Dockerfile"),
        "--tag",
        IMAGE_TAG,
        str(context),
        timeout=BUILD_TIMEOUT_SECONDS,
    )
    return IMAGE_TAG


def wait_until_healthy(dockerd: Dockerd, container: str) -> None:
    """Poll the engine's health status (the HEALTHCHECK runs inside the container)."""
    deadline = time.monotonic() + HEALTHY_DEADLINE_SECONDS
    while True:
        state = json.loads(dockerd.docker("inspect", "--format", "{{json .State}}", container))
        status = state.get("Health", {}).get("Status")
        if status == "healthy":
            return
        assert state["Running"], f"container exited: {state}\n{dockerd.container_logs(container)}"
        assert time.monotonic() < deadline, f"not healthy in time: {state}"
        time.sleep(POLL_INTERVAL_SECONDS)  # an external daemon's state: bounded polling


@pytest.mark.timeout(300)
def test_image_runs_non_root_read_only_reports_healthy_and_serves_a_pull(
    dockerd: Dockerd, mirror_image: str, hub: Distribution, publish: Publish, tmp_path: Path
) -> None:
    image = publish(hub, "library/in-container", "1.0")
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f'upstream = "{hub.url}"\ncache_max_size = "1GiB"\n')
    config.chmod(0o644)

    container = dockerd.docker(
        "run", "--detach", "--network", "host", "--read-only",
        "--health-interval", "1s", "--health-start-period", "1s",
        "--env", f"REGISTRY_PROXY_LISTEN=127.0.0.1:{port}",
        "--volume", f"{config}:/etc/registry-proxy/config.toml:ro",
        mirror_image, "serve", "--config", "/etc/registry-proxy/config.toml",
    ).strip()  # fmt: skip
    try:
        wait_until_healthy(dockerd, container)
        skopeo_copy(f"127.0.0.1:{port}/library/in-container:1.0", tmp_path / "out")
        user = dockerd.docker("exec", container, "python", "-c", "import os; print(os.getuid())")
        started = time.monotonic()
        dockerd.docker("stop", "--time", "20", container)
        stop_seconds = time.monotonic() - started
        exit_code = dockerd.docker("inspect", "--format", "{{.State.ExitCode}}", container)
        logs = dockerd.docker("logs", container)
    finally:
        dockerd.docker("rm", "--force", container)

    assert verify_dir(tmp_path / "out")[DIR_MANIFEST] == image.digest
    assert user.strip() == "10001"
    assert exit_code.strip() == "0", logs
    assert stop_seconds < 15, f"SIGTERM took {stop_seconds:.1f} s"
