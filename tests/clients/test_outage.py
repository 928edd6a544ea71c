"""A warmed image keeps being pulled by every real client while its upstream is down.

`registry-proxy warm` resolves the tag with its own Accept list; then the upstream stops
(connection refused) or is black-holed (a socket that accepts and never answers). skopeo,
podman, containerd (``ctr`` with ``hosts.toml``) and Docker Engine (``registry-mirrors``), each
configured as in the README, pull the image through the mirror, and every digest verifies.

Tags are made stale at once (``tag_ttl = "1ms"``), so each client's tag request really goes to the
failing upstream and is answered from the cache: the worst case, not a lucky fresh hit. The CRI
path is not covered: the harness runs containerd without its CRI plugin (no kubelet here).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest
from harness.images import Image
from harness.mirror import Mirror, proxy_command
from harness.processes import Distribution, StartStop
from harness.skopeo import skopeo_copy
from harness.verify import DIR_MANIFEST, verify_dir

from .conftest import Publish, configured_mirror
from .daemons import Containerd, Dockerd, podman_env, run
from .test_client_matrix import CTR_SNAPSHOTTER, HOSTS_TOML, REGISTRIES_CONF, ctr_digest

pytestmark = pytest.mark.clients

REPO_ROOT = Path(__file__).resolve().parents[2]
REVALIDATE_TIMEOUT = 1.0
# Settings under test: stale at once, and bounded waits on a black hole.
OUTAGE_SETTINGS = f"""\
tag_ttl = "1ms"
tag_ttls = []
revalidate_timeout = "{REVALIDATE_TIMEOUT}s"
response_timeout = "3s"
"""


class BlackHole(StartStop):
    """Listens on a port, accepts every connection and never sends a byte."""

    def __init__(self, port: int) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(128)
        self.held: list[socket.socket] = []
        self.accepted = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # the listener was closed
            self.held.append(connection)
            self.accepted.set()

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.listener.close()
        self._thread.join(timeout=5)
        for connection in self.held:
            connection.close()


def tag_answers(log: str, name: str) -> list[tuple[int, str]]:
    """(status, cache result) of every request for the tag in the mirror's access log."""
    return [(status, cache) for status, cache, _ in tag_requests(log, name)]


def tag_requests(log: str, name: str) -> list[tuple[int, str, float]]:
    """(status, cache result, seconds) of every request for the tag in the access log."""
    answers = []
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        # Access log lines carry their fields at the top level (proxy.observability).
        if isinstance(entry, dict) and f"/{name}/manifests/latest" in str(entry.get("path")):
            seconds = float(entry["duration_ms"]) / 1000
            answers.append((int(entry["status"]), str(entry["cache"]), seconds))
    return answers


class Outage:
    """A Distribution upstream, the mirror in front of it, and Docker Engine using the mirror."""

    def __init__(self, hub: Distribution, mirror: Mirror, dockerd: Dockerd) -> None:
        self.hub = hub
        self.mirror = mirror
        self.dockerd = dockerd

    def warm(self, reference: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        result = subprocess.run(
            proxy_command("warm", "--mirror", self.mirror.url, reference),
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def outage(tmp_path: Path) -> Iterator[Outage]:
    with (
        Distribution(tmp_path / "hub") as hub,
        configured_mirror(tmp_path / "mirror", {"docker.io": hub.url}, OUTAGE_SETTINGS) as mirror,
        Dockerd({"registry-mirrors": [mirror.url]}) as dockerd,
    ):
        dockerd.start()
        yield Outage(hub, mirror, dockerd)


def pull_with_every_client(
    outage: Outage, containerd: Containerd, name: str, image: Image, workdir: Path
) -> None:
    reference = f"docker.io/library/{name}:latest"
    registries_conf = workdir / "registries.conf"
    registries_conf.write_text(REGISTRIES_CONF.format(mirror=outage.mirror.host))

    skopeo_copy(reference, workdir / "skopeo", "--registries-conf", str(registries_conf))
    assert verify_dir(workdir / "skopeo")[DIR_MANIFEST] == image.digest

    env = podman_env(workdir / "podman", registries_conf)
    run(["podman", "pull", "--quiet", reference], env=env)
    inspected = run(["podman", "image", "inspect", "--format", "{{.Digest}}", reference], env=env)
    assert inspected.strip() == image.digest

    hosts_dir = workdir / "certs.d"
    (hosts_dir / "docker.io").mkdir(parents=True)
    (hosts_dir / "docker.io" / "hosts.toml").write_text(
        HOSTS_TOML.format(server="https://registry-1.docker.io", mirror=outage.mirror.url)
    )
    containerd.ctr("images", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter",
                   CTR_SNAPSHOTTER, reference)  # fmt: skip
    assert ctr_digest(containerd, reference) == image.digest

    outage.dockerd.docker("pull", "--quiet", f"{name}:latest")
    inspect = ("image", "inspect", "--format", "{{json .RepoDigests}}", f"{name}:latest")
    digests = json.loads(outage.dockerd.docker(*inspect))
    assert digests == [f"{name}@{image.digest}"]


def test_every_client_pulls_a_warmed_image_while_the_upstream_refuses_connections(
    outage: Outage, containerd: Containerd, publish: Publish, tmp_path: Path
) -> None:
    image = publish(outage.hub, "library/outage-refused", "latest")
    outage.warm("outage-refused:latest")
    outage.hub.stop()
    before = len(tag_answers(outage.mirror.settled_log(), "outage-refused"))

    pull_with_every_client(outage, containerd, "outage-refused", image, tmp_path)
    during = tag_answers(outage.mirror.settled_log(), "outage-refused")[before:]
    assert len(during) >= 4  # one tag request per client at least
    assert set(during) == {(200, "stale")}


def test_every_client_pulls_a_warmed_image_while_the_upstream_is_black_holed(
    outage: Outage, containerd: Containerd, publish: Publish, tmp_path: Path
) -> None:
    image = publish(outage.hub, "library/outage-black-hole", "latest")
    outage.warm("outage-black-hole:latest")
    outage.hub.stop()
    before = len(tag_answers(outage.mirror.settled_log(), "outage-black-hole"))

    with BlackHole(outage.hub.port) as black_hole:
        started = time.monotonic()
        pull_with_every_client(outage, containerd, "outage-black-hole", image, tmp_path)
        elapsed = time.monotonic() - started
        assert black_hole.accepted.is_set()  # the mirror did try the upstream
    during = tag_requests(outage.mirror.settled_log(), "outage-black-hole")[before:]
    assert len(during) >= 4
    assert {(status, cache) for status, cache, _ in during} == {(200, "stale")}
    # Each tag answer within revalidate_timeout (plus scheduling slack on a busy machine).
    assert max(seconds for _, _, seconds in during) < REVALIDATE_TIMEOUT + 0.5
    # Four pulls, each with a tag request or two that waits at most revalidate_timeout (and
    # none once the breaker opens): nowhere near the minute of the read timeout.
    assert elapsed < 60, elapsed
